"""Vision options of ``perp run`` (the subcommand itself lives in :mod:`perplib.cli`, which
dispatches here when ``--model`` names a vision model):

    perp run --model resnet18 --data digits --prune global --sparsity 0.9 --retrain perp --epochs 1 --json out.json

The first run of a configuration pretrains the dense model (cached); the record carries dense,
pruned and retrained accuracy, trainable share, sparsity after merging, epoch time and peak memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .experiments import FREEZE_MODES, VisionConfig, run_vision
from .models import VISION_MODELS, is_vision_model
from .pruning import ALLOCATIONS
from .retrain import METHODS
from .schedules import SCHEDULES

__all__ = ["add_vision_args", "build_parser", "config_from_args", "is_vision_model", "run_from_args"]

# option -> (type, help); every default is None so VisionConfig's own defaults apply
_OPTIONS: dict[str, tuple[Any, str]] = {
    "--data": (str, "vision data: digits (scikit-learn, offline), fashion-mnist (Debian's dataset-fashion-mnist), "
                    "imagenet (needs --data-root with train/ and val/ class folders)"),
    "--data-root": (str, "dataset folder (imagenet; or a folder of Fashion-MNIST IDX files)"),
    "--train-subset": (int, "use at most N training images (seeded)"),
    "--test-subset": (int, "use at most N test images (seeded)"),
    "--pretrain-epochs": (int, "dense pretraining epochs when no cached pretrained model exists (paper: 90)"),
    "--batch-size": (int, "batch size for pretraining and retraining (paper: 256)"),
    "--lr": (float, "maximal learning rate: pretraining starts there, retraining schedules scale from it (0.1)"),
    "--momentum": (float, "SGD momentum (0.9)"),
    "--weight-decay": (float, "SGD weight decay (1e-4)"),
    "--prune": (str, f"vision pruning allocation: {', '.join(ALLOCATIONS)} (magnitude = global), or none"),
    "--sparsity": (float, "fraction of conv/linear weights removed, in [0, 1)"),
    "--retrain": (str, f"vision retraining method: {', '.join(METHODS)}"),
    "--epochs": (int, "retraining epochs per prune-retrain cycle"),
    "--schedule": (str, f"retraining LR schedule: {', '.join(SCHEDULES)} (default allr)"),
    "--warmup": (float, "warmup fraction of each retraining cycle"),
    "--lora": (str, "PERP LoRA kind: masked (merged, exact sparsity; default) | plain (the paper's, unmerged)"),
    "--lora-rank": (int, "PERP LoRA rank"),
    "--lora-alpha": (float, "PERP LoRA alpha (default: the rank)"),
    "--recal-batches": (int, "batches for BN-Recalibrate (default: one epoch)"),
    "--cycles": (int, "prune-retrain cycles to reach --sparsity (Section 3.4)"),
    "--freeze": (str, f"gradual freezing within a cycle: {', '.join(FREEZE_MODES)} (with --retrain full)"),
    "--seed": (int, "seed of splits, initialisation and shuffling"),
}  # fmt: skip


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def add_vision_args(parser: argparse.ArgumentParser) -> None:
    """Add the vision options ``parser`` lacks, and make the shared ones default to None so each
    track (LLM ``RunConfig``, vision ``VisionConfig``) fills in its own defaults."""
    have = parser._option_string_actions  # noqa: SLF001 - argparse has no public query
    group = parser.add_argument_group("vision models (" + ", ".join(VISION_MODELS) + ")")
    extra_choices = {"--prune": ("none", *ALLOCATIONS), "--retrain": METHODS}
    for option, (kind, help_text) in _OPTIONS.items():
        if option in have:
            action = have[option]
            parser.set_defaults(**{action.dest: None})
            if action.choices is not None and option in extra_choices:  # accept the vision names too
                action.choices = [*action.choices, *(c for c in extra_choices[option] if c not in action.choices)]
        else:
            group.add_argument(option, type=kind, default=None, help=help_text)
    if "--reverse" not in have:
        group.add_argument("--reverse", action="store_true", default=None, help="freeze/unfreeze from the output side")
    for option, kwargs in {
        "--model": {"default": "resnet-tiny", "help": f"vision model: {', '.join(VISION_MODELS)}"},
        "--device": {"default": "auto", "help": "auto (GPU if present), cpu, cuda, ..."},
        "--json": {"metavar": "FILE", "help": "also write the record to FILE"},
        "--results": {"metavar": "DIR", "help": "results store folder (default: $PERPLIB_RESULTS or ./results)"},
    }.items():
        if option not in have:
            group.add_argument(option, **kwargs)
    if "--force" not in have:
        group.add_argument("--force", action="store_true", help="recompute even if a finished record exists")
    if "--threads" not in have:
        from ..runtime import add_arguments

        add_arguments(group)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with only the vision options (tests, ``python -m perplib.vision.cli``)."""
    parser = argparse.ArgumentParser(prog="perp run", description="Prune and retrain a vision model.")
    add_vision_args(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> VisionConfig:
    """The :class:`VisionConfig` of the given options (unset options take VisionConfig's defaults)."""
    if not is_vision_model(args.model):
        raise ValueError(f"vision model must be one of {list(VISION_MODELS)}, got {args.model!r}")
    values = {k: v for k, v in vars(args).items() if k in VisionConfig.field_names() and v is not None}
    if values.get("prune") == "magnitude":  # the LLM track's name for the same criterion
        values["prune"] = "global"
    if isinstance(values.get("sparsity"), str):
        values["sparsity"] = float(values["sparsity"].rstrip("%")) / (100 if values["sparsity"].endswith("%") else 1)
    if values.get("prune") == "none":
        values.setdefault("sparsity", 0.0)
    values.pop("steps", None)
    return VisionConfig(**values)


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or reuse) the configuration of ``args``, print a summary, write ``--json``; returns the record."""
    from ..results import ResultStore, write_atomic

    config = config_from_args(args)
    store = ResultStore(getattr(args, "results", None))
    record = run_vision(config, store, device=_device(getattr(args, "device", None)), log=print,
                        force=bool(getattr(args, "force", False)))  # fmt: skip
    m, t = record["metrics"], record["timings"]
    print(
        f"{config.model} on {config.data}: dense {m['dense_accuracy']:.2f}% -> pruned {m['pruned_accuracy']:.2f}% "
        f"-> {config.retrain} {m['accuracy']:.2f}%; sparsity {m['sparsity']:.4f}; "
        f"trainable {100 * m['trainable_share']:.3f}%; epoch {t['epoch_time_s']:.2f}s; peak {m['peak_memory_mb']:.1f} MiB"
        + (" (reused finished record; --force recomputes)" if record.get("reused") else "")
    )
    if getattr(args, "json", None):
        write_atomic(Path(args.json), json.dumps(record, indent=1, sort_keys=True, default=str))
    return record


def main(argv: list[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    try:
        from ..runtime import from_args

        from_args(args)
        run_from_args(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"perp run: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

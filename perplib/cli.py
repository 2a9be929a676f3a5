"""The ``perp`` command. Each subcommand builds a validated configuration from its options, runs
it through the results store, prints a short summary and optionally writes the record as JSON.

    perp eval  --model smollm2-135m --eval wiki-vital --seqlen 512 --windows 64 --json out.json
    perp prune --model smollm2-135m --method wanda --sparsity 2:4 --nsamples 128 --save pruned/ --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .config import RunConfig

DEFAULTS = RunConfig()


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULTS.model,
                   help="embedded alias (smollm2-135m; tiny-llama/tiny-opt/tiny-neox are random test models), a local "
                        "model folder, a local .gguf file (converted once into the cache), or a Hugging Face "
                        "causal-LM id (e.g. facebook/opt-2.7b)")  # fmt: skip
    g.add_argument("--dtype", default=DEFAULTS.dtype, choices=["float32", "bfloat16", "float16"], help="weights dtype")
    g.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=DEFAULTS.eval,
                   help="evaluation text: wiki-vital (embedded, held-out articles), wikitext2 (test split), c4 "
                        "(validation shard), or a path to a local text file")  # fmt: skip
    g.add_argument(
        "--seqlen",
        type=int,
        default=DEFAULTS.seqlen,
        help="tokens per window (evaluation, calibration and training); at most the model's context",
    )
    g.add_argument("--bos", choices=["auto", "reference", "window", "none"],
                   help="BOS token in evaluation, calibration and training windows: reference = only the first "
                        "window starts with BOS (the reference code's convention, behind the paper's OPT/LLaMA "
                        "numbers), window = BOS + seqlen-1 tokens in every window (Gemma needs it), none; auto "
                        "(default) = window for Gemma families, else reference")  # fmt: skip
    g.add_argument(
        "--windows",
        type=int,
        default=DEFAULTS.windows,
        help="evaluate the first K non-overlapping windows; 0 = all of them",
    )
    g.add_argument("--eval-split", dest="eval_split", default=DEFAULTS.eval_split, choices=["eval", "val"],
                   help="eval: the held-out text; val: the validation text (for choosing learning rates)")  # fmt: skip
    g.add_argument("--zero-shot", dest="zero_shot", default=DEFAULTS.zero_shot, metavar="TASKS",
                   help="also measure zero-shot accuracy with lm-evaluation-harness: comma-separated task names, or "
                        "'paper' for BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA (needs the hub)")  # fmt: skip
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for sampling and training")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write the record (configuration, metrics, timings) to FILE")
    g.add_argument("--results", metavar="DIR", help="results store folder (default: $PERPLIB_RESULTS or ./results)")
    g.add_argument("--force", action="store_true", help="recompute even if a finished record exists")
    from .runtime import add_arguments

    add_arguments(p.add_argument_group("CPU runtime (recorded in every record's env.runtime)"))


def add_placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement (models larger than one GPU: accelerate device map, CPU/disk offload)")
    g.add_argument("--device-map", metavar="MAP",
                   help="spread the model with accelerate: auto, balanced, balanced_low_0, sequential, or a JSON file "
                        "{module: GPU index | cpu | disk}; --gpus/--gpu-memory/--cpu-memory imply auto")  # fmt: skip
    g.add_argument("--gpus", type=int, metavar="N", help="use the first N GPUs (at most the visible ones)")
    g.add_argument(
        "--gpu-memory", metavar="SIZE", help="memory per GPU for weights, e.g. 70GiB (default: what is free)"
    )
    g.add_argument("--cpu-memory", metavar="SIZE",
                   help="CPU memory for offloaded weights, e.g. 200GiB; modules beyond it go to disk")  # fmt: skip
    g.add_argument("--offload-folder", metavar="DIR",
                   help="folder for disk-offloaded weights (pruning writes the pruned ones there)")  # fmt: skip


def placement_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """``load_model``'s device_map / max_memory / offload_folder from the placement options (None
    when none is given: the model loads on the CPU and pruning moves one block at a time to --device)."""
    from pathlib import Path

    from .models import DEVICE_MAP_STRATEGIES, max_memory_for

    device_map = getattr(args, "device_map", None)
    sizes = {k: getattr(args, k, None) for k in ("gpus", "gpu_memory", "cpu_memory")}
    folder = getattr(args, "offload_folder", None)
    if device_map is None and all(v is None for v in sizes.values()):
        if folder is not None:
            raise ValueError("--offload-folder needs a device map (--device-map auto, or --gpus/--cpu-memory)")
        return None
    if device_map is None:
        device_map = "auto"
    elif device_map not in DEVICE_MAP_STRATEGIES:
        path = Path(device_map)
        if not path.is_file():
            raise ValueError(
                f"--device-map must be one of {list(DEVICE_MAP_STRATEGIES)} or a JSON file mapping module names to "
                f"devices, got {device_map!r}"
            )
        try:
            device_map = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--device-map file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(device_map, dict):
            raise ValueError(f"--device-map file {str(path)!r} must hold a JSON object {{module: device}}")
    return {"device_map": device_map, "max_memory": max_memory_for(**sizes), "offload_folder": folder}


def config_from_args(args: argparse.Namespace, **fixed: Any) -> RunConfig:
    """Every option whose name is a RunConfig field goes into the configuration."""
    values = {k: v for k, v in vars(args).items() if k in RunConfig.field_names() and v is not None}
    if values.get("windows") == 0:
        values["windows"] = None
    values.update(fixed)
    return RunConfig(**values)


def execute(config: RunConfig, args: argparse.Namespace, save: str | None = None) -> dict[str, Any]:
    """Run a configuration through the store and report it (shared by every LLM subcommand)."""
    from .experiments import run_llm
    from .results import ResultStore

    store = ResultStore(args.results)
    record = run_llm(
        config, store, device=args.device, save=save, force=args.force, placement=placement_from_args(args)
    )
    summarize(record)
    if args.json:
        from pathlib import Path

        from .results import write_atomic

        write_atomic(Path(args.json), json.dumps(record, indent=1, sort_keys=True, default=str))
    return record


def summarize(record: dict[str, Any]) -> None:
    m, t = record["metrics"], record.get("timings", {})
    parts = [f"perplexity {m['perplexity']:.3f} over {m['tokens']} tokens ({m['windows']} windows)"]
    if m.get("zero_shot_mean") is not None:
        parts.append(f"zero-shot mean accuracy {m['zero_shot_mean']:.4f}")
    if m.get("sparsity") is not None:
        parts.append(f"sparsity {m['sparsity']:.4f}")
    if m.get("trainable_share") is not None:
        parts.append(f"trainable {100 * m['trainable_share']:.3f}%")
    parts.append(", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    if record.get("reused"):
        parts.append("(reused finished record; --force recomputes)")
    print("; ".join(parts))


def cmd_eval(args: argparse.Namespace) -> None:
    execute(config_from_args(args, prune="none", retrain="none"), args)


# --- perp prune (issue 3): prune -> evaluate -> record, optionally save the pruned checkpoint -------


def add_prune_args(p: argparse.ArgumentParser) -> None:
    from .config import PRUNE_SCOPES
    from .pruning import METHODS

    g = p.add_argument_group("pruning (Sections 2.3, 3.3)")
    g.add_argument("--method", dest="prune", required=True, choices=METHODS,
                   help="criterion: magnitude (no data), wanda (|W|*||X||), sparsegpt (OBS solve + weight update)")  # fmt: skip
    g.add_argument("--sparsity", default=DEFAULTS.sparsity,
                   help="unstructured ratio in [0, 1) (0.5, 50%%) or N:M, N of every M inputs zeroed (2:4, 4:8)")  # fmt: skip
    g.add_argument("--scope", default=DEFAULTS.scope, choices=PRUNE_SCOPES,
                   help="compare scores per output row or per matrix; auto: Wanda per row, the others per matrix")  # fmt: skip
    g.add_argument("--calib", default=DEFAULTS.calib,
                   help="calibration text for wanda/sparsegpt: wiki-vital (embedded), c4, wikitext2 or a text file")  # fmt: skip
    g.add_argument("--nsamples", type=int, default=DEFAULTS.nsamples, help="calibration windows of --seqlen tokens")
    g.add_argument("--save", metavar="DIR", help="write the pruned model as a Hugging Face checkpoint (safetensors)")
    add_beyond_args(p)


def add_beyond_args(p: argparse.ArgumentParser) -> None:
    """Layer-wise allocation (OWL) and block-wise reconstruction (notebook 40), for prune and run."""
    g = p.add_argument_group("beyond the paper: OWL allocation, block-wise reconstruction")
    g.add_argument("--allocation", choices=["uniform", "owl"],
                   help="uniform: every layer at --sparsity (default); owl: per-block sparsities from outlier ratios "
                        "(unstructured only; needs calibration windows, also with magnitude)")  # fmt: skip
    g.add_argument("--owl-m", dest="owl_m", type=float, help=f"OWL outlier threshold M (default {DEFAULTS.owl_m:g})")
    g.add_argument("--owl-lambda", dest="owl_lambda", type=float,
                   help=f"OWL: block sparsities within ±λ of the target (default {DEFAULTS.owl_lambda:g})")  # fmt: skip
    g.add_argument("--reconstruct", metavar="GROUPS",
                   help="fit each pruned block to the dense block's outputs on the calibration windows, training "
                        "'+'-joined groups of weights, biases, norms, lora (zeros kept; LoRA merged per block)")  # fmt: skip
    g.add_argument("--reconstruct-steps", dest="reconstruct_steps", type=int,
                   help=f"AdamW steps per block (default {DEFAULTS.reconstruct_steps})")  # fmt: skip
    g.add_argument("--reconstruct-lr", dest="reconstruct_lr", type=float,
                   help=f"reconstruction learning rate (default {DEFAULTS.reconstruct_lr:g})")  # fmt: skip


def cmd_prune(args: argparse.Namespace) -> None:
    record = execute(config_from_args(args, retrain="none"), args, save=args.save)
    report = record.get("prune") or {}
    if report.get("layers"):
        layers = report["layers"].values()
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
        print(f"pruned {report['method']} {report['target']} ({report['scope']}): {len(layers)} layers, "
              f"sparsity {min(layers):.4f}-{max(layers):.4f} per layer; {phases}")  # fmt: skip
    if args.save:
        print(f"saved the pruned model to {args.save}")


# --- perp run (issue 4): prune -> retrain -> evaluate -> record, LLM or vision ----------------------


def add_run_llm_args(p: argparse.ArgumentParser) -> None:
    """The LLM pruning and retraining options of ``perp run``. Defaults are None so RunConfig's own
    defaults apply and options shared with the vision track (added after these) stay unambiguous."""
    from .config import (
        HEAD_MODES,
        LORA_KINDS,
        LORA_TARGET_SETS,
        PRUNE_METHODS,
        PRUNE_SCOPES,
        RETRAIN_GROUPS,
        RETRAIN_PRESETS,
    )

    g = p.add_argument_group("pruning (LLMs)")
    g.add_argument("--prune", help=f"criterion: {', '.join(PRUNE_METHODS)} (default {DEFAULTS.prune})")
    g.add_argument("--sparsity", help=f"ratio in [0, 1) or N:M, e.g. 0.5, 50%%, 2:4 (default {DEFAULTS.sparsity})")
    g.add_argument("--scope", choices=PRUNE_SCOPES, help="compare scores per output row or per matrix (default auto)")
    g.add_argument(
        "--calib", help=f"calibration text: wiki-vital, c4, wikitext2 or a text file (default {DEFAULTS.calib})"
    )
    g.add_argument("--nsamples", type=int, help=f"calibration windows (default {DEFAULTS.nsamples})")
    g = p.add_argument_group("retraining (LLMs; Sections 3.1-3.2)")
    g.add_argument("--retrain", help=f"preset {', '.join(RETRAIN_PRESETS)} or '+'-joined groups from "
                                     f"{', '.join(RETRAIN_GROUPS)} (e.g. norms+lora); none evaluates the pruned model")  # fmt: skip
    g.add_argument("--lora", choices=LORA_KINDS,
                   help="masked: update M*(sBA), merged at the end keeping every zero (default); plain: peft LoRA kept "
                        "unmerged, saved as an adapter beside the sparse base")  # fmt: skip
    g.add_argument("--lora-rank", type=int, help=f"LoRA rank (default {DEFAULTS.lora_rank})")
    g.add_argument("--lora-targets", choices=LORA_TARGET_SETS,
                   help="layers that get LoRA: paper = the set reproducing the paper's %% trainable for the family "
                        "(q,v on OPT, attention on Mixtral, every linear elsewhere; default), qv, attention, all = "
                        "every prunable linear (the released PERP code's list)")  # fmt: skip
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha, scale alpha/rank (default {DEFAULTS.lora_alpha:g})")
    g.add_argument("--head", choices=HEAD_MODES, help="the head group trains through LoRA (default) or fully")
    g.add_argument("--steps", type=int, help="optimizer steps of retraining (needed unless --retrain none)")
    g.add_argument(
        "--lr", type=float, help=f"initial learning rate, AdamW, 10%% warmup, linear decay (default {DEFAULTS.lr:g})"
    )
    g.add_argument("--batch-size", type=int, help=f"micro-batch in sequences (default {DEFAULTS.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {DEFAULTS.grad_accum})")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", type=float, help="fraction of steps of linear warmup (default 0.1)")
    g.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute activations in backward")
    g.add_argument("--train", help=f"training text: wiki-vital, c4 or a text file (default {DEFAULTS.train})")
    g.add_argument("--eval-every", type=int, help="also track held-out perplexity every K steps (Figure 3)")
    g.add_argument("--save", metavar="DIR",
                   help="write the final model as a Hugging Face checkpoint (plain LoRA: adapter in DIR/adapter)")  # fmt: skip
    add_beyond_args(p)


def cmd_run(args: argparse.Namespace) -> None:
    from .vision.cli import is_vision_model, run_from_args

    vision = bool(args.model) and is_vision_model(args.model)
    given = {d for d, v in vars(args).items() if v is not None and d not in ("func", "command")}
    foreign = sorted(given & (args.llm_only if vision else args.vision_only))
    if foreign:
        track = "LLMs" if vision else "vision models"
        raise ValueError(
            f"options {['--' + d.replace('_', '-') for d in foreign]} apply to {track} only, not to {args.model or DEFAULTS.model!r}"
        )
    if vision:
        run_from_args(args)
        return
    config = config_from_args(args)
    if config.retrain != "none" and config.steps == 0:
        raise ValueError(
            f"--retrain {config.retrain} needs --steps N > 0 (or --retrain none to evaluate the pruned model)"
        )
    record = execute(config, args, save=args.save)
    m = record["metrics"]
    if "sparsity_merged" in m:
        kind = f"{m['lora_kind']} LoRA" if m.get("lora_kind") else "no LoRA"
        print(f"retrained {config.retrain} ({kind}, {config.steps} steps): sparsity of the prunable layers "
              f"{m['sparsity_before']:.4f} before; after training {m['sparsity_effective']:.4f} of the weights "
              f"computed with, {m['sparsity_with_adapters']:.4f} of storage with adapters; "
              f"{m['sparsity_merged']:.4f} after merging")  # fmt: skip


# --- perp plan (issue 11): will a run fit? peak memory per device from the configuration alone ---


def add_plan_args(p: argparse.ArgumentParser) -> None:
    from . import config as cfg
    from .pruning import METHODS

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULTS.model,
                   help="embedded alias, a folder holding the model's config.json (nothing else is read), a Hugging "
                        "Face id in the local cache, or one of the paper's models (facebook/opt-1.3b ... opt-66b, "
                        "meta-llama/Llama-2-{7b,13b,70b}-hf, mistralai/Mistral-7B-v0.1) whose sizes perplib carries")  # fmt: skip
    g.add_argument("--dtype", default="bfloat16", choices=cfg.DTYPES,
                   help="weights dtype (default bfloat16: half weights, fp32 trainable parameters, autocast)")  # fmt: skip
    g = p.add_argument_group("retraining")
    g.add_argument("--retrain", default="perp",
                   help=f"preset {', '.join(cfg.RETRAIN_PRESETS)} or '+'-joined groups (default perp); Full IMP, "
                        "LN-Parameters and no retraining are always shown alongside")  # fmt: skip
    g.add_argument("--lora", default=DEFAULTS.lora, choices=cfg.LORA_KINDS, help="LoRA kind (the other is shown too)")
    g.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank, help="LoRA rank")
    if hasattr(cfg, "LORA_TARGET_SETS"):
        g.add_argument("--lora-targets", default=getattr(DEFAULTS, "lora_targets", None), choices=cfg.LORA_TARGET_SETS,
                       help="which prunable layers get LoRA (default: as a run)")  # fmt: skip
    g.add_argument(
        "--head", default=DEFAULTS.head, choices=cfg.HEAD_MODES, help="the head trains through LoRA or fully"
    )
    g.add_argument(
        "--seqlen",
        type=int,
        help="tokens per sequence (default: the model's context capped at 4096, as a run with seqlen null)",
    )
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="micro-batch in sequences (default 2)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass")
    g = p.add_argument_group("pruning step (block by block, one GPU)")
    g.add_argument("--prune", default="sparsegpt", choices=METHODS, help="criterion (default sparsegpt, the largest)")
    g.add_argument("--nsamples", type=int, default=DEFAULTS.nsamples, help="calibration windows (default 128)")
    g = p.add_argument_group("devices (hypothetical: perp plan reads no GPU)")
    g.add_argument("--gpus", type=int, default=1,
                   help="GPUs to plan for, whether or not this machine has them (default 1)")  # fmt: skip
    g.add_argument(
        "--gpu-memory", default="80GiB", metavar="SIZE", help="memory per GPU, e.g. 80GiB, 40GB (default 80GiB)"
    )
    g.add_argument("--headroom", type=float, default=0.1,
                   help="share of each GPU left free for the CUDA context and fragmentation (default 0.1)")  # fmt: skip
    g.add_argument(
        "--json", metavar="FILE", help="also write the plan (configuration, per method and component) to FILE"
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .memory import PlanSpec, estimate, table
    from .models import parse_size
    from .results import write_atomic

    spec = PlanSpec(
        model=args.model, dtype=args.dtype, seqlen=args.seqlen, batch_size=args.batch_size,
        grad_checkpointing=args.grad_checkpointing, retrain=args.retrain, lora=args.lora, lora_rank=args.lora_rank,
        head=args.head, prune=args.prune, nsamples=args.nsamples, gpus=args.gpus,
        gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"), headroom=args.headroom,
        **({"lora_targets": args.lora_targets} if getattr(args, "lora_targets", None) else {}),
    )  # fmt: skip
    plan = estimate(spec)
    print(plan.summary)
    print()
    print(table(plan))
    if args.json:
        write_atomic(Path(args.json), json.dumps(plan.as_record(), indent=1, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perp",
        description="PERP: prune LLMs and CNNs, retrain them parameter-efficiently, and measure them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a (dense) model",
                       description="Measure the perplexity of a model and record it in the results store.")  # fmt: skip
    add_model_args(p)
    add_placement_args(p)
    add_eval_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="prune an LLM (magnitude, Wanda, SparseGPT) and evaluate it",
                       description="Prune every linear layer of the decoder blocks, evaluate the perplexity and record "
                                   "the run (configuration, perplexity, sparsity per layer, timings).")  # fmt: skip
    add_model_args(p)
    add_placement_args(p)
    add_eval_args(p)
    add_prune_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("plan", help="will a run fit? peak memory per GPU from the model's configuration alone",
                       description="Estimate the peak memory of retraining (per method and component) and of "
                                   "block-by-block pruning from a model's config.json (no weights are read, no GPU "
                                   "is needed), and say how many GPUs of a given size each method needs.")  # fmt: skip
    add_plan_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="prune, retrain and evaluate an LLM or a vision model",
                       description="Prune a model, retrain it (parameter-efficiently), evaluate it and record the run. "
                                   "An LLM unless --model names a vision model.")  # fmt: skip
    add_model_args(p)
    add_placement_args(p)
    add_eval_args(p)
    add_run_llm_args(p)
    add_output_args(p)
    for action in p._actions:  # LLM defaults come from RunConfig; None marks an option as not given
        if action.dest not in ("help", "device"):
            action.default = None
    llm = {a.dest for a in p._actions}
    from .vision.cli import add_vision_args

    add_vision_args(p)
    p.set_defaults(
        func=cmd_run,
        llm_only=llm - {a.dest for a in add_vision_parser()._actions} - {"help", "device"},
        vision_only={a.dest for a in p._actions} - llm,
    )
    return parser


def add_vision_parser() -> argparse.ArgumentParser:
    from .vision.cli import build_parser as vision_parser

    return vision_parser()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):  # every command that computes: eval, prune, run
            from .runtime import from_args

            from_args(args)
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, FloatingPointError) as e:  # FloatingPointError: Diverged
        print(f"perp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``perp`` command. Each subcommand builds a validated configuration from its options, runs
it through the results store, prints a short summary and optionally writes the record as JSON.

    perp eval  --model smollm2-135m --eval wiki-vital --seqlen 512 --windows 64 --json out.json
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
                        "model folder, or a Hugging Face causal-LM id (e.g. facebook/opt-2.7b)")  # fmt: skip
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
    g.add_argument(
        "--windows",
        type=int,
        default=DEFAULTS.windows,
        help="evaluate the first K non-overlapping windows; 0 = all of them",
    )
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for sampling and training")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="also write the record (configuration, metrics, timings) to FILE")
    g.add_argument("--results", metavar="DIR", help="results store folder (default: $PERPLIB_RESULTS or ./results)")
    g.add_argument("--force", action="store_true", help="recompute even if a finished record exists")


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
    if args.force:
        store.path("llm", config).unlink(missing_ok=True)
    record = run_llm(config, store, device=args.device, save=save)
    summarize(record)
    if args.json:
        from pathlib import Path

        from .results import write_atomic

        write_atomic(Path(args.json), json.dumps(record, indent=1, sort_keys=True, default=str))
    return record


def summarize(record: dict[str, Any]) -> None:
    m, t = record["metrics"], record.get("timings", {})
    parts = [f"perplexity {m['perplexity']:.3f} over {m['tokens']} tokens ({m['windows']} windows)"]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perp",
        description="PERP: prune LLMs and CNNs, retrain them parameter-efficiently, and measure them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="perplexity of a (dense) model",
                       description="Measure the perplexity of a model and record it in the results store.")  # fmt: skip
    add_model_args(p)
    add_eval_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"perp {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

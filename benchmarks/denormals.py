"""Denormal floats in retraining: where they appear, what they cost, whether flushing them changes results.

    python benchmarks/denormals.py                                  # SmolLM2-135M and tiny-llama, 64-token steps
    python benchmarks/denormals.py --models tiny-llama --steps 12   # a quick run

For each model, method (Full IMP with its mask enforced, PERP with plain and with masked LoRA,
norms only) and learning rate, the script magnitude-prunes the model to 50% and runs the same
fixed retraining (``perplib.retrain.train_`` on wiki-vital training windows, AdamW, 10% warmup,
linear decay) twice, each in a fresh process: with denormals kept (``flush off``) and flushed to
zero on every thread (``flush on``, ``perplib.runtime.configure``). It prints

* the median and fastest step time off / on and their ratio (steps after ``--warmup-steps``, probe
  steps left out),
* at the probe steps (``--probes``, by default the first, middle and last step), the count and share
  of denormal values (read from the bits, see ``perplib.runtime.count_denormals``) in: the
  activations (outputs of every leaf module) and their gradients, the trainable parameters' gradients,
  AdamW's ``exp_avg`` and ``exp_avg_sq``, the LoRA B matrices, and every weight (after the step;
  Full IMP's masked weights included),
* the held-out perplexity after the retraining off vs on, and their relative difference (flushing
  changes values below 2^-126 only, so this should be float noise).

Every process sets the same torch thread count (``--threads``, default: the CPUs). Run it alone on
the machine: another torch process on the same cores slows both by up to 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import fresh  # benchmarks/fresh.py: measurements in fresh processes

METHODS = {  # name -> (parameter groups, LoRA kind)
    "full": (("full",), None),
    "perp-plain": (("biases", "norms", "head", "lora"), "plain"),
    "perp-masked": (("biases", "norms", "head", "lora"), "masked"),
    "norms": (("norms",), None),
}
TENSORS = ("activations", "activation_grads", "grads", "exp_avg", "exp_avg_sq", "lora_B", "weights")


class Probe:
    """Counts denormals at chosen optimizer steps (1-based), through forward hooks on every leaf
    module (outputs, and their gradients in backward) and a global optimizer step post-hook
    (parameter gradients, AdamW's state, LoRA B, every weight after the update)."""

    def __init__(self, model: torch.nn.Module, steps: set[int]) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from perplib.runtime import count_denormals

        self.count = count_denormals
        self.model, self.steps, self.step = model, steps, 1
        self.active = 1 in steps
        self.found: dict[int, dict[str, list[int]]] = {}
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.where: dict[int, dict[str, dict[str, int]]] = {}  # step -> tensor -> parameter -> denormals
        self.handles = [m.register_forward_hook(self._forward) for m in model.modules() if not any(m.children())]
        self.handles.append(register_optimizer_step_post_hook(self._after_step))

    def _add(self, name: str, x: torch.Tensor, parameter: str | None = None) -> None:
        if x.is_floating_point():
            entry = self.found.setdefault(self.step, {}).setdefault(name, [0, 0])
            count = self.count(x)
            entry[0] += count
            entry[1] += x.numel()
            if count and parameter is not None:
                self.where.setdefault(self.step, {}).setdefault(name, {})[parameter] = count

    def _forward(self, _module, _inputs, output) -> None:
        if not self.active:
            return
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                self._add("activations", out)
                if out.requires_grad:
                    out.register_hook(lambda g: self._add("activation_grads", g) if self.active else None)

    def _after_step(self, optimizer, _args, _kwargs) -> None:
        if self.active:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    name = self.names.get(id(p), "?")
                    if p.grad is not None:
                        self._add("grads", p.grad, name)
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in optimizer.state.get(p, {}):
                            self._add(key, optimizer.state[p][key], name)
            for name, p in self.model.named_parameters():
                self._add("lora_B" if "lora_B" in name else "weights", p, name)
        self.step += 1
        self.active = self.step in self.steps

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(job: dict) -> dict:
    """One (model, method, lr, flushing) retraining in this process."""
    from perplib import data, evaluation, runtime
    from perplib.lora import LoraSpec
    from perplib.models import load_model
    from perplib.pruning import prune_
    from perplib.retrain import TrainSettings, mark_trainable_, train_

    settings = runtime.configure(threads=job["threads"] or None, flush_denormals=job["flush"])
    model, tokenizer = load_model(job["model"], dtype="float32")
    prune_(model, "magnitude", job["sparsity"])
    groups, kind = METHODS[job["method"]]
    torch.manual_seed(0)
    marked = mark_trainable_(
        model, groups, lora=LoraSpec(kind=kind or "masked", rank=job["rank"], alpha=2.0 * job["rank"])
    )
    windows = data.sample_windows(tokenizer, "wiki-vital", job["steps"] * job["batch"], job["seqlen"], seed=0)
    train = TrainSettings(steps=job["steps"], lr=job["lr"], batch_size=job["batch"], grad_accum=1, warmup=0.1)
    probe = Probe(model, set(job["probes"]))
    try:
        result = train_(model, windows, train, masks=marked.masks, progress=False)
    finally:
        probe.close()
    ids = data.eval_ids(tokenizer, "wiki-vital", "eval")
    ppl = evaluation.perplexity(model, ids, job["eval_seqlen"], job["eval_windows"])
    tokens = job["batch"] * job["seqlen"]
    step_s = [tokens / h["tokens_per_s"] for h in result["history"] if "tokens_per_s" in h]
    timed = [s for i, s in enumerate(step_s, 1) if i > job["warmup_steps"] and i not in job["probes"]]
    return {
        **job,
        "runtime": settings,
        "step_s": step_s,
        "median_s": statistics.median(timed),
        "min_s": min(timed),
        "perplexity": ppl["perplexity"],
        "loss": result["loss"],
        "denormals": {str(k): v for k, v in sorted(probe.found.items())},
        "denormals_where": {str(k): v for k, v in sorted(probe.where.items())},
    }


def _share(entry: list[int] | None) -> str:
    if not entry or not entry[0]:
        return "0"
    return f"{entry[0]} ({entry[0] / entry[1]:.1e})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,tiny-llama", help="comma-separated (embedded/tiny aliases)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--lrs", default="1e-4", help="comma-separated learning rates (each a separate retraining)")
    parser.add_argument("--seqlen", type=int, default=64, help="tokens per training window (the issue's tiny size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the fixed retraining")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the step times")
    parser.add_argument("--probes", default="", help="steps whose denormals are counted (default: first, middle, last)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--sparsity", default="0.5", help="magnitude pruning before retraining")
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    parser.add_argument("--order", default="off,on", choices=["off,on", "on,off"],
                        help="which setting runs first (a repeat in the other order separates load from effect)")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    fresh.add_child_argument(parser)
    args = parser.parse_args(argv)
    if fresh.serve_child(args, measure):
        return 0

    methods = fresh.methods_option(parser, args.methods, METHODS)
    if args.steps <= args.warmup_steps + 3:
        parser.error(f"--steps must exceed --warmup-steps + 3 (probe steps are not timed), got {args.steps}")
    probes = [int(p) for p in args.probes.split(",")] if args.probes else sorted({1, args.steps // 2, args.steps})
    lrs = [float(lr) for lr in args.lrs.split(",")]
    print(f"batch {args.batch} x {args.seqlen} tokens, {args.steps} steps, probes at {probes}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    rows = []
    for model in args.models.split(","):
        for method in methods:
            for lr in lrs:
                pair = {}
                for flush in (False, True) if args.order == "off,on" else (True, False):
                    job = {
                        "model": model, "method": method, "lr": lr, "flush": flush, "seqlen": args.seqlen,
                        "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps,
                        "probes": probes, "rank": args.rank, "sparsity": args.sparsity,
                        "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "threads": args.threads,
                    }  # fmt: skip
                    pair[flush] = fresh.run_child(__file__, job, str(job))
                    rows.append(pair[flush])
                off, on = pair[False], pair[True]
                print(f"\n{model} {method} lr {lr:g}: step median {off['median_s']:.3f} s off / {on['median_s']:.3f} s "
                      f"on = {off['median_s'] / on['median_s']:.2f}x (fastest {off['min_s']:.3f} / {on['min_s']:.3f}); "
                      f"perplexity {off['perplexity']:.4f} off / {on['perplexity']:.4f} on "
                      f"(relative difference {on['perplexity'] / off['perplexity'] - 1:+.1e})", flush=True)  # fmt: skip
                print("  denormals (flush off; count (share)) at step: " + " | ".join(TENSORS))
                for step, found in off["denormals"].items():
                    print(f"    {step:>4s}: " + " | ".join(_share(found.get(t)) for t in TENSORS))
                for step, where in off["denormals_where"].items():
                    for tensor, params in where.items():
                        top = sorted(params.items(), key=lambda kv: -kv[1])[:3]
                        print(f"    step {step} {tensor}: " + ", ".join(f"{n} {c}" for n, c in top)
                              + (f" (+{len(params) - 3} more)" if len(params) > 3 else ""))  # fmt: skip
                left = sum(v[0] for found in on["denormals"].values() for v in found.values())
                print(f"  denormals left with flush on (all probes, all tensors): {left}")

    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(f"\n{'model':14s} {'method':12s} {'lr':>7s} {'median off':>10s} {'median on':>10s} {'off/on':>7s} "
          f"{'ppl off':>10s} {'ppl on':>10s} {'rel. diff':>9s}")  # fmt: skip
    pairs = zip(rows[::2], rows[1::2], strict=True)
    for off, on in pairs if args.order == "off,on" else ((b, a) for a, b in pairs):
        print(f"{off['model']:14s} {off['method']:12s} {off['lr']:7.0e} {off['median_s']:10.3f} {on['median_s']:10.3f} "
              f"{off['median_s'] / on['median_s']:7.2f} {off['perplexity']:10.4f} {on['perplexity']:10.4f} "
              f"{on['perplexity'] / off['perplexity'] - 1:+9.1e}")  # fmt: skip
    if args.json:
        from pathlib import Path

        from perplib.results import environment, write_atomic

        write_atomic(Path(args.json), json.dumps({"rows": rows, "environment": environment()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

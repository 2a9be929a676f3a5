"""Training throughput and peak memory of the retraining methods, next to a plain transformers + peft loop.

    python benchmarks/retrain_speed.py                                  # SmolLM2-135M, 1 x 256, fp32
    python benchmarks/retrain_speed.py --methods perp-plain --checkpointing off --steps 3   # quick

perplib's methods (``mark_trainable_`` then ``train_``, on the magnitude-pruned model):

- ``full``: Full IMP, every parameter trains, the pruning mask enforced at every step;
- ``perp-plain`` / ``perp-masked``: perplib's PERP (biases, norms, LoRA on the head and on every
  prunable linear), plain or masked LoRA;
- ``lora-norms``: plain LoRA on every prunable linear and the norms, i.e. the hf-lora trainable set;
- ``norms``: the norms only.

What a user would write without perplib (model from transformers, the same pruned weights, torch's
``AdamW`` with its defaults, a plain ``loss.backward(); opt.step(); opt.zero_grad()`` loop):
``hf-full``, ``hf-lora`` (peft's ``LoraConfig`` r 16, alpha 32 on q/k/v/o/gate/up/down plus the norm
weights), ``hf-norms``.

Every method runs in a fresh process (one method's memory cannot hide another's) on the same
batches (``--batch`` x ``--seqlen`` tokens), with the same thread count and denormal setting
(``perplib.runtime.configure``). Step times: ``--warmup-steps`` unmeasured, then ``--steps``
timed; the table gives the median and the fastest step. Peak memory: the process's peak RSS
(kernel high-water mark reset right before training; no sampling thread), absolute and above the
RSS at the start of training; ``torch.cuda.max_memory_allocated`` on a GPU. The load average is
recorded before and after each measurement.

A shared machine drifts by more than the differences measured (here: perp-plain alone at 162-215
tokens/s from one run to the next). ``--rounds N`` runs the whole list of methods N times, round
after round, each method once per round: the table then gives per method the median over rounds of
its median step (fastest step: the fastest of all; peak memory: the median), and each target
ratio is taken within each round, between processes that ran minutes apart, and reported as the
median over rounds with every round's value.

Targets (issue 12, median steps): perp-plain >= 1.4x full's tokens/s and >= 1.15x hf-lora's;
perp-masked's step <= 1.25x perp-plain's; perp-plain's peak memory with checkpointing <= 0.5x full's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

from perplib import runtime

import fresh  # benchmarks/fresh.py: measurements in fresh processes

PERP_METHODS = {  # name -> (parameter groups, LoRA kind)
    "full": (("full",), None),
    "perp-plain": (("biases", "norms", "head", "lora"), "plain"),
    "perp-masked": (("biases", "norms", "head", "lora"), "masked"),
    "lora-norms": (("norms", "lora"), "plain"),
    "norms": (("norms",), None),
}
HF_METHODS = ("hf-full", "hf-lora", "hf-norms")
METHODS = (*PERP_METHODS, *HF_METHODS)
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class HighWater:
    """Peak memory of a ``with`` block: the kernel's RSS high-water mark (reset on entry through
    ``/proc/self/clear_refs``), or the CUDA allocator's peak. Falls back to perplib's sampling
    ``PeakMemory`` where the high-water mark cannot be reset."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.peak, self.how = device, 0, 0, ""

    def __enter__(self) -> HighWater:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.how = torch.cuda.memory_allocated(self.device), "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.start, self.how = _status_kb("VmRSS") * 1024, "VmHWM"
        except OSError:
            from perplib.profiling import PeakMemory

            self._sampler = PeakMemory(self.device, interval=0.002).__enter__()
            self.start, self.how = self._sampler.start, "RSS sampled every 2 ms"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif hasattr(self, "_sampler"):
            self._sampler.__exit__(*exc)
            self.peak = self._sampler.peak
        else:
            self.peak = _status_kb("VmHWM") * 1024


def _windows(vocab: int, job: dict) -> torch.Tensor:
    n = (job["warmup_steps"] + job["steps"]) * job["batch"]
    return torch.randint(0, vocab, (n, job["seqlen"]), generator=torch.Generator().manual_seed(0))


def _load(job: dict, plain_transformers: bool):
    """The model as loaded for ``job``: through transformers itself for the hf-* loops (the embedded
    checkpoint's folder), through ``perplib.models.load_model`` otherwise."""
    from perplib.models import EMBEDDED, embedded_checkpoint, load_model

    if plain_transformers and not job["model"].startswith("tiny-"):
        from transformers import AutoModelForCausalLM

        source = embedded_checkpoint() if job["model"] == EMBEDDED else job["model"]
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, job["dtype"]))
    return load_model(job["model"], dtype=job["dtype"])[0]


@torch.no_grad()
def _magnitude_prune_(model: torch.nn.Module, sparsity: float) -> None:
    """Per-layer unstructured magnitude pruning of every linear in the decoder blocks, in plain torch
    (what a user would do before the hf-* loops; perplib's methods use ``perplib.pruning.prune_``)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight
            k = int(sparsity * w.numel())
            if k:
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > threshold)


def _hf_steps(job: dict, device: torch.device) -> tuple[list[float], int, int, HighWater]:
    """The loop a user writes with transformers + peft + torch, timed step by step."""
    model = _load(job, plain_transformers=True)
    _magnitude_prune_(model, float(job["sparsity"]))
    model.to(device)
    torch.manual_seed(0)
    if job["method"] == "hf-lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=job["rank"], lora_alpha=2 * job["rank"], lora_dropout=0.0,
                            target_modules=HF_LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, config)
    for name, p in model.named_parameters():
        if job["method"] == "hf-full":
            p.requires_grad_(True)
        elif "norm" in name:
            p.requires_grad_(True)
        elif job["method"] == "hf-norms":
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if job["checkpointing"]:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.get_input_embeddings().weight.shape[0]
    windows = _windows(vocab, job)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))
    batches = windows[order].view(-1, job["batch"], job["seqlen"])  # train_'s order for seed 0
    model.train()
    times = []
    fresh.release_freed_memory()
    with HighWater(device) as mem:
        for ids in batches:
            t0 = time.perf_counter()
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return times, sum(p.numel() for p in params), total, mem


def _perplib_steps(job: dict, device: torch.device) -> tuple[list[float], int, int, HighWater]:
    from perplib.lora import LoraSpec
    from perplib.pruning import prune_
    from perplib.retrain import TrainSettings, mark_trainable_, train_

    model = _load(job, plain_transformers=False)
    prune_(model, "magnitude", job["sparsity"])
    model.to(device)
    groups, kind = PERP_METHODS[job["method"]]
    torch.manual_seed(0)
    marked = mark_trainable_(
        model, groups, lora=LoraSpec(kind=kind or "masked", rank=job["rank"], alpha=2.0 * job["rank"])
    )
    windows = _windows(model.get_input_embeddings().weight.shape[0], job)
    settings = TrainSettings(
        steps=windows.shape[0] // job["batch"], lr=1e-5, batch_size=job["batch"], grad_accum=1, warmup=0.0,
        grad_checkpointing=job["checkpointing"],
    )  # fmt: skip
    fresh.release_freed_memory()  # loading and pruning leave freed heap in the RSS; measure from a clean start
    with HighWater(device) as mem:
        result = train_(model, windows, settings, masks=marked.masks, progress=False)
    tokens = job["batch"] * job["seqlen"]
    return [tokens / h["tokens_per_s"] for h in result["history"]], marked.trainable, marked.total, mem


def measure(job: dict) -> dict:
    """One method in this process: set up, train, time."""

    settings = runtime.apply(
        threads=job["threads"], flush_denormals=job["flush_denormals"], keep_freed_memory=job["keep_freed_memory"]
    )  # what is None comes from the environment
    device = torch.device(job["device"])
    load_before = os.getloadavg()
    run = _hf_steps if job["method"] in HF_METHODS else _perplib_steps
    times, trainable, total, mem = run(job, device)
    timed = times[job["warmup_steps"] :]
    tokens = job["batch"] * job["seqlen"]
    median = statistics.median(timed)
    return {
        **job,
        **settings,
        "trainable": trainable,
        "trainable_share": trainable / total,
        "step_s_all": times,
        "step_s_median": median,
        "step_s_min": min(timed),
        "tokens_per_s_median": tokens / median,
        "tokens_per_s_max": tokens / min(timed),
        "peak_bytes": mem.peak,
        "peak_above_start_bytes": mem.peak - mem.start,
        "peak_how": mem.how,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def _find(rows: list[dict], method: str, ckpt: bool) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["checkpointing"] == ckpt), None)


def _ratio(rows, num: str, den: str, ckpt: bool, key: str) -> float | None:
    a, b = _find(rows, num, ckpt), _find(rows, den, ckpt)
    return a[key] / b[key] if a and b else None


def combine(rows: list[dict]) -> list[dict]:
    """One row per (method, checkpointing) from the rows of every round (``round`` key): the median
    over rounds of the median step and of the peak memory, the fastest step of all."""
    combined = []
    for r in rows:
        if _find(combined, r["method"], r["checkpointing"]) is not None:
            continue
        same = [o for o in rows if o["method"] == r["method"] and o["checkpointing"] == r["checkpointing"]]
        tokens = r["batch"] * r["seqlen"]
        median = statistics.median(o["step_s_median"] for o in same)
        fastest = min(o["step_s_min"] for o in same)
        combined.append({
            **r, "rounds": len(same), "step_s_median": median, "step_s_min": fastest,
            "tokens_per_s_median": tokens / median, "tokens_per_s_max": tokens / fastest,
            "peak_bytes": statistics.median(o["peak_bytes"] for o in same),
            "peak_above_start_bytes": statistics.median(o["peak_above_start_bytes"] for o in same),
        })  # fmt: skip
    return combined


def round_ratios(rows: list[dict], num: str, den: str, ckpt: bool, key: str) -> list[float]:
    """``num``'s ``key`` over ``den``'s within each round that measured both."""
    ratios = []
    for i in sorted({r.get("round", 0) for r in rows}):
        value = _ratio([r for r in rows if r.get("round", 0) == i], num, den, ckpt, key)
        if value is not None:
            ratios.append(value)
    return ratios


def report(rows: list[dict]) -> list[str]:
    """The table (rounds combined) and the target lines (the median of the rounds' ratios)."""
    by_round, rows = rows, combine(rows)
    lines = [
        f"{'method':12s} {'ckpt':4s} {'trainable':>10s} {'tok/s med':>9s} {'tok/s max':>9s} {'step med':>8s} "
        f"{'step min':>8s} {'x full':>6s} {'x hf-lora':>9s} {'peak GB':>7s} {'x full':>6s} {'+train GB':>9s}"
    ]
    for r in rows:
        ckpt = r["checkpointing"]
        speed = _ratio(rows, r["method"], "full", ckpt, "tokens_per_s_median")
        vs_hf = _ratio(rows, r["method"], "hf-lora", ckpt, "tokens_per_s_median")
        memory = _ratio(rows, r["method"], "full", ckpt, "peak_bytes")
        lines.append(
            f"{r['method']:12s} {'on' if ckpt else 'off':4s} {100 * r['trainable_share']:9.3f}% "
            f"{r['tokens_per_s_median']:9.1f} {r['tokens_per_s_max']:9.1f} {r['step_s_median']:8.3f} "
            f"{r['step_s_min']:8.3f} {'-' if speed is None else f'{speed:.2f}':>6s} "
            f"{'-' if vs_hf is None else f'{vs_hf:.2f}':>9s} {r['peak_bytes'] / 1e9:7.2f} "
            f"{'-' if memory is None else f'{memory:.2f}':>6s} {r['peak_above_start_bytes'] / 1e9:9.2f}"
        )
    checks = [
        ("perp-plain / full tokens/s", "perp-plain", "full", "tokens_per_s_median", ">=", 1.4, (False, True)),
        ("perp-plain / hf-lora tokens/s", "perp-plain", "hf-lora", "tokens_per_s_median", ">=", 1.15, (False, True)),
        ("lora-norms / hf-lora tokens/s (same trainable set)", "lora-norms", "hf-lora", "tokens_per_s_median",
         ">=", 1.15, (False, True)),
        ("perp-masked / perp-plain step time", "perp-masked", "perp-plain", "step_s_median", "<=", 1.25,
         (False, True)),
        ("perp-plain / full peak memory", "perp-plain", "full", "peak_bytes", "<=", 0.5, (True,)),
    ]  # fmt: skip
    lines.append("")
    for label, num, den, key, op, target, ckpts in checks:
        for ckpt in ckpts:
            ratios = round_ratios(by_round, num, den, ckpt, key)
            if not ratios:
                continue
            value = statistics.median(ratios)
            met = value >= target if op == ">=" else value <= target
            each = f", rounds {', '.join(f'{v:.2f}' for v in ratios)}" if len(ratios) > 1 else ""
            lines.append(f"{label} (checkpointing {'on' if ckpt else 'off'}): {value:.2f}{each} "
                         f"(target {op} {target}: {'met' if met else 'NOT met'})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), tiny-llama, an HF id ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per method")
    parser.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps first (allocator, caches)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--sparsity", default="0.5", help="magnitude pruning before retraining")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, round after round")
    runtime.add_arguments(parser)  # --threads, --no-flush-denormals, ...: checked here, applied in every child
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    fresh.add_child_argument(parser)
    args = parser.parse_args(argv)
    if fresh.serve_child(args, measure):
        return 0

    methods = fresh.methods_option(parser, args.methods, METHODS)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"off": False, "on": True}
    ckpts = args.checkpointing.split(",")
    if any(c not in settings for c in ckpts):
        parser.error(f"--checkpointing takes off, on or off,on; got {args.checkpointing!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    rows = []
    print(f"{args.model} {args.dtype} on {device} ({os.cpu_count()} CPUs), batch {args.batch} x {args.seqlen} "
          f"tokens, {args.steps} timed steps after {args.warmup_steps}; load average {os.getloadavg()}",
          flush=True)  # fmt: skip
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
        for ckpt in ckpts:
            for method in methods:
                job = {
                    "model": args.model, "dtype": args.dtype, "device": device, "seqlen": args.seqlen,
                    "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps, "rank": args.rank,
                    "sparsity": args.sparsity, "method": method, "checkpointing": settings[ckpt],
                    "threads": args.threads, "flush_denormals": False if args.no_flush_denormals else None,
                    "keep_freed_memory": False if args.no_keep_freed_memory else None,
                }  # fmt: skip
                row = {**fresh.run_child(__file__, job, job["method"]), "round": round_}
                rows.append(row)
                print(f"  {method:12s} checkpointing {ckpt}: median {row['tokens_per_s_median']:.1f} tokens/s, "
                      f"steps {[round(t, 3) for t in row['step_s_all']]}, load {row['loadavg_before'][0]:.2f} -> "
                      f"{row['loadavg_after'][0]:.2f}", flush=True)  # fmt: skip
    first = rows[0]
    print(f"\ntorch threads {first['torch_threads']}, denormals flushed: {first['flush_denormals']}, freed memory "
          f"kept: {first['keep_freed_memory']}, peak memory: {first['peak_how']}; load average at the end "
          f"{os.getloadavg()}")  # fmt: skip
    print("\n".join(report(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

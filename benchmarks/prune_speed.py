"""How long does pruning take, relative to one forward pass over the same calibration data?

    python benchmarks/prune_speed.py                          # embedded model, 128 x 512 tokens
    python benchmarks/prune_speed.py --nsamples 16 --seqlen 256   # a quick run
    python benchmarks/prune_speed.py --eval wiki-vital --windows 64 --sparsity 2:4  # + perplexity

For each method the script reloads the model, prunes it with ``perplib.pruning.prune_`` and
prints the wall time as a multiple of one forward pass of the decoder (embeddings, all blocks, final
norm; no LM head, which pruning never runs) over the same windows in the same batches, timed in the
same run before and after the methods (``--forward-repeats`` times each; the median is the unit),
each phase as a multiple of that forward too (capture: the truncated forward to block 0, with
block 0's statistics; stats: the statistics passes through the dense blocks; solve: the criterion
or SparseGPT's solve; propagate: the calibration activations through the pruned blocks), the
perplexity after pruning when ``--eval`` is given (dense first), and the peak memory: process RSS
sampled every few ms on the CPU (absolute, and above the RSS with the model loaded),
``torch.cuda.max_memory_allocated`` on a GPU. perplib's CPU runtime settings (``--threads``,
``--no-flush-denormals``, ``--no-keep-freed-memory``; :mod:`perplib.runtime`) and the load average
before and after are printed and recorded.
Targets (issue 12, CPU): Wanda <= 2.0x, SparseGPT <= 2.3x, magnitude well under 1x (the floor of a
calibrated method is about two forwards: statistics from the dense block, propagation through the
pruned one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from perplib import data, evaluation, models, runtime
from perplib.adapters import adapter_for
from perplib.profiling import PeakMemory
from perplib.pruning import METHODS, prune_


def forward_seconds(model, calib: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """One pass of the decoder over the calibration windows, batched as the pruning driver does."""
    decoder = adapter_for(model).decoder_module(model)
    model.to(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in calib.split(batch_size):
            decoder(input_ids=batch.to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=models.EMBEDDED, help="embedded alias, local folder or HF id")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--sparsity", default="0.5", help="ratio or N:M; comma-separated for several (0.5,2:4)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--pairs", help="method=sparsity pairs instead of every combination, e.g. wanda=0.5,sparsegpt=2:4")
    p.add_argument("--calib", default="wiki-vital", help="calibration text source")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, ...")
    p.add_argument("--eval", metavar="SOURCE", help="also measure perplexity on this held-out text (not timed)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows of --seqlen tokens (with --eval)")
    p.add_argument("--no-dense", action="store_true", help="with --eval: skip the dense model's perplexity")
    p.add_argument("--forward-repeats", type=int, default=1, help="forward passes timed before and after (each)")
    runtime.add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    runs = [(s, m) for s in args.sparsity.split(",") for m in methods]
    if args.pairs:
        runs = [(spec.strip(), m.strip()) for m, _, spec in (pair.partition("=") for pair in args.pairs.split(","))]
        methods = [m for _, m in runs]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods must be a subset of {list(METHODS)}, got {bad}")
    if args.nsamples < 1 or args.seqlen < 2 or args.batch_size < 1:
        p.error("--nsamples and --batch-size must be >= 1, --seqlen >= 2")
    if args.forward_repeats < 1:
        p.error("--forward-repeats must be >= 1")
    try:
        settings = runtime.from_args(args)
    except ValueError as e:
        p.error(str(e))
    load_before = os.getloadavg()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    model, tokenizer = models.load_model(args.model, dtype=args.dtype)
    calib = data.sample_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    threads = settings["torch_threads"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} torch threads"
    print(
        f"model {args.model} ({args.dtype}), {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, "
        f"{where}; load average {load_before[0]:.2f}"
    )

    forward_seconds(model, calib[: args.batch_size], args.batch_size, device)  # warm-up (allocator, kernels)
    with PeakMemory(device) as mem:
        before = [forward_seconds(model, calib, args.batch_size, device) for _ in range(args.forward_repeats)]
    fwd = statistics.median(before)
    print(f"one calibration forward pass: {_seconds(before)} (peak {mem.peak / 2**20:.0f} MiB)", flush=True)
    rows = [{"method": "forward", "seconds": fwd, "ratio": 1.0, "peak_mib": mem.peak / 2**20}]
    eval_ids = data.eval_ids(tokenizer, args.eval) if args.eval else None

    def ppl(m) -> float:
        if eval_ids is None:
            return float("nan")
        return evaluation.perplexity(m.to(device), eval_ids, args.seqlen, args.windows)["perplexity"]

    if eval_ids is not None and not args.no_dense:
        rows[0]["perplexity"] = ppl(model)
        print(f"dense perplexity ({args.eval}, {args.windows} x {args.seqlen}): {rows[0]['perplexity']:.3f}")
    header = f"{'method':<10} {'sparsity':>8} {'prune s':>8}  {'peak MiB':>9} {'+MiB':>7}  {'ppl':>9}"
    print(f"\n{header}  phases (s)")
    for spec, method in runs:
        del model
        model, _ = models.load_model(args.model, dtype=args.dtype)
        if device.type == "cuda" and method == "magnitude":
            model.to(device)
        with torch.no_grad():  # fault in (copy-on-write) memory-mapped weights before measuring
            for param in model.parameters():
                param.add_(0)
        with PeakMemory(device) as mem:
            report = prune_(model, method, spec, calib, device=device, batch_size=args.batch_size)
        t = report.timings
        phases = " ".join(f"{k}={v:.1f}" for k, v in t.items() if k != "total" and v > 0)
        extra = (mem.peak - mem.start) / 2**20
        perplexity = ppl(model)
        print(f"{method:<10} {spec:>8} {t['total']:>8.2f}  {mem.peak / 2**20:>9.0f} {extra:>7.0f}  "
              f"{perplexity:>9.3f}  {phases}", flush=True)  # fmt: skip
        rows.append(
            {
                "method": method,
                "target": spec,
                "seconds": t["total"],
                "ratio": t["total"] / fwd,
                "peak_mib": mem.peak / 2**20,
                "extra_mib": extra,
                "timings": t,
                "sparsity": report.sparsity,
                "perplexity": perplexity,
            }
        )
    model.to("cpu")
    del model
    model, _ = models.load_model(args.model, dtype=args.dtype)
    forward_seconds(model, calib[: args.batch_size], args.batch_size, device)  # warm-up, as before
    after = [forward_seconds(model, calib, args.batch_size, device) for _ in range(args.forward_repeats)]
    fwd = statistics.median(before + after)
    load_after = os.getloadavg()
    print(f"\none calibration forward pass again: {_seconds(after)}; the unit below: median {fwd:.2f} s")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; runtime {settings}\n")
    print(f"{'method':<10} {'sparsity':>8} {'x fwd':>6} {'target':>7}  phases (x fwd)")
    for row in rows[1:]:
        row["ratio"] = row["seconds"] / fwd
        row["phases_x_forward"] = {k: v / fwd for k, v in row["timings"].items() if k != "total"}
        target = TARGETS.get(row["method"]) if device.type == "cpu" else None
        row["target_x_forward"] = target
        verdict = "" if target is None else ("ok" if row["ratio"] <= target else "MISSED")
        phases = " ".join(f"{k}={v:.2f}" for k, v in row["phases_x_forward"].items() if v > 0)
        print(f"{row['method']:<10} {row['target']:>8} {row['ratio']:>6.2f} {verdict:>7}  {phases}")
    rows[0].update(seconds=fwd, before=before, after=after)
    if args.json:
        record = {
            "args": vars(args),
            "device": where,
            "torch_threads": threads,
            "runtime": settings,
            "load_average": {"before": load_before, "after": load_after},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


# issue 12's targets on the CPU, in forwards (magnitude: "well under 1x", judged at 0.1x)
TARGETS = {"wanda": 2.0, "sparsegpt": 2.3, "magnitude": 0.1}


def _seconds(times: list[float]) -> str:
    return ", ".join(f"{t:.2f} s" for t in times)


if __name__ == "__main__":
    sys.exit(main())

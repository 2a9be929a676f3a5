"""How long does pruning take, relative to one forward pass over the same calibration data?

    python benchmarks/prune_speed.py                          # embedded model, 128 x 512 tokens
    python benchmarks/prune_speed.py --nsamples 16 --seqlen 256   # a quick run
    python benchmarks/prune_speed.py --eval wiki-vital --windows 64 --sparsity 2:4  # + perplexity

For each method the script reloads the model, prunes it with ``perplib.pruning.prune_`` and
prints the wall time as a ratio to one forward pass of the decoder (embeddings, all blocks, final
norm; no LM head, which pruning never runs) over the same windows in the same batches, the time
per phase, the perplexity after pruning when ``--eval`` is given (dense first), and the peak memory: process RSS sampled every few ms on the CPU (absolute, and above
the RSS with the model loaded), ``torch.cuda.max_memory_allocated`` on a GPU.
Targets (issue 3): Wanda <= 2.5x, SparseGPT <= 3.5x, magnitude well under 1x.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from perplib import data, evaluation, models
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
    p.add_argument("--calib", default="wiki-vital", help="calibration text source")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, ...")
    p.add_argument("--eval", metavar="SOURCE", help="also measure perplexity on this held-out text (not timed)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows of --seqlen tokens (with --eval)")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods must be a subset of {list(METHODS)}, got {bad}")
    if args.nsamples < 1 or args.seqlen < 2 or args.batch_size < 1:
        p.error("--nsamples and --batch-size must be >= 1, --seqlen >= 2")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    model, tokenizer = models.load_model(args.model, dtype=args.dtype)
    calib = data.sample_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"model {args.model} ({args.dtype}), {args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}, {where}"
    )

    forward_seconds(model, calib[: args.batch_size], args.batch_size, device)  # warm-up (allocator, kernels)
    with PeakMemory(device) as mem:
        fwd = forward_seconds(model, calib, args.batch_size, device)
    print(f"one calibration forward pass: {fwd:.2f} s (peak {mem.peak / 2**20:.0f} MiB)", flush=True)
    rows = [{"method": "forward", "seconds": fwd, "ratio": 1.0, "peak_mib": mem.peak / 2**20}]
    eval_ids = data.eval_ids(tokenizer, args.eval) if args.eval else None

    def ppl(m) -> float:
        if eval_ids is None:
            return float("nan")
        return evaluation.perplexity(m.to(device), eval_ids, args.seqlen, args.windows)["perplexity"]

    if eval_ids is not None:
        rows[0]["perplexity"] = ppl(model)
        print(f"dense perplexity ({args.eval}, {args.windows} x {args.seqlen}): {rows[0]['perplexity']:.3f}")
    header = f"{'method':<10} {'sparsity':>8} {'prune s':>8} {'x fwd':>6}  {'peak MiB':>9} {'+MiB':>7}  {'ppl':>9}"
    print(f"\n{header}  phases (s)")
    for spec, method in [(s, m) for s in args.sparsity.split(",") for m in methods]:
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
        print(f"{method:<10} {spec:>8} {t['total']:>8.2f} {t['total'] / fwd:>6.2f}  {mem.peak / 2**20:>9.0f} {extra:>7.0f}  "
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
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

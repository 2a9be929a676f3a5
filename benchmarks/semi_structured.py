"""2:4 semi-structured sparse linear layers against dense ones on a GPU (Section 3.3's 2:4 pattern).

    python benchmarks/semi_structured.py                          # OPT/LLaMA-like shapes, 2048 tokens, bf16
    python benchmarks/semi_structured.py --shapes 4096x4096 --tokens 4096 --dtype float16

A weight pruned to 2:4 by magnitude (``perplib.sparsity.nm_mask``) is converted with
``torch.sparse.to_sparse_semi_structured`` and ``F.linear(x, W)`` is timed with CUDA events
against the same product with the dense pruned weight, side by side (median of ``--repeats``
after warm-up). Prints dense / sparse time (> 1: the sparse kernel is faster) and the largest
difference between the two outputs. Needs an NVIDIA GPU of compute capability 8.0 or newer (sparse
tensor cores); elsewhere every shape is reported as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def support() -> str | None:
    """None when 2:4 sparse kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.{minor} < 8.0 (no sparse tensor cores)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


def _time(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure(out_features: int, in_features: int, tokens: int, dtype: str = "bfloat16", repeats: int = 50) -> dict:
    """One shape: dense and 2:4 sparse ``F.linear`` times, their ratio and the output difference."""
    from perplib.sparsity import nm_mask

    row = {"out": out_features, "in": in_features, "tokens": tokens, "dtype": dtype}
    why = support()
    if why:
        return {**row, "skipped": why}
    dt = _DTYPES[dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=dt, generator=gen)
    weight = weight * nm_mask(weight.abs().float(), 2, 4).to(dt)
    x = torch.randn(tokens, in_features, device="cuda", dtype=dt, generator=gen)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(weight)
        dense_s = _time(lambda: F.linear(x, weight), repeats)
        sparse_s = _time(lambda: F.linear(x, sparse), repeats)
        diff = (F.linear(x, weight).float() - F.linear(x, sparse).float()).abs().max().item()
    except (RuntimeError, NotImplementedError) as e:  # kernels missing for this GPU or dtype
        return {**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {**row, "dense_s": dense_s, "sparse_s": sparse_s, "speedup": dense_s / sparse_s, "max_abs_diff": diff,
            "backend": "cutlass" if getattr(type(sparse), "_FORCE_CUTLASS", False) else type(sparse).__name__}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,28672x7168",
                   help="comma-separated OUTxIN weight shapes (default: LLaMA-2-7B attention and MLP, OPT-30B fc1)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=2048, help="rows of the input (batch x seqlen)")
    p.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    shapes = []
    for s in args.shapes.split(","):
        try:
            out_f, in_f = (int(v) for v in s.lower().split("x"))
        except ValueError:
            p.error(f"--shapes takes OUTxIN pairs like 4096x11008, got {s!r}")
        shapes.append((out_f, in_f))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"2:4 sparse vs dense F.linear on {device}, {args.tokens} tokens, {args.dtype}")
    rows = [measure(o, i, args.tokens, args.dtype, args.repeats) for o, i in shapes]
    print(f"{'shape':>12s} {'dense ms':>9s} {'2:4 ms':>9s} {'dense/2:4':>9s} {'max |diff|':>10s}")
    for r in rows:
        shape = f"{r['out']}x{r['in']}"
        if "skipped" in r:
            print(f"{shape:>12s} skipped: {r['skipped']}")
        else:
            print(f"{shape:>12s} {1e3 * r['dense_s']:9.3f} {1e3 * r['sparse_s']:9.3f} {r['speedup']:9.2f} "
                  f"{r['max_abs_diff']:10.3g}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

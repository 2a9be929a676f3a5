"""Training throughput and peak memory of the retraining methods (Section 3.2's throughput comparison).

    python benchmarks/retrain_speed.py                           # SmolLM2-135M, batch 1 x 256, fp32
    python benchmarks/retrain_speed.py --model tiny-llama --steps 3   # a quick run

For full retraining (Full IMP, mask enforced), PERP with plain LoRA, PERP with masked LoRA and
norms only, each with and without gradient checkpointing, the script magnitude-prunes the model to
50%, sets the method up with ``perplib.retrain.mark_trainable_``, runs ``perplib.retrain.train_``
and prints training tokens/s (of the fastest step after ``--warmup-steps`` unmeasured ones: other
processes on a shared machine only ever add time) and peak memory, with
ratios to full retraining in the same checkpointing setting, and masked LoRA's step time over plain
LoRA's. Every measurement runs in a fresh process so one method's memory cannot hide another's.
Peak memory: process RSS sampled every 2 ms during training on the CPU (absolute, as a plain
HF + peft measurement reports it, after returning freed heap to the OS, and above the RSS right
before training),
``torch.cuda.max_memory_allocated`` on a GPU.

Targets (issue 4): plain-LoRA PERP >= 1.8x full tokens/s and <= 0.5x full's peak memory with
checkpointing on both; masked LoRA's step time <= 1.5x plain LoRA's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from perplib.profiling import PeakMemory

METHODS = {  # name -> (parameter groups, LoRA kind)
    "full": (("full",), None),
    "perp-plain": (("biases", "norms", "head", "lora"), "plain"),
    "perp-masked": (("biases", "norms", "head", "lora"), "masked"),
    "norms": (("norms",), None),
}


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so RSS reflects live memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(job: dict) -> dict:
    """One method in this process: prune, set up, train, time."""
    from perplib.lora import LoraSpec
    from perplib.models import load_model
    from perplib.pruning import prune_
    from perplib.retrain import TrainSettings, mark_trainable_, train_

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    model, _ = load_model(job["model"], dtype=job["dtype"])
    prune_(model, "magnitude", job["sparsity"])
    model.to(device)
    groups, kind = METHODS[job["method"]]
    torch.manual_seed(0)
    marked = mark_trainable_(
        model, groups, lora=LoraSpec(kind=kind or "masked", rank=job["rank"], alpha=2.0 * job["rank"])
    )
    steps = job["warmup_steps"] + job["steps"]
    vocab = model.get_input_embeddings().weight.shape[0]
    windows = torch.randint(0, vocab, (steps * job["batch"], job["seqlen"]), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(
        steps=steps, lr=1e-5, batch_size=job["batch"], grad_accum=1, warmup=0.0,
        grad_checkpointing=job["checkpointing"],
    )  # fmt: skip
    release_freed_memory()  # loading and pruning leave freed heap in the RSS; measure from a clean start
    with PeakMemory(device, interval=0.002) as mem:
        result = train_(model, windows, settings, masks=marked.masks, progress=False)
    timed = result["history"][job["warmup_steps"] :]
    step_s = sorted(job["batch"] * job["seqlen"] / h["tokens_per_s"] for h in timed)
    return {
        **job,
        "trainable_share": marked.share,
        "step_s": step_s[0],  # other processes on the machine only ever add time: the fastest step is the cost
        "step_s_all": step_s,
        "tokens_per_s": job["batch"] * job["seqlen"] / step_s[0],
        "peak_bytes": mem.peak,
        "peak_above_start_bytes": mem.peak - mem.start,
        "torch_threads": torch.get_num_threads(),
    }


def run_child(job: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring {job['method']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), tiny-llama, an HF id ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per method")
    parser.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps first (allocator, caches)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--sparsity", default="0.5", help="magnitude pruning before retraining")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per measurement (0: torch's default)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0

    methods = args.methods.split(",")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        parser.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"off": False, "on": True}
    rows = []
    print(f"{args.model} {args.dtype} on {device} ({os.cpu_count()} CPUs), batch {args.batch} x {args.seqlen} tokens, "
          f"{args.steps} measured steps after {args.warmup_steps}", flush=True)  # fmt: skip
    for ckpt in args.checkpointing.split(","):
        if ckpt not in settings:
            parser.error(f"--checkpointing takes off, on or off,on; got {ckpt!r}")
        for method in methods:
            job = {
                "model": args.model, "dtype": args.dtype, "device": device, "seqlen": args.seqlen,
                "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup_steps, "rank": args.rank,
                "sparsity": args.sparsity, "method": method, "checkpointing": settings[ckpt], "threads": args.threads,
            }  # fmt: skip
            row = run_child(job)
            rows.append(row)
            print(f"  measured {method:12s} checkpointing {ckpt}: {row['tokens_per_s']:.1f} tokens/s", flush=True)

    print(f"\n{'method':12s} {'ckpt':4s} {'trainable':>9s} {'tokens/s':>9s} {'x full':>7s} {'step s':>7s} "
          f"{'peak GB':>8s} {'x full':>7s} {'+train GB':>9s}")  # fmt: skip
    for row in rows:
        full = next((r for r in rows if r["method"] == "full" and r["checkpointing"] == row["checkpointing"]), None)
        speed = f"{row['tokens_per_s'] / full['tokens_per_s']:.2f}" if full else "-"
        memory = f"{row['peak_bytes'] / full['peak_bytes']:.2f}" if full else "-"
        print(
            f"{row['method']:12s} {'on' if row['checkpointing'] else 'off':4s} {100 * row['trainable_share']:8.3f}% "
            f"{row['tokens_per_s']:9.1f} {speed:>7s} {row['step_s']:7.3f} {row['peak_bytes'] / 1e9:8.2f} "
            f"{memory:>7s} {row['peak_above_start_bytes'] / 1e9:9.2f}"
        )
    for ckpt in (False, True):
        plain = next((r for r in rows if r["method"] == "perp-plain" and r["checkpointing"] == ckpt), None)
        masked = next((r for r in rows if r["method"] == "perp-masked" and r["checkpointing"] == ckpt), None)
        if plain and masked:
            print(f"masked / plain LoRA step time (checkpointing {'on' if ckpt else 'off'}): "
                  f"{masked['step_s'] / plain['step_s']:.2f} (target <= 1.5)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`perp plan`'s memory estimate against measured peaks, method x gradient checkpointing.

    python benchmarks/plan_vs_measured.py                        # SmolLM2-135M, fp32, 1 x 512 tokens, CPU
    python benchmarks/plan_vs_measured.py --model tiny-llama --seqlen 64   # a quick run
    python benchmarks/plan_vs_measured.py --device cuda --dtype bfloat16    # on a GPU

For full retraining (Full IMP, mask enforced), PERP with plain and with masked LoRA, and norms
only, each with and without gradient checkpointing, a fresh process loads the model, magnitude-
prunes it to 50%, sets the method up as a run does (``perplib.memory.mark_as_run``) and trains
``--steps`` optimizer steps of ``--grad-accum`` micro-batches (gradients then live alongside the
next micro-batch's activations, as in the paper's setting; AdamW's moments exist from the first
step on). Measured peak: on the CPU the process RSS sampled every 2 ms
(``perplib.profiling.PeakMemory``) above the RSS after imports, with glibc returning every
allocation of 64 KiB or more to the OS when freed (``MALLOC_MMAP_THRESHOLD_``), so the RSS follows
live tensors rather than the allocator's cache; on a GPU ``torch.cuda.max_memory_allocated``.
The estimate is ``perplib.memory.plan_method`` for the same settings on one device: nothing in it
is fitted to these measurements (activations are counted with saved-tensor hooks on a narrow copy
of the configuration). Target (issue 11): every ratio within 0.75-1.25.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import fresh  # benchmarks/fresh.py: measurements in fresh processes

METHODS = {  # name -> (retrain preset or groups, LoRA kind)
    "full": ("full", "masked"),
    "perp-plain": ("perp", "plain"),
    "perp-masked": ("perp", "masked"),
    "norms": ("norms", "masked"),
}
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


def _weights_only(name: str, dtype: str, config) -> torch.nn.Module:
    """The model as ``load_model`` builds it, without its tokenizer (host memory a plan does not count)."""
    from transformers import AutoModelForCausalLM

    from perplib import models

    if name.startswith("tiny-"):
        return models.tiny_model(name.removeprefix("tiny-"), vocab_size=config.vocab_size).to(models._DTYPES[dtype])
    source = models.embedded_checkpoint() if name == models.EMBEDDED else name
    return AutoModelForCausalLM.from_pretrained(source, dtype=models._DTYPES[dtype]).eval()


def measure(job: dict) -> dict:
    """One method in this process: load, prune, set up, train; peak memory above the start."""
    from perplib.config import retrain_groups
    from perplib.memory import PlanSpec, mark_as_run
    from perplib.models import load_model, model_config
    from perplib.profiling import PeakMemory, rss_bytes
    from perplib.pruning import prune_
    from perplib.retrain import TrainSettings, train_

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    retrain, kind = METHODS[job["method"]]
    spec = PlanSpec(model=job["model"], dtype=job["dtype"], seqlen=job["seqlen"], batch_size=job["batch"],
                    grad_checkpointing=job["checkpointing"], retrain=retrain, lora=kind)  # fmt: skip
    # The runtime is not the model: import and exercise every code path once on a toy model (autograd
    # engine, thread pools, fused AdamW, peft), read the configuration (and so the tokenizer) first.
    warm, _ = load_model("tiny-llama", dtype=job["dtype"])
    warm_marked = mark_as_run(warm, retrain_groups(retrain), spec, kind)
    warm_settings = TrainSettings(steps=1, batch_size=1, grad_accum=1, grad_checkpointing=job["checkpointing"])
    train_(warm.to(device), torch.randint(0, 100, (1, 8)), warm_settings, masks=warm_marked.masks, progress=False)
    config = model_config(job["model"])
    del warm, warm_marked
    fresh.release_freed_memory()
    base = rss_bytes()
    with PeakMemory(device, interval=0.002) as mem:
        model = _weights_only(job["model"], job["dtype"], config)
        prune_(model, "magnitude", "0.5", device=device)
        model.to(device)
        torch.manual_seed(0)
        marked = mark_as_run(model, retrain_groups(retrain), spec, kind)
        vocab = model.get_input_embeddings().weight.shape[0]
        n = job["steps"] * job["grad_accum"] * job["batch"]
        windows = torch.randint(0, vocab, (n, job["seqlen"]), generator=torch.Generator().manual_seed(0))
        settings = TrainSettings(steps=job["steps"], lr=1e-5, batch_size=job["batch"], grad_accum=job["grad_accum"],
                                 warmup=0.0, grad_checkpointing=job["checkpointing"])  # fmt: skip
        train_(model, windows, settings, masks=marked.masks, progress=False)
    peak = mem.peak if device.type == "cuda" else mem.peak - base
    return {**job, "measured_bytes": peak, "baseline_rss_bytes": base}


def estimate(job: dict) -> dict:
    from perplib.memory import PlanSpec, plan_method

    retrain, kind = METHODS[job["method"]]
    spec = PlanSpec(model=job["model"], dtype=job["dtype"], seqlen=job["seqlen"], batch_size=job["batch"],
                    grad_checkpointing=job["checkpointing"], retrain=retrain, lora=kind)  # fmt: skip
    plan = plan_method(spec, retrain, kind)
    return {"estimate_bytes": plan.total, "components": plan.components}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--checkpointing", default="off,on", help="off, on, or off,on")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per measurement")
    parser.add_argument("--json", metavar="FILE", help="also write every row (configuration, estimate, measurement)")
    fresh.add_child_argument(parser)
    args = parser.parse_args(argv)
    if fresh.serve_child(args, measure):
        return 0
    methods = fresh.methods_option(parser, args.methods, METHODS)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but no GPU is visible")
    settings = {"off": False, "on": True}
    rows = []
    print(f"{args.model} {args.dtype} on {args.device}, batch {args.batch} x {args.seqlen} tokens, "
          f"{args.steps} steps x {args.grad_accum} micro-batches", flush=True)  # fmt: skip
    for ckpt in args.checkpointing.split(","):
        if ckpt not in settings:
            parser.error(f"--checkpointing takes off, on or off,on; got {ckpt!r}")
        for method in methods:
            job = {"model": args.model, "dtype": args.dtype, "device": args.device, "seqlen": args.seqlen,
                   "batch": args.batch, "grad_accum": args.grad_accum, "steps": args.steps, "method": method,
                   "checkpointing": settings[ckpt], "threads": args.threads}  # fmt: skip
            row = {**fresh.run_child(__file__, job, job["method"], env={**os.environ, **_MALLOC}), **estimate(job)}
            row["ratio"] = row["estimate_bytes"] / row["measured_bytes"]
            rows.append(row)
            print(f"  {method:12s} checkpointing {ckpt}: estimate {row['estimate_bytes'] / 2**20:8.0f} MiB, "
                  f"measured {row['measured_bytes'] / 2**20:8.0f} MiB", flush=True)  # fmt: skip

    print(f"\n{'method':12s} {'ckpt':4s} {'estimate MiB':>12s} {'measured MiB':>12s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['method']:12s} {'on' if r['checkpointing'] else 'off':4s} {r['estimate_bytes'] / 2**20:12.0f} "
              f"{r['measured_bytes'] / 2**20:12.0f} {r['ratio']:6.2f}")  # fmt: skip
    inside = [0.75 <= r["ratio"] <= 1.25 for r in rows]
    print(f"within +-25%: {sum(inside)}/{len(rows)}")
    if args.json:
        from pathlib import Path

        from perplib.results import environment, write_atomic

        write_atomic(Path(args.json), json.dumps({"rows": rows, "environment": environment()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

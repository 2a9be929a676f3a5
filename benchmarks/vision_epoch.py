"""Epoch time and peak memory of each vision retraining method, with ratios to Full IMP (paper
Section 3.1: the methods' cost; Section 3.2 reports the same comparison in tokens/s for OPT).

Each method runs in a fresh process (spawn) so one method's allocator caches cannot hide another's
peak. The model is pruned globally but not pretrained: cost does not depend on the weights' values.
The first epoch is a warm-up and not timed. BN-Recalibrate is one forward pass over the training
split (no gradients). On CPU, peak memory is the peak resident-set increase during the epochs,
sampled every 5 ms; on a GPU it is the peak CUDA allocation.

PERP runs as ``perp-plain`` (the paper's unmerged LoRA) and ``perp-masked`` (perplib's); both use
the conv LoRA autograd function of :mod:`perplib.vision.lora`, which keeps no kernel-sized tensor
for the backward.

    python benchmarks/vision_epoch.py --model resnet18-half --data fashion-mnist --train-subset 5000 --threads 2
    python benchmarks/vision_epoch.py --model resnet50 --data imagenet --data-root /data/imagenet --device cuda
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

METHODS = ["bn-recalibrate", "biases", "bn-parameters", "linear-probing", "perp-plain", "perp-masked", "full"]


def measure(args: dict, method: str, queue) -> None:
    import torch

    from perplib.lora import LoraSpec
    from perplib.profiling import PeakMemory
    from perplib.vision.data import load_vision_data
    from perplib.vision.models import build_model
    from perplib.vision.pruning import prune_
    from perplib.vision.retrain import base_parameter_count, prepare_, recalibrate_bn_, train_epochs_

    torch.set_num_threads(args["threads"] or torch.get_num_threads())
    data = load_vision_data(
        args["data"], args["data_root"], train_subset=args["train_subset"], num_workers=args["workers"]
    )
    model = build_model(args["model"], num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size).to(args["device"])  # fmt: skip
    masks = prune_(model, args["sparsity"])
    base = base_parameter_count(model)
    if method == "bn-recalibrate":
        batches = list(data.batches("train", args["batch_size"], limit=args["max_batches"]))  # data ready, untimed
        with PeakMemory(args["device"]) as mem:
            start = time.perf_counter()
            recalibrate_bn_(model, batches, args["device"])
            if args["device"].startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        queue.put({"method": method, "epoch_time_s": seconds, "peak_memory_mb": mem.peak_mb, "trainable_share": 0.0})
        return
    kind = method.split("-")[1] if method.startswith("perp-") else "masked"
    spec = LoraSpec(kind=kind, rank=args["lora_rank"], alpha=float(args["lora_rank"]))
    trainable = prepare_(model, method.split("-")[0] if method.startswith("perp") else method, spec)
    stats = train_epochs_(model, data, epochs=2, lr_fn=lambda t: 0.01, batch_size=args["batch_size"], masks=masks,
                          device=args["device"], max_batches=args["max_batches"])  # fmt: skip
    queue.put({"method": method, "epoch_time_s": stats["epoch_times_s"][-1], "peak_memory_mb": stats["peak_memory_mb"],
               "trainable_share": trainable / base})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18-half")
    p.add_argument("--data", default="fashion-mnist", help="digits | fashion-mnist | imagenet")
    p.add_argument("--data-root")
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=None, help="cap on batches per epoch")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--lora-rank", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (ImageFolder data)")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = vars(p.parse_args(argv))
    from perplib.vision.data import available

    args["data"] = available(args["data"], fallback="digits", root=args["data_root"])
    ctx = mp.get_context("spawn")
    rows = []
    for method in args["methods"]:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args, method, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(
            f"{method:>15}: {rows[-1]['epoch_time_s']:.2f} s/epoch, peak {rows[-1]['peak_memory_mb']:.1f} MiB",
            flush=True,
        )
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["time_vs_full"] = r["epoch_time_s"] / full["epoch_time_s"] if full else None
        r["memory_vs_full"] = r["peak_memory_mb"] / full["peak_memory_mb"] if full and full["peak_memory_mb"] else None
    import pandas as pd

    df = pd.DataFrame(rows)
    print(f"\n{args['model']} on {args['data']} ({args['train_subset']} images, batch {args['batch_size']}, "
          f"sparsity {args['sparsity']}, device {args['device']}):")  # fmt: skip
    print(df.to_markdown(index=False, floatfmt=".3g"))
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump({"args": args, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

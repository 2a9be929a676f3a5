"""The prepared GPU check (issue 11): every GPU code path once, on the embedded model in bf16.

Run it through ``benchmarks/gpu_check.sh`` (sets the offline environment and the 10-minute limit);
``--smoke`` runs the same steps on the CPU with a tiny model and small sizes, to check the check.

Steps, each timed and marked PASS / FAIL / SKIP, all recorded in ``<out>/gpu_check.json``:

1. environment: the GPU, its compute capability, bf16 support;
2. dense perplexity (``perp eval``);
3. pruning with magnitude, Wanda and SparseGPT, unstructured 50% and 2:4 (``perp prune``): the
   achieved sparsity is 0.5 and the perplexity finite;
4. pruning through an accelerate device map that puts blocks on the GPU, in CPU offload and on
   disk (``--gpu-memory/--cpu-memory/--offload-folder``): the same perplexity as step 3's Wanda;
5. retraining for a few steps (``perp run``): PERP with masked and with plain LoRA, Full IMP, with
   gradient checkpointing; no pruned weight revived, finite loss and perplexity;
6. ``benchmarks/plan_vs_measured.py`` on the GPU (``perp plan``'s estimate against
   ``torch.cuda.max_memory_allocated``), ``benchmarks/retrain_speed.py`` and
   ``benchmarks/prune_speed.py`` at small sizes, and once more feeding one calibration sequence at a
   time (as the reference code does): perplib's batched Wanda and SparseGPT against that, as a factor;
7. ``benchmarks/semi_structured.py``: a 2:4 linear through ``torch.sparse.to_sparse_semi_structured``
   against the dense one, where the GPU supports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


class Check:
    """Runs the steps, keeps going after a failure, and records what each step printed and found."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.steps: list[dict] = []

    def step(self, name: str, fn, *args, **kwargs) -> dict | None:
        left = self.budget_s - (time.perf_counter() - self.start)
        if left < 20:
            self.steps.append({"step": name, "status": "SKIP", "why": f"time budget spent ({self.budget_s:.0f} s)"})
            print(f"[SKIP] {name}: time budget spent", flush=True)
            return None
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            found = fn(*args, **kwargs) or {}
            status = found.pop("status", "PASS")
        except Exception as e:  # a failing step is reported, the check goes on
            traceback.print_exc()
            found, status = {"error": f"{type(e).__name__}: {e}"}, "FAIL"
        row = {"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), **found}
        self.steps.append(row)
        print(f"[{status}] {name} ({row['seconds']} s) {json.dumps(found, default=str)[:400]}", flush=True)
        return found

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps({"steps": self.steps}, indent=1, default=str))


def cli(argv: list[str], out: Path, name: str) -> dict:
    """``perp <argv> --json <out>/<name>.json`` in this process; the record it wrote."""
    from perplib.cli import main

    path = out / f"{name}.json"
    rc = main([*argv, "--json", str(path)])
    if rc != 0:
        raise RuntimeError(f"perp {' '.join(argv)} exited with {rc}")
    return json.loads(path.read_text())


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU is visible (CUDA_VISIBLE_DEVICES? driver?)")
        free, total = torch.cuda.mem_get_info()
        info |= {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                 "bf16": torch.cuda.is_bf16_supported(), "free_gib": round(free / 2**30, 1),
                 "total_gib": round(total / 2**30, 1), "gpus": torch.cuda.device_count()}  # fmt: skip
    return info


def script(args: list[str], out: Path, name: str, timeout: float) -> dict:
    """A benchmark script in its own process (they measure memory per process); its tail and JSON."""
    path = out / f"{name}.json"
    proc = subprocess.run([sys.executable, *args, "--json", str(path)], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return {"json": str(path)}


def placement_budget(model: str, dtype: str, gpu: bool) -> list[str]:
    """--gpu-memory/--cpu-memory that put blocks on each of GPU, CPU (offloaded) and disk."""
    from perplib.models import _empty_model

    empty = _empty_model(model, dtype)
    size = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in empty.named_modules()}
    from perplib.adapters import adapter_for

    adapter = adapter_for(empty)
    blocks = [size[adapter.block_prefix(i)] for i in range(len(adapter.blocks(empty)))]
    rest = size[""] - sum(blocks)
    third = sum(blocks) // 3
    if gpu:  # embeddings, head and a third of the blocks on the GPU, a third offloaded to the CPU
        return ["--gpu-memory", str(rest + third + max(blocks)), "--cpu-memory", str(third)]
    return ["--gpus", "0", "--cpu-memory", str(rest + third + max(blocks))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--text", default="wiki-vital", help="calibration, training and evaluation text")
    p.add_argument("--out", default="build/gpu_check", help="folder for records, logs and gpu_check.json")
    p.add_argument("--budget", type=float, default=570, help="seconds; later steps are skipped beyond it")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, small sizes: checks the check itself")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PERPLIB_RESULTS", str(out / "results"))
    device = "cpu" if args.smoke else "cuda"
    seqlen, windows, nsamples, steps = (64, 4, 8, 2) if args.smoke else (512, 32, 32, 8)
    check = Check(out, args.budget)
    base = ["--model", args.model, "--dtype", args.dtype, "--device", device, "--seqlen", str(seqlen),
            "--windows", str(windows), "--eval", args.text]  # fmt: skip

    env = check.step("environment", environment, device)
    if env is None or "error" in env:
        check.write()
        return 1
    dense = check.step(
        "dense perplexity", lambda: {"perplexity": cli(["eval", *base], out, "dense")["metrics"]["perplexity"]}
    )

    pruned: dict[str, float] = {}

    def prune(method: str, sparsity: str) -> dict:
        record = cli(["prune", *base, "--method", method, "--sparsity", sparsity, "--calib", args.text,
                      "--nsamples", str(nsamples)], out, f"prune-{method}-{sparsity.replace(':', 'of')}")  # fmt: skip
        m = record["metrics"]
        pruned[f"{method} {sparsity}"] = m["perplexity"]
        ok = abs(m["sparsity"] - 0.5) < 1e-3 and math.isfinite(m["perplexity"])
        return {"status": "PASS" if ok else "FAIL", "sparsity": m["sparsity"], "perplexity": m["perplexity"],
                "prune_s": record["timings"].get("prune_s")}  # fmt: skip

    for method in ("magnitude", "wanda", "sparsegpt"):
        for sparsity in ("0.5", "2:4"):
            check.step(f"prune {method} {sparsity}", prune, method, sparsity)

    def offloaded() -> dict:
        budget = placement_budget(args.model, args.dtype, gpu=not args.smoke)
        record = cli(["prune", *base, "--method", "wanda", "--sparsity", "0.5", "--calib", args.text,
                      "--nsamples", str(nsamples), *budget, "--offload-folder", str(out / "offload"), "--force"],
                     out, "prune-wanda-offloaded")  # fmt: skip
        got, want = record["metrics"]["perplexity"], pruned.get("wanda 0.5")
        ok = want is not None and math.isclose(got, want, rel_tol=1e-3)
        return {"status": "PASS" if ok else "FAIL", "perplexity": got, "in_memory": want, "budget": budget,
                "offload_files": len(list((out / "offload").glob("*.safetensors")))}  # fmt: skip

    check.step("prune wanda 0.5 through a device map (GPU + CPU offload + disk)", offloaded)

    def retrain(method: str, kind: str) -> dict:
        record = cli(["run", *base, "--prune", "magnitude", "--sparsity", "0.5", "--calib", args.text,
                      "--train", args.text, "--retrain", method, "--lora", kind, "--steps", str(steps),
                      "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-4", "--grad-checkpointing", "--force"],
                     out, f"run-{method}-{kind}")  # fmt: skip
        r, m = record["retrain"], record["metrics"]
        kept = r["sparsity_merged"] >= r["sparsity_before"] - 1e-9 if method == "full" or kind == "masked" else True
        ok = kept and math.isfinite(m["perplexity"]) and math.isfinite(r["train_loss"])
        return {"status": "PASS" if ok else "FAIL", "perplexity": m["perplexity"],
                "pruned_perplexity": pruned.get("magnitude 0.5"), "loss": r["train_loss"],
                "sparsity_before": r["sparsity_before"], "sparsity_merged": r["sparsity_merged"],
                "tokens_per_s": r["train_tokens_per_s"]}  # fmt: skip

    for method, kind in (("perp", "masked"), ("perp", "plain"), ("full", "masked")):
        check.step(f"retrain {method}" + (f" ({kind} LoRA)" if method == "perp" else ""), retrain, method, kind)

    common = ["--model", args.model, "--dtype", args.dtype, "--device", device]
    if args.smoke:
        plan_args = ["--seqlen", "64", "--batch", "1", "--methods", "perp-masked", "--checkpointing", "on"]
        speed_args = ["--seqlen", "64", "--steps", "1", "--warmup-steps", "0", "--methods", "full,perp-plain",
                      "--checkpointing", "on"]  # fmt: skip
        prune_size, batched = ["--nsamples", "4", "--seqlen", "64"], 4
        prune_args = [*prune_size, "--methods", "magnitude,wanda", "--sparsity", "0.5"]
    else:
        plan_args = ["--seqlen", "512", "--batch", "2", "--threads", "8"]
        speed_args = ["--seqlen", "512", "--batch", "2", "--steps", "3", "--warmup-steps", "1",
                      "--methods", "full,perp-plain,perp-masked,hf-lora"]  # fmt: skip
        prune_size, batched = ["--nsamples", "32", "--seqlen", "512"], 8
        prune_args = [*prune_size, "--sparsity", "0.5,2:4"]

    def plan_vs_measured() -> dict:
        found = script([str(HERE / "plan_vs_measured.py"), *common, *plan_args], out, "plan_vs_measured", 240)
        rows = json.loads(Path(found["json"]).read_text())["rows"]
        ratios = {f"{r['method']} ckpt {'on' if r['checkpointing'] else 'off'}": round(r["ratio"], 3) for r in rows}
        if args.smoke:  # a few MiB of runtime noise dominate a tiny model's peak: the ratio is not judged
            return {"status": "PASS", "estimate/measured": ratios, "note": "not judged at smoke sizes"}
        ok = all(0.75 <= v <= 1.25 for v in ratios.values())
        return {"status": "PASS" if ok else "FAIL", "estimate/measured": ratios}

    check.step("perp plan against measured peaks", plan_vs_measured)
    check.step(
        "retrain_speed.py", script, [str(HERE / "retrain_speed.py"), *common, *speed_args], out, "retrain_speed", 420
    )
    check.step("prune_speed.py", script, [str(HERE / "prune_speed.py"), *common, *prune_args], out, "prune_speed", 120)

    def batched_vs_one() -> dict:
        """Wanda and SparseGPT batched (``--batch-size``) against one sequence at a time."""
        one_args = [*prune_size, "--methods", "wanda,sparsegpt", "--sparsity", "0.5"]
        times = {}
        for batch in (1, batched):
            found = script([str(HERE / "prune_speed.py"), *common, *one_args, "--batch-size", str(batch)], out,
                           f"prune_speed_batch{batch}", 120)  # fmt: skip
            rows = json.loads(Path(found["json"]).read_text())["rows"]
            times[batch] = {r["method"]: r["seconds"] for r in rows if r["method"] != "forward"}
        factor = {m: round(times[1][m] / times[batched][m], 2) for m in times[1]}
        return {"seconds_one_at_a_time": times[1], f"seconds_batch_{batched}": times[batched],
                "one_at_a_time/batched": factor}  # fmt: skip

    check.step("prune speed: batched vs one sequence at a time", batched_vs_one)

    def semi_structured() -> dict:
        sys.path.insert(0, str(HERE))
        from semi_structured import measure, support

        why = support()
        if why:
            return {"status": "SKIP", "why": why}
        rows = [measure(o, i, 2048, "bfloat16" if args.dtype == "float32" else args.dtype) for o, i in
                [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 7168)]]  # fmt: skip
        (out / "semi_structured.json").write_text(json.dumps(rows, indent=1))
        timed = [r for r in rows if "speedup" in r]
        return {"status": "PASS" if timed else "SKIP",
                "dense/2:4": {f"{r['out']}x{r['in']}": round(r.get("speedup", float("nan")), 2) for r in rows},
                "skipped": [r["skipped"] for r in rows if "skipped" in r][:1]}  # fmt: skip

    check.step("2:4 semi-structured linear vs dense", semi_structured)

    check.write()
    print("\nGPU check summary" + (" (CPU smoke run)" if args.smoke else ""))
    for row in check.steps:
        print(f"  [{row['status']}] {row['step']} ({row.get('seconds', '-')} s)")
    print(f"total {time.perf_counter() - check.start:.0f} s; details in {out / 'gpu_check.json'}")
    if dense:
        print(
            f"dense perplexity {dense.get('perplexity')}; pruned: "
            + ", ".join(f"{k} {v:.2f}" for k, v in pruned.items())
        )
    return 1 if any(r["status"] == "FAIL" for r in check.steps) else 0


if __name__ == "__main__":
    sys.exit(main())

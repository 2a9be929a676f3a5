"""Experiments as functions that return records: the one pipeline behind the CLI and every
LLM notebook (prune -> retrain -> evaluate), run through the results store so that reruns reuse
finished runs and interrupted ones resume."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from .config import RunConfig
from .results import ResultStore

KIND = "llm"
# "context-length sequences" (Section 2.3): seqlen None is the model's context, capped as the PERP code
SEQLEN_CAP = 4096


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None: the first GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def context_seqlen(model: str) -> int:
    """The paper's sequence length for ``model``: its context (``max_position_embeddings``: 2048 for
    OPT, 4096 for LLaMA-2), capped at :data:`SEQLEN_CAP` (Mistral's 32k) as the PERP code."""
    from . import models

    context = getattr(models.model_config(model), "max_position_embeddings", None)
    if not context:
        raise ValueError(f"seqlen None means the model's context, but the config of {model!r} does not say it "
                         "(no max_position_embeddings): give seqlen explicitly")  # fmt: skip
    return min(int(context), SEQLEN_CAP)


def resolve(config: RunConfig) -> RunConfig:
    """``config`` with ``seqlen=None`` replaced by :func:`context_seqlen`: records are keyed, and
    runs reused, by the sequence length actually used."""
    return config if config.seqlen is not None else config.replace(seqlen=context_seqlen(config.model))


def validate(config: RunConfig, placement: dict | None = None) -> None:
    """Checks that need the model's configuration or the text sources, done before any weights
    are loaded: text sources exist, ``seqlen`` fits the model's context, a device map (``placement``:
    ``load_model``'s ``device_map``/``max_memory``/``offload_folder``) resolves and suits the run."""
    from transformers import AutoConfig

    from . import data, dryrun, models

    for source in {config.eval, config.calib, config.train}:
        data.check_source(source)
    if config.model.startswith("tiny-"):
        family = config.model.removeprefix("tiny-")
        if family not in models.TINY_FAMILIES:
            raise ValueError(
                f"unknown model {config.model!r}: tiny models are {[f'tiny-{f}' for f in models.TINY_FAMILIES]}"
            )
        cfg = models.tiny_config(family)
    elif config.model == models.EMBEDDED or models.is_gguf(config.model):
        cfg = AutoConfig.from_pretrained(models.source(config.model))
    else:
        try:
            cfg = AutoConfig.from_pretrained(dryrun.resolve_model(config.model))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"unknown model {config.model!r}: not an embedded alias {models.known_aliases()}, not a local model "
                f"folder, and not a Hugging Face id available here. Cause: {e}"
            ) from None
    from .adapters import check_causal_lm

    check_causal_lm(cfg)  # a model perplib cannot treat as a decoder-only causal LM fails here, naming why
    context = getattr(cfg, "max_position_embeddings", None)
    if context and config.seqlen > context:
        raise ValueError(f"seqlen {config.seqlen} exceeds the context length of {config.model} ({context})")
    if placement and placement.get("device_map") is not None:
        resolved = models.resolve_device_map(config.model, dtype=config.dtype, device_map=placement["device_map"],
                                             max_memory=placement.get("max_memory"))  # fmt: skip
        models.check_offload_folder(resolved, placement.get("offload_folder"))
        offloaded = models.offloads(resolved)
        if offloaded and config.retrain != "none" and config.steps > 0:
            raise ValueError(
                f"retraining needs every weight resident on a GPU or the CPU, but the device map offloads "
                f"{len(offloaded)} modules (e.g. {offloaded[0]!r}) to {resolved[offloaded[0]]!r}: give the run more "
                "--gpus/--gpu-memory (`perp plan` says how many), or prune with offload and retrain the saved model"
            )


def _execute(
    config: RunConfig,
    device: torch.device,
    save: str | None,
    placement: dict | None = None,
    store: ResultStore | None = None,
) -> dict[str, Any]:
    from . import data, evaluation, models, offload

    torch.manual_seed(config.seed)
    timings: dict[str, float] = {}
    out: dict[str, Any] = {}

    t0 = time.perf_counter()
    model, tokenizer = models.load_model(config.model, dtype=config.dtype, **(placement or {}))
    # a device-mapped model stays where accelerate put it; pruning visits `device` block by block
    dispatched = offload.is_dispatched(model)
    bos, bos_id = data.resolve_bos(config.bos, getattr(model.config, "model_type", None), tokenizer)
    ids = data.eval_ids(tokenizer, config.eval, config.eval_split, bos=bos, seqlen=config.seqlen)
    eval_bos = bos_id if bos == "window" else None
    timings["load_s"] = time.perf_counter() - t0

    if config.prune != "none":
        from .pruning import prune_

        t0 = time.perf_counter()
        calib = None
        # magnitude needs no calibration data, unless OWL or reconstruction does
        if config.prune != "magnitude" or config.allocation != "uniform" or config.reconstruct:
            calib = data.sample_windows(
                tokenizer, config.calib, config.nsamples, config.seqlen, seed=config.seed, bos=bos
            )
        extra = _beyond_arguments(config, model, calib, device, store, timings)
        t0 += timings.get("owl_ratios_new_s", 0.0)  # measured ratios are counted apart, in owl_ratios_s
        timings.pop("owl_ratios_new_s", None)
        # PruneReport.as_dict() carries "sparsity" (overall achieved), per-layer sparsity and phase times
        report = prune_(model, config.prune, config.sparsity, calib, scope=config.scope, device=device, **extra)
        timings["prune_s"] = time.perf_counter() - t0
        out["prune"] = report.as_dict() if hasattr(report, "as_dict") else asdict(report)
        if extra.get("hooks"):
            out["reconstruct"] = extra["hooks"][0].summary()

    if config.retrain != "none" and config.steps > 0:
        from .retrain import retrain_

        if not dispatched:
            model.to(device)
        t0 = time.perf_counter()
        # the final perplexity is measured below, on the deployed (merged) model; history gets it then
        retrained = retrain_(model, tokenizer, config, eval_ids=ids, eval_every=config.eval_every, evaluate_last=False)
        timings["retrain_s"] = time.perf_counter() - t0
        timings.update({k: v for k, v in retrained["timings"].items() if k != "retrain_s"})
        out["retrain"] = retrained["metrics"]
        out["history"] = retrained["history"]

    if not dispatched:
        model.to(device)
    t0 = time.perf_counter()
    metrics = evaluation.perplexity(model, ids, config.seqlen, config.windows, bos_id=eval_bos)
    metrics["bos"] = bos  # the resolved mode (the config has the one asked for)
    timings["eval_s"] = time.perf_counter() - t0
    if not math.isfinite(metrics["perplexity"]):  # never record a NaN: say what went wrong instead
        if "history" in out:
            from .retrain import Diverged

            last = out["history"][-1]
            raise Diverged(
                f"training diverged: held-out perplexity of the retrained model is {metrics['perplexity']} after "
                f"step {last['step']} (lr {last.get('lr', config.lr):.3g}); lower --lr"
            )
        raise FloatingPointError(
            f"held-out perplexity of the {'dense' if config.prune == 'none' else 'pruned'} model is "
            f"{metrics['perplexity']}: its outputs are not finite in {config.dtype}"
        )
    if config.zero_shot_tasks:
        t0 = time.perf_counter()
        metrics.update(evaluation.zero_shot(model, tokenizer, config.zero_shot_tasks))
        timings["zero_shot_s"] = time.perf_counter() - t0
    if "prune" in out:
        metrics["sparsity"] = out["prune"].get("sparsity")
    if config.eval_every and out.get("history"):
        out["history"][-1]["perplexity"] = metrics["perplexity"]
    if out.get("retrain", {}).get("lora_targets"):  # the set asked for is in the config; here what it named
        metrics["lora_set"] = out["retrain"]["lora_targets"]["resolved"]
        metrics["lora_modules"] = ",".join(out["retrain"]["lora_targets"]["modules"])
    for key in ("lora_kind", "trainable_params", "trainable_share", "sparsity_before", "sparsity_effective",
                "sparsity_with_adapters", "sparsity_merged", "train_loss", "train_tokens_per_s"):  # fmt: skip
        if key in out.get("retrain", {}):
            metrics[key] = out["retrain"][key]
    if save:
        # masked LoRA is merged by now (a plain sparse checkpoint); plain LoRA: sparse base + peft adapter
        from .lora import save_pretrained

        save_pretrained(model, save, tokenizer)
        out["saved_to"] = str(save)
    return {"metrics": metrics, "timings": timings, **out}


def _beyond_arguments(config, model, calib, device, store, timings) -> dict[str, Any]:
    """``prune_``'s allocation and hooks for notebook 40's methods. OWL's outlier ratios depend on
    the dense model, the calibration windows and M only: they are measured once and kept as their
    own record (kind ``owl-ratios``); every run that reuses them carries their cost in
    ``timings['owl_ratios_s']``."""
    extra: dict[str, Any] = {}
    if config.allocation != "uniform":
        from .allocation import Allocation, outlier_ratios

        key = {k: getattr(config, k) for k in ("model", "dtype", "calib", "nsamples", "seqlen", "seed", "owl_m")}

        def measure() -> dict[str, Any]:
            got = outlier_ratios(model, calib, config.owl_m, device=device)
            return {"ratios": got["ratios"], "timings": {"ratios_s": got["seconds"]}}

        ratios = store.run("owl-ratios", key, measure) if store is not None else {**measure(), "reused": False}
        timings["owl_ratios_s"] = ratios["timings"]["ratios_s"]
        if not ratios["reused"]:
            timings["owl_ratios_new_s"] = ratios["timings"]["ratios_s"]
        extra["allocation"] = Allocation(config.allocation, config.owl_m, config.owl_lambda)
        extra["outlier_ratios"] = ratios["ratios"]
    if config.reconstruct:
        from .reconstruct import Reconstruction, ReconstructSpec, parse_groups
        from .retrain import lora_spec

        spec = ReconstructSpec(parse_groups(config.reconstruct), config.reconstruct_steps, config.reconstruct_lr,
                               lora_spec(config))  # fmt: skip
        extra["hooks"] = [Reconstruction(spec)]
    return extra


def run_llm(
    config: RunConfig,
    store: ResultStore | None = None,
    *,
    device: str | torch.device | None = None,
    save: str | None = None,
    force: bool = False,
    placement: dict | None = None,
) -> dict[str, Any]:
    """Prune, retrain and evaluate one configuration, or reuse its finished record.

    ``save`` writes the final model as a Hugging Face checkpoint (this always recomputes, since a
    stored record holds no weights); ``force`` recomputes too. A finished record is replaced only
    once the new run has finished; a run that fails (e.g. ``Diverged``) writes nothing. ``placement``:
    ``load_model``'s ``device_map``, ``max_memory`` and ``offload_folder`` for models larger than one
    device (not part of the record's key: where the weights sit does not change the result)."""
    from .retrain import check_half_precision

    config = resolve(config)
    validate(config, placement)
    device = resolve_device(device)
    check_half_precision(config.dtype, device)
    store = store if store is not None else ResultStore()
    return store.run(
        KIND, config, lambda: _execute(config, device, save, placement, store), force=force or save is not None
    )


def describe(config: RunConfig, base: RunConfig | None = None) -> str:
    """The fields of ``config`` that differ from ``base`` (default: RunConfig())."""
    base = base or RunConfig()
    return " ".join(f"{k}={v}" for k, v in asdict(config).items() if getattr(base, k) != v) or "defaults"


def run_grid(
    configs: Sequence[RunConfig] | Iterable[RunConfig],
    store: ResultStore | None = None,
    *,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """Run every configuration (reusing finished ones), one progress line per run."""
    configs = list(configs)
    store = store if store is not None else ResultStore()
    records = []
    for i, config in enumerate(configs, 1):
        config = resolve(config)
        t0 = time.perf_counter()
        record = run_llm(config, store, device=device)
        status = "reused" if record.get("reused") else f"{time.perf_counter() - t0:.0f}s"
        print(
            f"[{i}/{len(configs)}] {describe(config)}: ppl={record['metrics']['perplexity']:.2f} ({status})", flush=True
        )
        records.append(record)
    return records

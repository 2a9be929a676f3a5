"""Vision experiments as records: pretrain (cached) -> prune -> retrain -> evaluate
(paper Section 3.1, Figures 1, 2, 4; Section 3.4, Table 12; Appendix A).

``run_vision(config, store)`` returns one record with the whole :class:`VisionConfig`, dense,
pruned and retrained accuracy, trainable share, sparsity after merging, epoch time and peak
memory. Pretraining is itself a record (kind ``vision-pretrain``) whose weights are cached under
``perplib.paths.cache_dir()/vision`` by configuration, so it runs once.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .. import paths
from ..lora import LoraSpec
from ..results import ResultStore, config_key
from . import data as vdata
from .freezing import GradualFreezer, cycle_sparsities
from .lora import MaskedLoRAConv, merge_conv_lora_
from .models import VISION_MODELS, accuracy, build_model, first_conv_name, has_batchnorm
from .pruning import ALLOCATIONS, model_sparsity, parse_ratio, prunable_weights, prune_, relative_change
from .retrain import (
    METHOD_LABELS,
    METHODS,
    TRAINED,
    base_parameter_count,
    check_method,
    prepare_,
    recalibrate_bn_,
    train_epochs_,
)
from .schedules import SCHEDULES, allr_factor, pretrain_lr, retrain_lr

FREEZE_MODES = ("none", "freeze", "unfreeze")
EVAL_BATCH = 512


def _int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _choice(name: str, value: Any, allowed: Iterable) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """Dense pretraining (Table 3: SGD, momentum 0.9, weight decay 1e-4, LR linear from lr to 0)."""

    model: str = "resnet-tiny"
    data: str = "digits"
    data_root: str | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    seed: int = 0
    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class VisionConfig:
    """One vision prune-retrain run. Defaults: a seconds-long run on digits; the paper's values
    are the ImageNet profile's (resnet50, 90 pretraining epochs, batch 256, lr 0.1)."""

    model: str = field(default="resnet-tiny", metadata={"help": f"one of {VISION_MODELS}"})
    data: str = field(default="digits", metadata={"help": "digits | fashion-mnist | imagenet"})
    data_root: str | None = field(default=None, metadata={"help": "dataset folder (imagenet: train/ and val/)"})
    train_subset: int | None = field(default=None, metadata={"help": "cap on training images (seeded)"})
    test_subset: int | None = field(default=None, metadata={"help": "cap on test images (seeded)"})
    seed: int = field(default=0, metadata={"help": "seed of splits, initialisation and shuffling"})
    # pretraining (Appendix A.1, Table 3)
    pretrain_epochs: int = field(default=90, metadata={"help": "dense training epochs"})
    batch_size: int = field(default=256, metadata={"help": "batch size for pretraining and retraining"})
    lr: float = field(default=0.1, metadata={"help": "maximal (pretraining) learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "SGD weight decay"})
    # pruning (Appendix A.2)
    prune: str = field(default="global", metadata={"help": f"allocation: {ALLOCATIONS}, or none (dense)"})
    sparsity: float = field(default=0.9, metadata={"help": "final fraction of prunable weights removed, in [0, 1)"})
    # retraining (Section 3.1)
    retrain: str = field(default="perp", metadata={"help": f"one of {METHODS}"})
    epochs: int = field(default=1, metadata={"help": "retraining epochs per prune-retrain cycle"})
    schedule: str = field(default="allr", metadata={"help": f"retraining LR schedule: {SCHEDULES}"})
    warmup: float = field(default=0.05, metadata={"help": "warmup fraction of a retraining cycle (allr/slr/clr/llr)"})
    lora_rank: int = field(default=10, metadata={"help": "PERP LoRA rank (paper: 1, 2, 5, 10)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "PERP LoRA alpha; None: alpha = rank"})
    recal_batches: int | None = field(default=None, metadata={"help": "BN-Recalibrate batches (None: one epoch)"})
    recalibrate: bool = field(
        default=True,
        metadata={"help": "re-estimate BN statistics after retraining too: every method includes BN-Recalibrate"},
    )
    # magnitude conservation (Section 3.4)
    cycles: int = field(default=1, metadata={"help": "prune-retrain cycles to reach the sparsity"})
    freeze: str = field(default="none", metadata={"help": "none | freeze (start full) | unfreeze (start frozen)"})
    reverse: bool = field(default=False, metadata={"help": "switch layers from the output side first"})

    def __post_init__(self) -> None:
        _choice("model", self.model, VISION_MODELS)
        _choice("data", self.data, vdata.DATASETS)
        if self.data == "imagenet" and not self.data_root:
            raise ValueError("data 'imagenet' needs data_root, a folder holding train/<class>/ and val/<class>/")
        _int("train_subset", self.train_subset, 10, optional=True)
        _int("test_subset", self.test_subset, 1, optional=True)
        _int("seed", self.seed, 0)
        _int("pretrain_epochs", self.pretrain_epochs, 1)
        _int("batch_size", self.batch_size, 1)
        _int("epochs", self.epochs, 0)
        _int("lora_rank", self.lora_rank, 1)
        _int("recal_batches", self.recal_batches, 1, optional=True)
        _int("cycles", self.cycles, 1)
        for name in ("lr", "momentum", "weight_decay", "warmup"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        _choice("prune", self.prune, ("none", *ALLOCATIONS))
        parse_ratio(self.sparsity)
        if self.prune == "none" and (self.sparsity != 0 or self.cycles != 1):
            raise ValueError(f"prune 'none' keeps the model dense: sparsity must be 0 and cycles 1, "
                             f"got sparsity {self.sparsity!r}, cycles {self.cycles}")  # fmt: skip
        _choice("retrain", self.retrain, METHODS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("freeze", self.freeze, FREEZE_MODES)
        if self.retrain in TRAINED and self.epochs < 1:
            raise ValueError(f"retrain method '{self.retrain}' needs epochs >= 1, got {self.epochs}")
        if self.freeze != "none" and self.retrain != "full":
            raise ValueError(
                f"gradual freezing (freeze={self.freeze!r}) applies to retrain 'full', got {self.retrain!r}"
            )
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0 or None, got {self.lora_alpha!r}")

    def pretrain_config(self) -> PretrainConfig:
        return PretrainConfig(
            model=self.model, data=self.data, data_root=self.data_root, train_subset=self.train_subset,
            test_subset=self.test_subset, seed=self.seed, epochs=self.pretrain_epochs, batch_size=self.batch_size,
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
        )  # fmt: skip

    def lora_spec(self) -> LoraSpec:
        alpha = float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)
        return LoraSpec(kind="masked", rank=self.lora_rank, alpha=alpha)

    def replace(self, **changes: Any) -> VisionConfig:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@functools.lru_cache(maxsize=4)
def _load(name, root, seed, train_subset, test_subset) -> vdata.VisionData:
    import os

    workers = min(8, os.cpu_count() or 1) if name == "imagenet" else 0  # decoding JPEGs needs workers
    return vdata.load_vision_data(
        name, root, seed=seed, train_subset=train_subset, test_subset=test_subset, num_workers=workers
    )


def load_data(config: VisionConfig | PretrainConfig) -> vdata.VisionData:
    """The (memoised) dataset of a configuration."""
    return _load(config.data, config.data_root, config.seed, config.train_subset, config.test_subset)


def _fresh_model(config: PretrainConfig, data: vdata.VisionData) -> nn.Module:
    return build_model(
        config.model, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size,
        seed=config.seed,
    )  # fmt: skip


def _test_acc(model: nn.Module, data: vdata.VisionData, split: str, device) -> float:
    return accuracy(model, data.batches(split, EVAL_BATCH), device)


def pretrained_model(
    config: PretrainConfig,
    store: ResultStore | None = None,
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The dense pretrained model of ``config`` and its record; trains it (Table 3) only when
    neither the record nor the cached weights exist."""
    store = store or ResultStore()
    weights = paths.cache_dir() / "vision" / f"pretrained-{config_key(config)}.pt"
    data = load_data(config)
    model = _fresh_model(config, data).to(device)

    def train() -> dict[str, Any]:
        if log:
            log(f"pretraining {config.model} on {config.data} for {config.epochs} epochs")
        start = time.perf_counter()
        stats = train_epochs_(
            model, data, epochs=config.epochs, lr_fn=lambda t: pretrain_lr(t, config.lr, config.epochs),
            batch_size=config.batch_size, momentum=config.momentum, weight_decay=config.weight_decay,
            seed=config.seed, device=device,
        )  # fmt: skip
        train_s = time.perf_counter() - start
        weights.parent.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(weights)
        return {
            "metrics": {
                "test_accuracy": _test_acc(model, data, "test", device),
                "val_accuracy": _test_acc(model, data, "val", device),
                "train_loss": stats["train_loss"],
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_images": data.size("train"),
            },
            "timings": {"train_s": train_s, "epoch_time_s": stats["epoch_time_s"]},
            "weights": str(weights),
        }

    def evaluate_cached() -> dict[str, Any]:
        # weights cached by another results store (another profile folder): evaluate, do not retrain
        return {
            "metrics": {
                "test_accuracy": _test_acc(model, data, "test", device),
                "val_accuracy": _test_acc(model, data, "val", device),
                "parameters": sum(p.numel() for p in model.parameters()),
                "train_images": data.size("train"),
            },
            "timings": {},
            "weights": str(weights),
            "from_cache": True,
        }

    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        return model, store.run("vision-pretrain", config, evaluate_cached)
    return model, store.run("vision-pretrain", config, train, force=True)


def _execute(config: VisionConfig, store: ResultStore, device: str, log, keep_models: bool = False):
    """Pretrain (cached) -> prune -> retrain -> evaluate; returns the result and, on request,
    copies of the dense, pruned and retrained models (Figure 1)."""
    import copy

    start = time.perf_counter()
    data = load_data(config)
    model, pre = pretrained_model(config.pretrain_config(), store, device=device, log=log)
    check_method(config.retrain, model)
    models = {"dense": copy.deepcopy(model)} if keep_models else {}
    base_params = base_parameter_count(model)
    masks, cycles, shares, epoch_times, peaks = None, [], [], [], []
    timings = {"prune_s": 0.0, "retrain_s": 0.0}
    spec = config.lora_spec()
    for c, target in enumerate(cycle_sparsities(config.sparsity, config.cycles)):
        t0 = time.perf_counter()
        before = {k: w.detach().clone() for k, w in prunable_weights(model).items()}
        alive = sum(int((w != 0).sum()) for w in before.values())
        if config.prune != "none":
            masks = prune_(model, target, config.prune, masks)
        after = prunable_weights(model)
        removed = alive - sum(int((w != 0).sum()) for w in after.values())
        d = allr_factor(relative_change(before, after), removed / max(alive, 1), config.epochs, config.pretrain_epochs)
        timings["prune_s"] += time.perf_counter() - t0
        pruned_acc = _test_acc(model, data, "test", device)
        if keep_models and c == config.cycles - 1:
            models["pruned"] = copy.deepcopy(model)
        t0 = time.perf_counter()
        entry = {"cycle": c + 1, "sparsity": target, "pruned_accuracy": pruned_acc, "allr_factor": d}
        if config.retrain == "bn-recalibrate":
            recalibrate_bn_(model, data.batches("train", config.batch_size, shuffle=True, seed=config.seed,
                                                limit=config.recal_batches), device)  # fmt: skip
            shares.append(0.0)
        elif config.retrain in TRAINED:
            trainable = prepare_(model, config.retrain, spec)
            freezer = None
            if config.freeze != "none":
                freezer = GradualFreezer(
                    model, config.epochs, unfreeze=config.freeze == "unfreeze", reverse=config.reverse
                )
            lr_fn = retrain_lr(
                config.schedule, lr_max=config.lr, pretrain_epochs=config.pretrain_epochs,
                retrain_epochs=config.epochs, allr_d=d, warmup=config.warmup,
            )  # fmt: skip
            stats = train_epochs_(
                model, data, epochs=config.epochs, lr_fn=lr_fn, batch_size=config.batch_size,
                masks=masks, momentum=config.momentum,
                weight_decay=config.weight_decay, seed=config.seed + 1000 * (c + 1), device=device, on_epoch=freezer,
            )  # fmt: skip
            if config.recalibrate and has_batchnorm(model):
                # P(BN-Recalibrate) ⊂ P(method): short retraining leaves momentum-averaged statistics stale
                recalibrate_bn_(model, data.batches("train", config.batch_size, shuffle=True, seed=config.seed,
                                                    limit=config.recal_batches), device)  # fmt: skip
            lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
            entry["sparsity_unmerged"] = _zeros(model) / (
                sum(w.numel() for w in prunable_weights(model).values()) + lora_params
            )
            merge_conv_lora_(model)
            for p in model.parameters():
                p.requires_grad_(True)
            shares.extend(freezer.shares if freezer else [trainable / base_params] * config.epochs)
            epoch_times.append(stats["epoch_time_s"])
            peaks.append(stats["peak_memory_mb"])
        else:
            shares.append(0.0)
        timings["retrain_s"] += time.perf_counter() - t0
        entry["accuracy"] = _test_acc(model, data, "test", device)
        cycles.append(entry)
    if keep_models:
        models["retrained"] = model
    assert not any(isinstance(m, MaskedLoRAConv) for m in model.modules())
    metrics = {
        "dense_accuracy": pre["metrics"]["test_accuracy"],
        "pruned_accuracy": cycles[-1]["pruned_accuracy"],
        "accuracy": cycles[-1]["accuracy"],
        "val_accuracy": _test_acc(model, data, "val", device),
        "sparsity": model_sparsity(model),
        "sparsity_unmerged": cycles[-1].get("sparsity_unmerged", model_sparsity(model)),
        "trainable_share": sum(shares) / max(len(shares), 1),
        "allr_factor": cycles[-1]["allr_factor"],
        "peak_memory_mb": max(peaks) if peaks else 0.0,
        "parameters": base_params,
    }
    timings["epoch_time_s"] = sum(epoch_times) / len(epoch_times) if epoch_times else 0.0
    timings["total_s"] = time.perf_counter() - start
    result = {
        "metrics": metrics,
        "timings": timings,
        "cycles": cycles,
        "pretrain_key": pre["key"],
        "device": str(device),
    }
    return result, models


def _zeros(model: nn.Module) -> int:
    return sum(int((w == 0).sum()) for w in prunable_weights(model).values())


def run_vision(
    config: VisionConfig,
    store: ResultStore | None = None,
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """One prune-retrain run as a stored record (reused when the same configuration finished before)."""
    store = store or ResultStore()
    return store.run("vision", config, lambda: _execute(config, store, device, log)[0], force=force)


def run_vision_grid(
    configs: Iterable[VisionConfig],
    store: ResultStore | None = None,
    *,
    device: str = "cpu",
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Run (or reuse) every configuration, one progress line each."""
    store = store or ResultStore()
    configs = list(configs)
    records = []
    for i, config in enumerate(configs, 1):
        t0 = time.perf_counter()
        rec = run_vision(config, store, device=device, log=log)
        if log:
            m = rec["metrics"]
            tag = "reused" if rec.get("reused") else f"{time.perf_counter() - t0:.1f}s"
            log(f"[{i}/{len(configs)}] {config.retrain} s={config.sparsity:g} ep={config.epochs} "
                f"r={config.lora_rank}: acc {m['accuracy']:.2f} (pruned {m['pruned_accuracy']:.2f}) {tag}")  # fmt: skip
        records.append(rec)
    return records


def models_for_features(
    config: VisionConfig, store: ResultStore | None = None, *, device: str = "cpu"
) -> dict[str, nn.Module]:
    """Dense, pruned and retrained models of one configuration (for Figure 1; not stored)."""
    return _execute(config, store or ResultStore(), device, None, keep_models=True)[1]


@torch.no_grad()
def first_layer_feature_map(model: nn.Module, image: torch.Tensor, filter_index: int) -> torch.Tensor:
    """Output of one filter of the first convolution for one image ``[C, H, W]`` (Figure 1)."""
    conv = model.get_submodule(first_conv_name(model))
    if not 0 <= filter_index < conv.out_channels:
        raise ValueError(f"filter_index must be in [0, {conv.out_channels}), got {filter_index}")
    return conv(image.unsqueeze(0).to(conv.weight.device))[0, filter_index].cpu()


def method_label(method: str, rank: int | None = None) -> str:
    return f"PERP (r={rank})" if method == "perp" and rank is not None else METHOD_LABELS[method]


def accuracy_frame(records: Iterable[dict[str, Any]]):
    """Tidy frame (method, rank, sparsity, epochs, accuracy, ...) of one-shot records, plus a
    'No retraining' row per sparsity from the pruned accuracy (Figures 2 and 4)."""
    import pandas as pd

    rows = []
    for r in records:
        c, m = r["config"], r["metrics"]
        label = method_label(c["retrain"], c["lora_rank"] if c["retrain"] == "perp" else None)
        base = {"sparsity": c["sparsity"], "epochs": c["epochs"], "dense": m["dense_accuracy"]}
        rows.append({**base, "method": label, "accuracy": m["accuracy"], "trainable_share": m["trainable_share"],
                     "sparsity_after_merge": m["sparsity"], "epoch_time_s": r["timings"]["epoch_time_s"]})  # fmt: skip
        rows.append({**base, "method": METHOD_LABELS["none"], "accuracy": m["pruned_accuracy"], "trainable_share": 0.0,
                     "sparsity_after_merge": m["sparsity"], "epoch_time_s": 0.0})  # fmt: skip
    df = pd.DataFrame(rows).drop_duplicates(subset=["method", "sparsity", "epochs"])
    return df.sort_values(["epochs", "method", "sparsity"]).reset_index(drop=True)


def _rank(label: str) -> int:
    return int(label.split("=")[1].rstrip(")")) if "=" in label else 0


def accuracy_table(frame, epochs: int):
    """Figure 2/4 as a table: one row per method, one column per sparsity, a 'Dense' row on top."""
    import pandas as pd

    part = frame[frame["epochs"] == epochs]
    table = part.pivot_table(index="method", columns="sparsity", values="accuracy").round(2)
    order = [lbl for lbl in ["Full IMP"] + sorted((x for x in table.index if x.startswith("PERP")), key=_rank)
             + ["Linear Probing", "BN-Parameters", "Biases", "BN-Recalibrate", "No retraining"] if lbl in table.index]  # fmt: skip
    table = table.loc[order]
    dense = pd.DataFrame([[part["dense"].iloc[0]] * table.shape[1]], index=["Dense"], columns=table.columns).round(2)
    out = pd.concat([dense, table])
    out.columns = [f"{s:.0%}" for s in out.columns]
    share = part.groupby("method")["trainable_share"].mean()
    out.insert(0, "% trainable", [float("nan")] + [round(100 * share.get(i, 0.0), 3) for i in table.index])
    return out.reset_index(names="method")


def table12(records: Iterable[dict[str, Any]]):
    """Table 12: accuracy difference to Full IMP (no freezing) per (unfreeze, reverse) and number
    of cycles, with the aggregated trainable share."""
    import pandas as pd

    records = list(records)
    full = {r["config"]["cycles"]: r["metrics"]["accuracy"] for r in records if r["config"]["freeze"] == "none"}
    rows = []
    for r in records:
        c, m = r["config"], r["metrics"]
        if c["freeze"] == "none" or c["cycles"] not in full:
            continue
        rows.append({"unfreeze": "✓" if c["freeze"] == "unfreeze" else "✗", "reverse": "✓" if c["reverse"] else "✗",
                     "cycles": c["cycles"], "share": m["trainable_share"], "diff": m["accuracy"] - full[c["cycles"]]})  # fmt: skip
    if not rows:
        raise ValueError("table12 needs freezing runs and Full IMP runs with the same number of cycles")
    df = pd.DataFrame(rows)
    share = df.groupby(["unfreeze", "reverse"])["share"].mean().mul(100).round(2).rename("% agg. trainable")
    diff = df.pivot_table(index=["unfreeze", "reverse"], columns="cycles", values="diff").round(2)
    out = pd.concat([share, diff], axis=1).sort_values("% agg. trainable", ascending=False)
    out.columns = [str(c) for c in out.columns]
    return out.reset_index()


def config_dict(config: VisionConfig) -> dict[str, Any]:
    return asdict(config)

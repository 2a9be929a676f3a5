"""Vision experiments as records: pretrain (cached) -> prune -> retrain -> evaluate
(paper Section 3.1, Figures 1, 2, 4; Section 3.4, Table 12; Appendix A).

``run_vision(config, store)`` returns one record with the whole :class:`VisionConfig`, dense,
pruned and retrained accuracy, trainable share, sparsity after merging, epoch time and peak
memory, and the schedule choices it made (warmup, ALLR's norm, FT's rate, Nesterov). Pretraining is
itself a record (kind ``vision-pretrain``) whose weights are cached under
``perplib.paths.cache_dir()/vision`` by configuration key, so it runs once; the record names the
weights by that key, never by a machine path, and weights missing from the cache are recomputed.
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
from ..lora import LORA_KINDS, LoraSpec
from ..results import ResultStore, config_key
from . import data as vdata
from .freezing import GradualFreezer, cycle_sparsities
from .lora import MaskedLoRAConv, merge_conv_lora_
from .models import VISION_MODELS, accuracy, build_model, has_batchnorm
from .pruning import ALLOCATIONS, model_sparsity, parse_ratio, prunable_weights, prune_, relative_change
from .retrain import (
    METHODS,
    TRAINED,
    base_parameter_count,
    check_method,
    prepare_,
    recalibrate_bn_,
    train_epochs_,
)
from .schedules import SCHEDULES, WARMUP, allr_factor, final_pretrain_lr, pretrain_lr, retrain_lr

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
    nesterov: bool = True


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
    nesterov: bool = field(default=True, metadata={"help": "Nesterov momentum (official code)"})
    # pruning (Appendix A.2)
    prune: str = field(default="global", metadata={"help": f"allocation: {ALLOCATIONS}, or none (dense)"})
    sparsity: float = field(default=0.9, metadata={"help": "final fraction of prunable weights removed, in [0, 1)"})
    # retraining (Section 3.1)
    retrain: str = field(default="perp", metadata={"help": f"one of {METHODS}"})
    epochs: int = field(default=1, metadata={"help": "retraining epochs per prune-retrain cycle"})
    schedule: str = field(default="allr", metadata={"help": f"retraining LR schedule: {SCHEDULES}"})
    warmup: float = field(default=WARMUP, metadata={"help": "warmup fraction of a retraining cycle (allr/slr/clr/llr)"})
    lora: str = field(
        default="masked", metadata={"help": "PERP LoRA kind: masked (merged, exact sparsity) | plain (paper)"}
    )
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
        _choice("lora", self.lora, LORA_KINDS)
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.retrain == "perp" and self.lora == "plain" and self.cycles > 1:
            raise ValueError("plain LoRA stays unmerged, so it cannot start another prune-retrain cycle; "
                             f"use lora 'masked' or cycles 1 (got cycles {self.cycles})")  # fmt: skip
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
            lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov,
        )  # fmt: skip

    def lora_spec(self) -> LoraSpec:
        alpha = float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)
        return LoraSpec(kind=self.lora, rank=self.lora_rank, alpha=alpha)

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
    weights_key = f"vision/pretrained-{config_key(config)}.pt"  # under paths.cache_dir(); no machine path
    weights = paths.cache_dir() / weights_key
    data = load_data(config)
    model = _fresh_model(config, data).to(device)

    def train() -> dict[str, Any]:
        if log:
            log(f"pretraining {config.model} on {config.data} for {config.epochs} epochs")
        start = time.perf_counter()
        stats = train_epochs_(
            model, data, epochs=config.epochs, lr_fn=lambda t: pretrain_lr(t, config.lr, config.epochs),
            batch_size=config.batch_size, momentum=config.momentum, weight_decay=config.weight_decay,
            nesterov=config.nesterov, seed=config.seed, device=device,
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
            "weights": weights_key,
            "final_lr": final_pretrain_lr(config.lr, config.epochs, _steps(data, config.batch_size)),
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
            "weights": weights_key,
            "final_lr": final_pretrain_lr(config.lr, config.epochs, _steps(data, config.batch_size)),
            "from_cache": True,
        }

    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        return model, store.run("vision-pretrain", config, evaluate_cached)
    if store.get("vision-pretrain", config) is not None:
        print(f"pretrained weights '{weights_key}' are missing from the cache ({paths.cache_dir()}): pretraining again")
    return model, store.run("vision-pretrain", config, train, force=True)


def _steps(data: vdata.VisionData, batch_size: int) -> int:
    return -(-data.size("train") // batch_size)


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
    ft_lr = final_pretrain_lr(config.lr, config.pretrain_epochs, _steps(data, config.batch_size))
    for c, target in enumerate(cycle_sparsities(config.sparsity, config.cycles)):
        t0 = time.perf_counter()
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        alive = sum(int((w != 0).sum()) for w in prunable_weights(model).values())
        if config.prune != "none":
            masks = prune_(model, target, config.prune, masks)
        removed = alive - sum(int((w != 0).sum()) for w in prunable_weights(model).values())
        # ALLR (official code): the norm drop over all parameters, the pruned fraction of prunable weights
        change = relative_change(before, dict(model.named_parameters()))
        d = allr_factor(change, removed / max(alive, 1), config.epochs, config.pretrain_epochs)
        del before
        timings["prune_s"] += time.perf_counter() - t0
        pruned_acc = _test_acc(model, data, "test", device)
        if keep_models and c == config.cycles - 1:
            models["pruned"] = copy.deepcopy(model)
        t0 = time.perf_counter()
        entry = {"cycle": c + 1, "sparsity": target, "pruned_accuracy": pruned_acc, "allr_factor": d,
                 "relative_change": change}  # fmt: skip
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
                retrain_epochs=config.epochs, allr_d=d, warmup=config.warmup, ft_lr=ft_lr,
            )  # fmt: skip
            stats = train_epochs_(
                model, data, epochs=config.epochs, lr_fn=lr_fn, batch_size=config.batch_size,
                masks=masks, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov,
                seed=config.seed + 1000 * (c + 1), device=device, on_epoch=freezer,
            )  # fmt: skip
            if config.recalibrate and has_batchnorm(model):
                # P(BN-Recalibrate) ⊂ P(method): short retraining leaves momentum-averaged statistics stale
                recalibrate_bn_(model, data.batches("train", config.batch_size, shuffle=True, seed=config.seed,
                                                    limit=config.recal_batches), device)  # fmt: skip
            lora_params = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
            # storage sparsity: unmerged plain adapters are dense parameters next to the sparse kernels
            entry["sparsity_with_adapters"] = _zeros(model) / (
                sum(w.numel() for w in prunable_weights(model).values()) + lora_params
            )
            if config.lora == "masked" or config.retrain != "perp":
                merge_conv_lora_(model)  # exact: every zero kept
                entry["sparsity_with_adapters"] = model_sparsity(model)
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
    assert config.lora == "plain" or not any(isinstance(m, MaskedLoRAConv) for m in model.modules())
    metrics = {
        "dense_accuracy": pre["metrics"]["test_accuracy"],
        "pruned_accuracy": cycles[-1]["pruned_accuracy"],
        "accuracy": cycles[-1]["accuracy"],
        "val_accuracy": _test_acc(model, data, "val", device),
        "sparsity": model_sparsity(model),
        "sparsity_with_adapters": cycles[-1].get("sparsity_with_adapters", model_sparsity(model)),
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
        "schedule": {  # the choices of the official code, recorded
            "warmup": config.warmup,
            "warmup_shape": "half-cosine",
            "allr_norm": "all parameters",
            "ft_lr": ft_lr,
            "nesterov": config.nesterov,
            "lora": config.lora if config.retrain == "perp" else None,
        },  # fmt: skip
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
            method = f"perp {config.lora} r={config.lora_rank}" if config.retrain == "perp" else config.retrain
            log(f"[{i}/{len(configs)}] {method} s={config.sparsity:g} ep={config.epochs}: acc {m['accuracy']:.2f} (pruned {m['pruned_accuracy']:.2f}) {tag}")  # fmt: skip
        records.append(rec)
    return records


def grid_configs(
    base: VisionConfig,
    sparsities: Iterable[float],
    methods: Iterable[str],
    *,
    epochs: int,
    perp_ranks: Iterable[int] = (),
    masked_ranks: Iterable[int] = (),
) -> list[VisionConfig]:
    """Figure 2/4's runs: every method at every sparsity; PERP once per plain-LoRA rank (the
    paper's) and per masked-LoRA rank (perplib's)."""
    runs: list[tuple[str, str, int]] = []
    for m in methods:
        if m == "perp":
            runs += [("perp", "plain", r) for r in perp_ranks] + [("perp", "masked", r) for r in masked_ranks]
        else:
            runs.append((m, base.lora, base.lora_rank))
    return [base.replace(retrain=m, lora=k, lora_rank=r, sparsity=s, epochs=epochs) for s in sparsities
            for m, k, r in runs]  # fmt: skip


def models_for_features(
    config: VisionConfig, store: ResultStore | None = None, *, device: str = "cpu"
) -> dict[str, nn.Module]:
    """Dense, pruned and retrained models of one configuration (for Figure 1; not stored)."""
    from ..runtime import ensure

    ensure()  # the CPU settings of every heavy run (stored runs get them from ResultStore.run)
    return _execute(config, store or ResultStore(), device, None, keep_models=True)[1]


@torch.no_grad()
def layer_output(model: nn.Module, images: torch.Tensor, layer: str) -> torch.Tensor:
    """Output ``[N, C, H, W]`` of the module ``layer`` for ``images`` ``[N, C, H, W]``, in eval mode
    (a LoRA-wrapped layer gives its adapted output). Figure 1."""
    module = model.get_submodule(layer)
    out: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o.detach().cpu()))
    was_training = model.training
    model.eval()
    try:
        model(images.to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    return out[0]


def config_dict(config: VisionConfig) -> dict[str, Any]:
    return asdict(config)

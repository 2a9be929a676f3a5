"""Parameter-efficient retraining of pruned vision models (paper Section 3.1, Appendix A.2).

Each method updates a superset of the previous one's parameters:

    P(BN-Recalibrate) ⊂ P(Biases) ⊂ P(BN-Parameters) ⊂ P(Linear Probing) ⊂ P(PERP)

- ``bn-recalibrate`` (Li et al. 2020): no gradients; BatchNorm running statistics re-estimated
  with forward passes over training data (Section 3.1);
- ``biases``: + every bias that is not BatchNorm's (for a ResNet only the head's);
- ``bn-parameters``: + BatchNorm weights and biases;
- ``linear-probing``: + the head (the last linear layer);
- ``perp``: + LoRA (masked or plain) on every convolution and linear layer except the head;
- ``full`` (Full IMP): every parameter, the pruning mask enforced after each step.

Training uses SGD with Nesterov momentum 0.9 (as the official code) and weight decay 1e-4
(Appendix A.1), in train mode, so
BatchNorm statistics are updated by every trained method.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..lora import LoraSpec
from ..profiling import PeakMemory
from .lora import MaskedLoRAConv, add_conv_lora_
from .models import has_batchnorm, head_name
from .pruning import apply_masks_, prunable_weights

METHODS = ("none", "bn-recalibrate", "biases", "bn-parameters", "linear-probing", "perp", "full")
TRAINED = ("biases", "bn-parameters", "linear-probing", "perp", "full")
NEEDS_BN = ("bn-recalibrate", "bn-parameters")
METHOD_LABELS = {
    "none": "No retraining",
    "bn-recalibrate": "BN-Recalibrate",
    "biases": "Biases",
    "bn-parameters": "BN-Parameters",
    "linear-probing": "Linear Probing",
    "perp": "PERP",
    "full": "Full IMP",
}


def check_method(method: str, model: nn.Module | None = None) -> None:
    """Fail early on an unknown method, or a BatchNorm method for a model without BatchNorm."""
    if method not in METHODS:
        raise ValueError(f"retrain method must be one of {list(METHODS)}, got {method!r}")
    if model is not None and method in NEEDS_BN and not has_batchnorm(model):
        raise ValueError(
            f"retrain method '{method}' needs BatchNorm layers, but {type(model).__name__} has none; "
            f"choose one of {[m for m in METHODS if m not in NEEDS_BN]}"
        )


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Names of the model's parameters by group: ``biases`` (non-BN), ``bn``, ``head``, ``lora``, ``other``."""
    head = head_name(model)
    groups: dict[str, list[str]] = {"biases": [], "bn": [], "head": [], "lora": [], "other": []}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, MaskedLoRAConv):
                groups["lora"].append(full)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                groups["bn"].append(full)
            elif mod_name == head and p_name == "weight":
                groups["head"].append(full)
            elif p_name == "bias":
                groups["biases"].append(full)
            else:
                groups["other"].append(full)
    return groups


def trainable_names(model: nn.Module, method: str) -> set[str]:
    """The parameter set ``P(method)`` of Section 3.1 (LoRA parameters must already be attached for PERP)."""
    check_method(method)
    groups = parameter_groups(model)
    if method == "full":
        return {n for n, _ in model.named_parameters() if n not in groups["lora"]}
    order = ["biases", "bn", "head", "lora"]
    upto = {"none": 0, "bn-recalibrate": 0, "biases": 1, "bn-parameters": 2, "linear-probing": 3, "perp": 4}[method]
    return {n for g in order[:upto] for n in groups[g]}


def mark_trainable_(model: nn.Module, names: set[str]) -> int:
    """Set ``requires_grad`` to exactly ``names``; returns the number of trainable scalars."""
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        count += p.numel() if n in names else 0
    return count


def base_parameter_count(model: nn.Module) -> int:
    """Parameters of the model without adapters (the denominator of the trainable share)."""
    lora = set(parameter_groups(model)["lora"])
    return sum(p.numel() for n, p in model.named_parameters() if n not in lora)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, batches, device: str | torch.device = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` (Li et al. 2020).

    Statistics are reset and accumulated as an exact cumulative average (momentum ``None``); no
    gradient is computed and no parameter changes. Returns the number of images seen.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError(f"BN-Recalibrate needs BatchNorm layers, but {type(model).__name__} has none")
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    if seen == 0:
        raise ValueError("BN-Recalibrate got no batches")
    return seen


def prepare_(model: nn.Module, method: str, lora: LoraSpec | None = None) -> int:
    """Attach LoRA for PERP (every conv/linear except the head) and mark ``P(method)`` trainable;
    returns the number of trainable scalars."""
    check_method(method, model)
    if method == "perp":
        add_conv_lora_(model, lora or LoraSpec(rank=8, alpha=8.0), exclude=(head_name(model),))
    return mark_trainable_(model, trainable_names(model, method))


def train_epochs_(
    model: nn.Module,
    data,
    *,
    epochs: int,
    lr_fn: Callable[[float], float],
    batch_size: int,
    masks: dict[str, torch.Tensor] | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int], None] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """SGD with momentum over the trainable parameters for ``epochs`` epochs; ``lr_fn(t)`` gives
    the learning rate at fractional epoch ``t``. ``masks`` are re-applied after every step to the
    weights that train (all of them for Full IMP, the head for Linear Probing and PERP), so pruned
    weights stay zero. ``on_epoch(e)`` runs before epoch ``e`` (gradual freezing
    changes ``requires_grad`` there; frozen parameters get no gradient and SGD skips them).

    Returns mean epoch time (s), peak memory (MiB) and the final training loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params and on_epoch is None:
        raise ValueError("nothing to train: no parameter requires a gradient")
    params = params if on_epoch is None else list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    steps = -(-data.size("train") // batch_size)
    if max_batches is not None:
        steps = min(steps, max_batches)
    weights = prunable_weights(model)
    model.train()
    times, last_loss = [], float("nan")
    with PeakMemory(device) as mem:
        for epoch in range(epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            # only weights that train can leave the mask (Full IMP, the head of Linear Probing / PERP)
            live = {k: m for k, m in (masks or {}).items() if weights[k].requires_grad}
            start = time.perf_counter()
            for i, (x, y) in enumerate(data.batches("train", batch_size, shuffle=True, seed=seed + epoch, limit=steps)):
                for group in opt.param_groups:
                    group["lr"] = lr_fn(epoch + (i + 0.5) / steps)
                x, y = x.to(device), y.to(device)
                loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if live:
                    apply_masks_(model, live)
                last_loss = loss.item()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return {
        "epoch_time_s": sum(times) / max(len(times), 1),
        "epoch_times_s": times,
        "peak_memory_mb": mem.peak_mb,
        "train_loss": last_loss,
    }

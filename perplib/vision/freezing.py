"""Magnitude conservation: multi-cycle IMP with gradual (un)freezing (paper Section 3.4, Table 12).

Several prune-retrain cycles reach a final sparsity; the sparsity after cycle ``c`` of ``C`` is
``1 - (1 - s)^(c / C)`` (the same fraction of the remaining weights removed each cycle).

Within a cycle of ``E`` epochs the ``L`` convolutions (the *units*, input side first, as the
model registers them) are switched progressively: in epoch ``e`` (0-based) the first
``k(e) = floor(L (e + 1) / E)`` units are switched, so the last epoch switches every unit:

- ``unfreeze=True`` (start frozen): the switched units train, the others are frozen;
- ``unfreeze=False`` (start full): the switched units are frozen, the others train;
- "first" counts from the input side, or from the output side with ``reverse=True``.

BatchNorm parameters and the classification head always train. The trainable share of an
epoch is counted over every parameter of the model and averaged over the epochs of a run.

This is the one convention (of units: convolutions vs every module with parameters; counts:
``floor(L e / E)``, ``ceil(L (e+1) / E)``, ``floor(L (e+1) / E)``; BatchNorm and head switched
or not) that reproduces the paper's aggregated shares for ResNet-50 with five epochs per phase:
(unfreeze, reverse) = (✓, ✓) 88.83%, (✗, ✗) 70.95%, (✓, ✗) 37.28%, (✗, ✓) 19.40%
(``tests/test_vision.py`` checks them on torchvision's ResNet-50 built on the meta device).
"""

from __future__ import annotations

from torch import nn


def layer_units(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """The switched units: every convolution, input side first, with its parameters."""
    return [(n, list(m.parameters(recurse=False))) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def switched_count(num_units: int, epoch: int, epochs: int) -> int:
    """``floor(L (e + 1) / E)``: units switched in ``epoch`` (0-based) of ``epochs``."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    return num_units * (epoch + 1) // epochs


def trainable_flags(num_units: int, epoch: int, epochs: int, *, unfreeze: bool, reverse: bool) -> list[bool]:
    """Which of ``num_units`` units (input side first) train in ``epoch`` (0-based) of ``epochs``."""
    k = switched_count(num_units, epoch, epochs)
    switched = [i < k for i in range(num_units)]
    if reverse:
        switched = switched[::-1]
    return switched if unfreeze else [not s for s in switched]


def schedule_shares(unit_sizes: list[int], always: int, epochs: int, *, unfreeze: bool, reverse: bool) -> list[float]:
    """Trainable share per epoch for units of ``unit_sizes`` parameters (input side first) and
    ``always`` parameters that always train (BatchNorm, head, biases outside the units)."""
    total = sum(unit_sizes) + always
    shares = []
    for e in range(epochs):
        flags = trainable_flags(len(unit_sizes), e, epochs, unfreeze=unfreeze, reverse=reverse)
        shares.append((always + sum(n for n, f in zip(unit_sizes, flags, strict=True) if f)) / total)
    return shares


def aggregated_share(model: nn.Module, epochs: int, *, unfreeze: bool, reverse: bool) -> float:
    """Table 12's aggregated trainable share of one schedule (works on a meta-device model)."""
    sizes = [sum(p.numel() for p in ps) for _, ps in layer_units(model)]
    always = sum(p.numel() for p in model.parameters()) - sum(sizes)
    shares = schedule_shares(sizes, always, epochs, unfreeze=unfreeze, reverse=reverse)
    return sum(shares) / len(shares)


def cycle_sparsities(final: float, cycles: int) -> list[float]:
    """Target sparsity after each of ``cycles`` prune-retrain cycles ending at ``final``."""
    if not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}")
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final!r}")
    return [1.0 - (1.0 - final) ** ((c + 1) / cycles) for c in range(cycles)]


class GradualFreezer:
    """Callable ``(epoch) -> None`` for :func:`perplib.vision.retrain.train_epochs_`: sets
    ``requires_grad`` of every unit for that epoch (everything else trains) and records the
    trainable share of each epoch."""

    def __init__(self, model: nn.Module, epochs: int, *, unfreeze: bool, reverse: bool) -> None:
        self.model, self.units = model, layer_units(model)
        self.epochs, self.unfreeze, self.reverse = epochs, unfreeze, reverse
        self.total = sum(p.numel() for p in model.parameters())
        self.shares: list[float] = []

    def flags(self, epoch: int) -> list[bool]:
        return trainable_flags(len(self.units), epoch, self.epochs, unfreeze=self.unfreeze, reverse=self.reverse)

    def __call__(self, epoch: int) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
        for flag, (_, params) in zip(self.flags(epoch), self.units, strict=True):
            for p in params:
                p.requires_grad_(flag)
        self.shares.append(sum(p.numel() for p in self.model.parameters() if p.requires_grad) / self.total)

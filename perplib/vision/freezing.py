"""Magnitude conservation: multi-cycle IMP with gradual (un)freezing (paper Section 3.4, Table 12).

Several prune-retrain cycles reach a final sparsity; the sparsity after cycle ``c`` of ``C`` is
``1 - (1 - s)^(c / C)`` (the same fraction of the remaining weights removed each cycle). Within
a cycle of ``E`` epochs the layers are switched progressively, the switched fraction tracking the
fraction of epochs done:

- ``unfreeze=False`` (start full, freeze progressively): in epoch ``e`` the first
  ``floor(L e / E)`` units are frozen, so epoch 0 trains everything;
- ``unfreeze=True`` (start frozen, unfreeze progressively): in epoch ``e`` the first
  ``ceil(L (e + 1) / E)`` units train, so the last epoch trains everything;
- "first" means from the input side, or from the output side with ``reverse=True``.

Either way every unit is trained in at least one epoch of every cycle. A unit is a module that
owns parameters (convolution, BatchNorm, linear layer), in the order the model registers them,
which for ResNets is input to output.
"""

from __future__ import annotations

import math

from torch import nn


def layer_units(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules that own parameters, input side first, with their own parameters."""
    units = []
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params:
            units.append((name, params))
    return units


def trainable_flags(num_units: int, epoch: int, epochs: int, *, unfreeze: bool, reverse: bool) -> list[bool]:
    """Which of ``num_units`` units (input side first) train in ``epoch`` (0-based) of ``epochs``."""
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in [0, {epochs}), got {epoch}")
    if unfreeze:
        k = math.ceil(num_units * (epoch + 1) / epochs)
        flags = [i < k for i in range(num_units)]
    else:
        k = math.floor(num_units * epoch / epochs)
        flags = [i >= k for i in range(num_units)]
    return flags[::-1] if reverse else flags


def cycle_sparsities(final: float, cycles: int) -> list[float]:
    """Target sparsity after each of ``cycles`` prune-retrain cycles ending at ``final``."""
    if not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}")
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must be in [0, 1), got {final!r}")
    return [1.0 - (1.0 - final) ** ((c + 1) / cycles) for c in range(cycles)]


class GradualFreezer:
    """Callable ``(epoch) -> None`` for :func:`perplib.vision.retrain.train_epochs_`: sets
    ``requires_grad`` of every unit for that epoch and accumulates the trainable share."""

    def __init__(self, model: nn.Module, epochs: int, *, unfreeze: bool, reverse: bool) -> None:
        self.units = layer_units(model)
        self.epochs, self.unfreeze, self.reverse = epochs, unfreeze, reverse
        self.total = sum(p.numel() for _, ps in self.units for p in ps)
        self.shares: list[float] = []

    def flags(self, epoch: int) -> list[bool]:
        return trainable_flags(len(self.units), epoch, self.epochs, unfreeze=self.unfreeze, reverse=self.reverse)

    def __call__(self, epoch: int) -> None:
        trainable = 0
        for flag, (_, params) in zip(self.flags(epoch), self.units, strict=True):
            for p in params:
                p.requires_grad_(flag)
                trainable += p.numel() if flag else 0
        self.shares.append(trainable / self.total)

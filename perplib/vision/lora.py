"""Masked LoRA for the convolutions of a pruned vision model (paper Appendix A, "LoRA for
convolutions and pruned layers").

A ``c_out x c_in x k x k`` kernel is viewed as a ``c_out x (c_in k k)`` matrix ``W`` and used as
``W + M ⊙ (s B A)`` with ``B ∈ R^{c_out x r}``, ``A ∈ R^{r x c_in k k}``, ``s = alpha / r`` and
``M = 1[W != 0]`` the pruning mask at wrapping time, so merging keeps every zero.

This reuses the LLM track's :class:`perplib.lora.LoraSpec` (kind, rank, alpha, init) and its pure
``masked_delta``; what is new is the layer: peft's own conv LoRA factors the update as a conv
followed by a 1x1 conv, which cannot carry an element-wise mask on the kernel, so the vision
layer keeps peft's shape (``base_layer``, one ``get_delta_weight()`` for forward, ``merge()``,
``unmerge()``) around a flattened-kernel delta. The forward builds the effective kernel once and
runs one convolution: for convolutions the kernel is far smaller than the activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraSpec, masked_delta


class MaskedLoRAConv(nn.Module):
    """Wraps an ``nn.Conv2d`` (or ``nn.Linear``) ``base_layer``, frozen, with a (masked) LoRA update."""

    def __init__(self, base_layer: nn.Conv2d | nn.Linear, spec: LoraSpec) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"vision LoRA wraps nn.Conv2d or nn.Linear, got {type(base_layer).__name__}")
        self.base_layer, self.spec = base_layer, spec
        w = base_layer.weight
        rows, cols = w.shape[0], w[0].numel()
        self.lora_A = nn.Parameter(torch.empty(spec.rank, cols, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, spec.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if spec.init == "random":  # tests: a non-zero update, so merge checks can fail
            nn.init.normal_(self.lora_B, std=0.1)
        mask = (w.detach() != 0).reshape(rows, cols)
        self.register_buffer("lora_mask", mask if spec.kind == "masked" else None)
        base_layer.weight.requires_grad_(False)
        self.merged = False

    def get_delta_weight(self) -> torch.Tensor:
        """``M ⊙ s B A`` in the base weight's shape (``M`` = all ones for the plain kind)."""
        delta = masked_delta(self.lora_A, self.lora_B, self.lora_mask, self.spec.scaling)
        return delta.view_as(self.base_layer.weight)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.add_(self.get_delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.get_delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        weight = base.weight + self.get_delta_weight()
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, base.bias)
        return base._conv_forward(x, weight, base.bias)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_conv_lora_(model: nn.Module, spec: LoraSpec, exclude: tuple[str, ...] = ()) -> dict[str, MaskedLoRAConv]:
    """Wrap every ``nn.Conv2d`` / ``nn.Linear`` except those in ``exclude`` (the head, Section 3.1)
    with :class:`MaskedLoRAConv`, in place; returns the wrappers by qualified name."""
    if any(isinstance(m, MaskedLoRAConv) for m in model.modules()):
        raise ValueError("the model already carries LoRA layers; merge them first")
    targets = [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear)) and n not in exclude]
    wrapped = {}
    for name in targets:
        wrapped[name] = MaskedLoRAConv(model.get_submodule(name), spec)
        _set_module(model, name, wrapped[name])
    return wrapped


@torch.no_grad()
def merge_conv_lora_(model: nn.Module) -> list[str]:
    """Fold every adapter into its base layer and put the base layer back (in place). Masked
    layers keep exactly the pruned model's zeros; merging a plain adapter into a pruned layer
    is refused (it would fill the zeros)."""
    names = [n for n, m in model.named_modules() if isinstance(m, MaskedLoRAConv)]
    for name in names:
        layer = model.get_submodule(name)
        if layer.lora_mask is None and bool((layer.base_layer.weight == 0).any()):
            raise ValueError(f"merging plain LoRA into pruned layer '{name}' would fill its zeros; use kind 'masked'")
        layer.merge()
        _set_module(model, name, layer.base_layer)
    return names

"""LoRA for the convolutions of a pruned vision model (paper Appendix A, "LoRA for convolutions
and pruned layers").

A ``c_out x c_in x k x k`` kernel is viewed as a ``c_out x (c_in k k)`` matrix ``W`` and used as
``W + M ⊙ (s B A)`` with ``B ∈ R^{c_out x r}``, ``A ∈ R^{r x c_in k k}``, ``s = alpha / r``:

- ``masked`` (perplib's default): ``M = 1[W != 0]`` the pruning mask at wrapping time, so merging
  keeps every zero;
- ``plain`` (the paper's vision PERP): ``M = 1``, kept unmerged; ``B A`` is the same update as
  peft's conv LoRA (a ``k x k`` conv to ``r`` channels followed by a 1x1 conv), and the record
  carries the sparsity the dense adapters cost.

This reuses the LLM track's :class:`perplib.lora.LoraSpec` (kind, rank, alpha, init) and its pure
``masked_delta`` (for merging). The forward is one autograd function, :func:`lora_conv2d`: it
builds the effective kernel, runs one convolution and saves only the input and the tensors that
already exist (base kernel, mask, A, B); its backward rebuilds the kernel and forms the kernel
gradient transiently, so no weight-sized tensor is kept between forward and backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraSpec, masked_delta


def _kernel(weight, lora_a, lora_b, mask, scaling):
    delta = (lora_b @ lora_a).mul_(scaling).view_as(weight)
    if mask is not None:
        delta.mul_(mask.view_as(weight))
    return delta.add_(weight)


class _LoraConv2dFn(torch.autograd.Function):
    """``y = conv2d(x, W + M ⊙ s·(B A), b)`` with the base kernel ``W`` frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, mask, scaling, stride, padding, dilation, groups):
        with torch.no_grad():
            y = F.conv2d(x, _kernel(weight, lora_a, lora_b, mask, scaling), bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, lora_a, lora_b, mask)
        ctx.conf = (scaling, stride, padding, dilation, groups, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, mask = ctx.saved_tensors
        scaling, stride, padding, dilation, groups, has_bias = ctx.conf
        need_x = ctx.needs_input_grad[0]
        need_lora = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        need_bias = has_bias and ctx.needs_input_grad[2]
        kernel = _kernel(weight, lora_a, lora_b, mask, scaling) if need_x else weight
        grad_x, grad_k, grad_bias = torch.ops.aten.convolution_backward(
            grad_y, x, kernel, [kernel.shape[0]] if need_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [need_x, need_lora, need_bias],
        )  # fmt: skip
        grad_a = grad_b = None
        if need_lora:
            g = grad_k.reshape(weight.shape[0], -1)
            if mask is not None:
                g = g.mul_(mask.reshape_as(g))
            grad_a = (lora_b.t() @ g).mul_(scaling) if ctx.needs_input_grad[3] else None
            grad_b = (g @ lora_a.t()).mul_(scaling) if ctx.needs_input_grad[4] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None, None, None


def lora_conv2d(x, conv: nn.Conv2d, lora_a, lora_b, mask, scaling: float) -> torch.Tensor:
    """``conv`` applied with kernel ``W + M ⊙ s·(B A)`` (``mask`` None: plain LoRA); the base
    kernel must be frozen. Padding modes other than zeros and string paddings are refused."""
    if conv.weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_conv2d trains only the adapters: freeze the base kernel first")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"LoRA convolutions support zero padding given as numbers, got "
                         f"{conv.padding_mode!r} / {conv.padding!r}")  # fmt: skip
    return _LoraConv2dFn.apply(x, conv.weight, conv.bias, lora_a, lora_b, mask, scaling, conv.stride, conv.padding,
                               conv.dilation, conv.groups)  # fmt: skip


class MaskedLoRAConv(nn.Module):
    """Wraps an ``nn.Conv2d`` (or ``nn.Linear``) ``base_layer``, frozen, with a masked or plain LoRA update."""

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
        if isinstance(base, nn.Linear):
            return F.linear(x, base.weight + self.get_delta_weight(), base.bias)
        return lora_conv2d(x, base, self.lora_A, self.lora_B, self.lora_mask, self.spec.scaling)


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

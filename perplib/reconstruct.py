"""Block-wise local reconstruction after pruning ("A Free Lunch in LLM Compression",
arXiv 2510.14444; EBFT, arXiv 2402.12419): fit each pruned decoder block's output to the dense
block's output on calibration data, block by block, with a few AdamW steps.

It is a :class:`perplib.pruning.BlockHook` of the one pruning driver: the hook carries a second
activation stream through the *dense* blocks (the targets), while the driver's own stream (the
pruned model's activations) is the input each pruned block is trained on. The trainable set is
chosen like PERP's groups: ``weights`` (the pruned matrices themselves, zeros kept), ``biases``,
``norms`` and ``lora`` (masked LoRA from :mod:`perplib.lora`, merged into the block before the
next block is pruned), any ``+``-joined combination. Every zero stays a zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import BlockInput, block_linears, run_block
from .lora import LoraSpec, add_lora_, merge_
from .pruning import BlockHook

GROUPS = ("weights", "biases", "norms", "lora")


def parse_groups(text: str) -> tuple[str, ...]:
    """'weights+norms' -> ('weights', 'norms') in canonical order; rejects unknown groups."""
    parts = tuple(p.strip() for p in str(text).split("+") if p.strip())
    bad = [p for p in parts if p not in GROUPS]
    if bad or not parts:
        raise ValueError(f"reconstruct must be '+'-joined groups from {list(GROUPS)} (e.g. 'norms+lora'), got {text!r}")
    return tuple(g for g in GROUPS if g in parts)


@dataclass(frozen=True)
class ReconstructSpec:
    """What each pruned block trains, and how long."""

    groups: tuple[str, ...] = field(default=("weights",), metadata={"help": "trainable set (see GROUPS)"})
    steps: int = field(default=8, metadata={"help": "AdamW steps per block, one calibration batch each (cycled)"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (constant)"})
    lora: LoraSpec = field(default_factory=LoraSpec, metadata={"help": "masked LoRA of the 'lora' group"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", parse_groups("+".join(self.groups)))
        if not (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1):
            raise ValueError(f"reconstruction steps per block must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"reconstruction lr must be > 0, got {self.lr!r}")
        if "lora" in self.groups and self.lora.kind != "masked":
            raise ValueError("block-wise reconstruction merges its LoRA into the pruned block: use masked LoRA")


def block_loss(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs against ``targets`` over all batches."""
    with torch.no_grad():
        total = sum(
            float(nn.functional.mse_loss(run_block(block, i).float(), t.float()))
            for i, t in zip(inputs, targets, strict=True)
        )
    return total / len(inputs)


def reconstruct_block_(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor],
                       spec: ReconstructSpec) -> dict[str, float]:  # fmt: skip
    """Train ``block`` in place so that ``block(inputs[b]) ≈ targets[b]`` (MSE, AdamW, batch ``b``
    cycled over ``spec.steps``); zeros of its linear weights stay exact zeros. Returns the first
    and last step's loss."""
    linears = block_linears(block)  # Conv1D too: masks and grads have its weight's own shape
    masks = {n: m.weight.detach() != 0 for n, m in linears.items()}
    before = {p: p.requires_grad for p in block.parameters()}
    for p in before:
        p.requires_grad_(False)
    if "lora" in spec.groups:
        add_lora_(block, spec.lora, list(linears))  # masked: the update keeps every zero
    params: list[nn.Parameter] = []
    if "weights" in spec.groups:
        params += [m.weight for m in linears.values()]
    if "biases" in spec.groups:
        params += [m.bias for m in linears.values() if m.bias is not None]
    if "norms" in spec.groups:
        params += [
            p for m in block.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)
        ]
    if "lora" in spec.groups:
        params += [p for n, p in block.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    losses = []
    if params:
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        with torch.enable_grad():
            for step in range(spec.steps):
                b = step % len(inputs)
                loss = nn.functional.mse_loss(run_block(block, inputs[b]).float(), targets[b].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if "weights" in spec.groups:  # no gradient, hence no Adam moment, on a pruned weight
                    for n, m in linears.items():
                        if m.weight.grad is not None:
                            m.weight.grad.mul_(masks[n])
                opt.step()
                losses.append(float(loss.detach()))
    if "lora" in spec.groups:
        merge_(block)
    with torch.no_grad():
        for n, m in block.named_modules():
            if n in masks:
                m.weight.mul_(masks[n])  # exact zeros whatever the arithmetic
    for p, flag in before.items():
        p.requires_grad_(flag)
    return {"loss_first": losses[0] if losses else math.nan, "loss_last": losses[-1] if losses else math.nan}


class Reconstruction(BlockHook):
    """The hook: dense targets before a block is pruned, reconstruction after."""

    def __init__(self, spec: ReconstructSpec) -> None:
        self.spec = spec
        self.dense: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.blocks: list[dict[str, float]] = []

    def start(self, inputs: list[BlockInput]) -> None:
        self.dense = [inp.hidden.clone() for inp in inputs]
        self.blocks = []

    def before(self, index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        # the dense stream: this (still dense) block on the dense model's own activations
        with torch.no_grad():
            self.targets = [
                run_block(block, BlockInput(d.to(inp.hidden.device), inp.kwargs))
                for d, inp in zip(self.dense, inputs, strict=True)
            ]
        self.dense = self.targets

    def after(self, index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        self.blocks.append(reconstruct_block_(block, inputs, self.targets, self.spec))

    def summary(self) -> dict[str, Any]:
        """Per-block first/last losses for the record."""
        return {
            "groups": "+".join(self.spec.groups), "steps": self.spec.steps, "lr": self.spec.lr,
            "loss_first": [b["loss_first"] for b in self.blocks], "loss_last": [b["loss_last"] for b in self.blocks],
        }  # fmt: skip

"""One adapter table for all model families: where the decoder blocks, the head and the
embeddings live, and how to run one block on captured inputs.

The pruning driver and the retraining code only talk to a model through this module, so a new
family is one row in ``FAMILIES``, never a copy of the driver (STYLE: no ``opt.py``/``llama.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Attribute paths of one family, relative to the ``*ForCausalLM`` model."""

    family: str
    decoder: str  # module that owns the block list and runs embeddings -> blocks -> final norm
    layers: str = "layers"  # attribute of the decoder holding the nn.ModuleList of blocks
    head: str = "lm_head"
    embeddings: tuple[str, ...] = field(default=())

    def decoder_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.decoder)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder_module(model), self.layers)

    def block_prefix(self, index: int) -> str:
        return f"{self.decoder}.{self.layers}.{index}"

    def prunable(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every ``nn.Linear`` inside the decoder blocks (not embeddings, not the head), by
        qualified name, in forward order (Section 2.3: uniform sparsity over these)."""
        out: dict[str, nn.Linear] = {}
        for i, block in enumerate(self.blocks(model)):
            for name, mod in block.named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"{self.block_prefix(i)}.{name}"] = mod
        return out

    def norms(self, model: nn.Module) -> dict[str, nn.Module]:
        """LayerNorm / RMSNorm modules (any class whose name contains 'Norm')."""
        return {n: m for n, m in model.named_modules() if n and "norm" in type(m).__name__.lower()}

    def head_module(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.head)

    def embedding_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(name) for name in self.embeddings}


FAMILIES: dict[str, ModelAdapter] = {
    "llama": ModelAdapter("llama", "model", embeddings=("model.embed_tokens",)),
    "mistral": ModelAdapter("mistral", "model", embeddings=("model.embed_tokens",)),
    "mixtral": ModelAdapter("mixtral", "model", embeddings=("model.embed_tokens",)),
    "qwen2": ModelAdapter("qwen2", "model", embeddings=("model.embed_tokens",)),
    "qwen3": ModelAdapter("qwen3", "model", embeddings=("model.embed_tokens",)),
    "opt": ModelAdapter(
        "opt", "model.decoder", embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions")
    ),
    "gpt_neox": ModelAdapter("gpt_neox", "gpt_neox", embeddings=("gpt_neox.embed_in",)),
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a Hugging Face causal LM, by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"no adapter for model type {model_type!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


@dataclass
class BlockInput:
    """What the decoder passes to a block for one calibration batch: the hidden states and the
    keyword arguments (rotary position embeddings, attention mask, position ids, ...)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors nested in tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


_DROP = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache", "output_attentions")


def capture_block_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str | None = None
) -> list[BlockInput]:
    """Run a *truncated* forward (the decoder with only its first block) over ``batches`` of token
    ids and record what block 0 receives. Only the decoder's own modules and block 0 visit
    ``device``; everything is moved back afterwards, so the model can live on the CPU."""
    from . import offload  # a device-mapped model: its modules may be offloaded (meta) or on other GPUs

    adapter = adapter_for(model)
    decoder = adapter.decoder_module(model)
    blocks = adapter.blocks(model)
    device = torch.device(device) if device is not None else offload.input_device(model)
    captured: list[BlockInput] = []

    def record(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        # caches are per forward and meaningless for replay; None-valued arguments are defaults
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROP and v is not None}
        captured.append(BlockInput(hidden.detach(), kwargs))

    visiting = [m for n, m in decoder.named_children() if n != adapter.layers] + [blocks[0]]
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    setattr(decoder, adapter.layers, nn.ModuleList([blocks[0]]))
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(offload.paused_hooks(decoder, recurse=False))
            for m in visiting:  # each to `device` and back (for a plain model: m.to(device), m.to(home))
                stack.enter_context(offload.materialized(m, device))
            with torch.no_grad():
                for ids in batches:
                    decoder(input_ids=ids.to(device), use_cache=False)
    finally:
        setattr(decoder, adapter.layers, blocks)
        handle.remove()
    return captured


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """Run one decoder block on captured inputs and return its output hidden states."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out

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


# --- LoRA target sets (Section 3.1; issue 15) -----------------------------------------------------
# Which prunable layers get LoRA. Sets are found by role inside each block's attention module (its
# linear layers' own names: q/k/v projections, output projection), so they work for any family.
#   qv        the query and value projections ("rank 16 for each attention matrix" with q,v: the
#             paper's "% trainable" column for OPT, e.g. 0.35% on OPT-1.3B, 0.09% on OPT-30B)
#   attention every linear layer of the attention module (q, k, v, output; a fused qkv included)
#   all       every prunable linear layer of the blocks (the released PERP code's target list)
#   paper     the set that reproduces the paper's "% trainable" column for the model's family
#             (PAPER_LORA_SETS; every other family: all, which gives LLaMA-2's 0.60/0.49/0.30%
#             and Mistral-7B's 0.59%)
PAPER_LORA_SETS = {
    "opt": "qv",  # Tables 1, 4-8: 0.35 / 0.27 / 0.13 / 0.09% for OPT-1.3B/2.7B/13B/30B only with q,v
    "mixtral": "attention",  # Mixtral-8x7B's 0.03%: attention only, the experts get no LoRA
}
_QUERY = {"q_proj", "q", "query", "wq", "q_lin", "query_proj"}
_KEY = {"k_proj", "k", "key", "wk", "k_lin", "key_proj"}
_VALUE = {"v_proj", "v", "value", "wv", "v_lin", "value_proj"}


def attention_module(block: nn.Module) -> tuple[str, nn.Module]:
    """The attention sub-module of a decoder block (its class name says Attention), by name."""
    for name, module in block.named_modules():
        if name and "attention" in type(module).__name__.lower():
            if any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in module.modules()):
                return name, module
    raise ValueError(f"no attention module found in the block {type(block).__name__}")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def attention_role(name: str) -> str:
    """'q', 'k', 'v' or 'other' (output projection, fused qkv) for a layer of an attention module."""
    last = name.rsplit(".", 1)[-1].lower()
    return "q" if last in _QUERY else "k" if last in _KEY else "v" if last in _VALUE else "other"


def resolve_lora_set(model: nn.Module, which: str) -> str:
    """``paper`` -> the family's set (``PAPER_LORA_SETS``, else ``all``); other names unchanged."""
    from .config import LORA_TARGET_SETS

    if which not in LORA_TARGET_SETS:
        raise ValueError(f"LoRA targets must be one of {list(LORA_TARGET_SETS)}, got {which!r}")
    if which != "paper":
        return which
    return PAPER_LORA_SETS.get(getattr(getattr(model, "config", None), "model_type", None), "all")


def lora_target_layers(model: nn.Module, which: str = "all") -> tuple[list[str], dict[str, Any]]:
    """The prunable layers (qualified names, forward order) that get LoRA under the set ``which``,
    and a description for records: the set asked for, the set it resolved to and the layers of one
    block it names (``{"set": "paper", "resolved": "qv", "modules": ["self_attn.q_proj", ...]}``).
    A set the model cannot form (``qv`` with a fused q/k/v projection) is an error naming why."""
    adapter = adapter_for(model)
    resolved = resolve_lora_set(model, which)
    prunable = list(adapter.prunable(model))
    chosen = set(prunable)
    if resolved != "all":
        chosen = set()
        for i, block in enumerate(adapter.blocks(model)):
            attn_name, attn = attention_module(block)
            prefix = f"{adapter.block_prefix(i)}.{attn_name}."
            names = [n for n in prunable if n.startswith(prefix)]
            if resolved == "qv":
                names = [n for n in names if attention_role(n) in ("q", "v")]
                roles = {attention_role(n) for n in names}
                if roles != {"q", "v"}:
                    raise ValueError(
                        f"LoRA targets 'qv' need separate query and value projections, but the attention of "
                        f"{adapter.family!r} ({type(attn).__name__}: {[n.removeprefix(prefix) for n in prunable if n.startswith(prefix)]}) "
                        "has none (a fused q/k/v projection?); use 'attention' or 'all'"
                    )
            if not names:
                raise ValueError(f"no prunable layer in the attention module {prefix.rstrip('.')!r}")
            chosen.update(names)
    layers = [n for n in prunable if n in chosen]
    first = adapter.block_prefix(0) + "."
    modules = [n.removeprefix(first) for n in layers if n.startswith(first)]
    return layers, {"set": which, "resolved": resolved, "modules": modules}


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

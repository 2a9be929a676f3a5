"""Where a causal LM keeps its decoder blocks, prunable matrices, norms, head and embeddings, and
how to run one block on captured inputs.

The pruning driver and the retraining code only talk to a model through this module. The adapter
is found from the model's structure and configuration, not its name (``discover``): the blocks are
the ``nn.ModuleList`` of ``num_hidden_layers`` blocks of one class, the prunable matrices every
``nn.Linear`` inside them (GPT-2's ``Conv1D`` as its transposed matrix, ``matrix()``), the norms
found by module type, the head is ``get_output_embeddings()``, the embeddings the ``nn.Embedding``
modules outside the blocks. ``FAMILIES`` holds explicit entries only where that rule is wrong
(none is needed for the families tested: OPT, LLaMA, Mistral, Mixtral, Qwen2/3, GPT-NeoX, Gemma 3,
Phi-3, GPT-2).

Fused mixture-of-experts tensors (Mixtral, Qwen2-MoE, Qwen3-MoE, ... in transformers 5: one module
holding 3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)) are pruned like
linear layers, one matrix per expert and projection (``expert_views``: ``mlp.experts.3.gate_proj``,
``.up_proj``, ``.down_proj``, each an :class:`ExpertMatrix` whose weight is a *view* of its slice of
the 3-D tensor, so pruning the view prunes the tensor). Such a module is found by structure: it
carries transformers' experts-implementation interface (``use_experts_implementation`` sets its
layout flags ``has_gate``, ``is_transposed``, ``is_concatenated``, ``has_bias``), and
``routed_experts`` runs its forward through the views, so input-statistics hooks on them see the
tokens the router sends to each expert. 3-D parameters of any other module are not read as matrices:
``fused_experts`` lists them, they stay dense and the prune report names them.
"""

from __future__ import annotations

import contextlib
import types
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

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the decoder blocks (not embeddings, not
        the head) and every expert matrix of a fused experts module (:class:`ExpertMatrix`, views made
        now: not modules of the model), by qualified name, in definition order (Section 2.3: uniform
        sparsity over these). ``matrix(module)`` is its weight as an out x in matrix."""
        out: dict[str, nn.Module] = {}
        for i, block in enumerate(self.blocks(model)):
            for name, mod in block_matrices(block).items():
                out[f"{self.block_prefix(i)}.{name}"] = mod
        return out

    def norms(self, model: nn.Module) -> dict[str, nn.Module]:
        """Normalisation modules by type: torch's LayerNorm / RMSNorm / GroupNorm and any class whose
        name says Norm (LlamaRMSNorm, Gemma3RMSNorm, ...); q/k norms inside attention included."""
        return {n: m for n, m in model.named_modules() if n and is_norm(m)}

    def head_module(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.head)

    def fused_experts(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """3-D parameters inside the blocks that are not read as expert matrices (their module does
        not carry the experts interface, see the module docstring): not pruned, by name."""
        out = {}
        for i, block in enumerate(self.blocks(model)):
            covered = {f"{n}.{p}" for n, m in experts_modules(block).items() for p in _EXPERT_PARAMS if hasattr(m, p)}
            out.update({f"{self.block_prefix(i)}.{n}": p for n, p in block.named_parameters()
                        if p.ndim >= 3 and n not in covered})  # fmt: skip
        return out

    def expert_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The fused 3-D expert weights that are pruned (``gate_up_proj``/``up_proj``, ``down_proj``
        of every experts module), by qualified parameter name: what Full IMP's masks hold."""
        return {
            f"{self.block_prefix(i)}.{n}.{p}": getattr(m, p)
            for i, block in enumerate(self.blocks(model))
            for n, m in experts_modules(block).items()
            for p in _EXPERT_PARAMS
            if isinstance(getattr(m, p, None), torch.Tensor)
        }

    def embedding_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(name) for name in self.embeddings}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer that stores its weight as in x out."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a prunable layer as an out x in matrix (a view: in-place edits reach the layer)."""
    return module.weight.data.t() if is_conv1d(module) else module.weight.data


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of one block by name (relative to the block), in definition order;
    a LoRA wrapper's own A/B matrices are not among them."""
    return {n: m for n, m in block.named_modules() if is_prunable(m) and ".lora_" not in f".{n}"}


def block_matrices(block: nn.Module) -> dict[str, nn.Module]:
    """Everything pruned in one block by name (relative to the block), in definition order: its
    prunable layers (``block_linears``) and, where a fused experts module sits, its expert matrices
    (``expert_views``, made now)."""
    experts = experts_modules(block)
    out: dict[str, nn.Module] = {}
    for name, module in block.named_modules():
        if name in experts:
            out.update(expert_views(module, name))
        elif is_prunable(module) and ".lora_" not in f".{name}":
            out[name] = module
    return out


# --- fused mixture-of-experts modules ---------------------------------------------------------------
_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts(module: nn.Module) -> bool:
    """A fused experts module: transformers' experts interface (layout flags set by
    ``use_experts_implementation``) and 3-D ``down_proj`` plus ``gate_up_proj`` or ``up_proj``."""
    if not all(hasattr(module, f) for f in ("has_gate", "is_transposed")):
        return False
    first = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return all(isinstance(t, torch.Tensor) and t.ndim == 3 for t in (first, down))


def experts_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules inside one block, by name relative to the block."""
    return {n: m for n, m in block.named_modules() if n and is_experts(m)}


class ExpertMatrix(nn.Linear):
    """One expert's projection inside a fused 3-D expert tensor, as a linear layer: ``weight`` (out x
    in) and ``bias`` are views of the fused parameters' slices (never copies), so in-place edits
    (pruning) reach the fused tensor. ``source``: the fused parameter's name relative to the block.
    Not a module of the model; made fresh by ``expert_views`` (a view goes stale when the fused
    parameter's storage is replaced, e.g. by ``model.to(...)``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, source: str) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.source = source


def expert_views(module: nn.Module, prefix: str = "") -> dict[str, ExpertMatrix]:
    """The expert matrices of a fused experts module: ``{prefix}.{e}.gate_proj`` / ``.up_proj`` (the
    two halves of ``gate_up_proj``: first and second half of its rows when concatenated, even and
    odd rows when interleaved) and ``.down_proj`` for every expert ``e``; a non-gated module
    (``up_proj``) has no gate. A transposed layout (E, in, out) is read as its transposed matrices."""
    pre = f"{prefix}." if prefix else ""
    transposed = bool(module.is_transposed)

    def rows(name: str, e: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = getattr(module, name).data[e]
        w = w.t() if transposed else w
        b = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
        return w[sl], None if b is None else b.data[e][sl]

    out: dict[str, ExpertMatrix] = {}
    for e in range(module.down_proj.shape[0]):
        if module.has_gate:
            two = (module.gate_up_proj.shape[2] if transposed else module.gate_up_proj.shape[1]) // 2
            concatenated = getattr(module, "is_concatenated", True)
            halves = (slice(0, two), slice(two, 2 * two)) if concatenated else (slice(0, None, 2), slice(1, None, 2))
            for proj, sl in zip(("gate_proj", "up_proj"), halves, strict=True):
                out[f"{pre}{e}.{proj}"] = ExpertMatrix(*rows("gate_up_proj", e, sl), f"{pre}gate_up_proj")
        else:
            out[f"{pre}{e}.up_proj"] = ExpertMatrix(*rows("up_proj", e, slice(None)), f"{pre}up_proj")
        out[f"{pre}{e}.down_proj"] = ExpertMatrix(*rows("down_proj", e, slice(None)), f"{pre}down_proj")
    return out


def _routed_forward(module: nn.Module, views: dict[str, nn.Module]):
    """An eager experts forward that computes every expert through its ``ExpertMatrix`` views
    (``views`` keyed ``{e}.gate_proj`` ...), on exactly the tokens the router sent to it; output
    as the module's own forward (routing weights applied, summed per token)."""
    concatenated = getattr(module, "is_concatenated", True)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.down_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            if self.has_gate:
                gate, up = views[f"{e}.gate_proj"](x), views[f"{e}.up_proj"](x)
                both = torch.cat([gate, up], -1) if concatenated else torch.stack([gate, up], -1).flatten(-2)
                h = self._apply_gate(both)
            else:
                h = self.act_fn(views[f"{e}.up_proj"](x))
            y = views[f"{e}.down_proj"](h)
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    return types.MethodType(forward, module)


class ReplacedForward:
    """A module's ``forward`` replaced until :meth:`remove` (a hook-handle-like object), which gives
    back the module's own: the class's, or an instance's own ``forward`` (e.g. accelerate's wrapper
    of an offloaded module)."""

    def __init__(self, module: nn.Module, forward) -> None:
        self.module, self.own = module, vars(module).get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.own is None:
            del self.module.forward
        else:
            self.module.forward = self.own


@contextlib.contextmanager
def routed_experts(block: nn.Module, matrices: dict[str, nn.Module]):
    """Within the block, run every fused experts module through its views in ``matrices`` (names
    relative to the block, as ``block_matrices`` gives them), so forward hooks on the views see the
    tokens routed to each expert; the modules' own forward is back afterwards (an instance's own
    ``forward``, e.g. accelerate's wrapper of an offloaded module, included)."""
    patched: list[ReplacedForward] = []
    try:
        for name, module in experts_modules(block).items():
            views = {k.removeprefix(f"{name}."): v for k, v in matrices.items() if isinstance(v, ExpertMatrix)
                     and k.startswith(f"{name}.")}  # fmt: skip
            if views:
                patched.append(ReplacedForward(module, _routed_forward(module, views)))
        yield
    finally:
        for replaced in reversed(patched):
            replaced.remove()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


# Explicit entries only where the structural rule of ``discover`` is wrong for a family (each with a
# comment saying why); none is needed today.
FAMILIES: dict[str, ModelAdapter] = {}


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def check_causal_lm(config: Any) -> None:
    """Refuse, before any weights load, a configuration perplib cannot treat as a decoder-only
    causal LM, naming why."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model type {model_type!r} is an encoder-decoder model: perplib prunes decoder-only causal LMs, "
            "whose blocks take the token ids' hidden states one causal block after another"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model type {model_type!r} has no causal-LM class in transformers (AutoModelForCausalLM), so it "
            "cannot be evaluated by next-token perplexity nor retrained on text"
        )
    if not getattr(_text_config(config), "num_hidden_layers", None):
        raise ValueError(f"model type {model_type!r}: its configuration gives no num_hidden_layers (block count)")


def discover(model: nn.Module) -> ModelAdapter:
    """The adapter of a decoder-only causal LM from its structure and configuration (see the module
    docstring). Raises a ValueError naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    n = getattr(_text_config(config), "num_hidden_layers", None) if config is not None else None
    if not n:
        raise ValueError(f"model of type {model_type!r} has no config.num_hidden_layers: no decoder blocks to find")
    lists = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n and len({type(b) for b in m}) == 1
        and any(is_prunable(x) for x in m[0].modules())
    ]  # fmt: skip
    if not lists:
        raise ValueError(
            f"model of type {model_type!r}: no nn.ModuleList of its {n} decoder blocks (one block class, with linear "
            "layers inside) was found, so it cannot be pruned block by block"
        )
    name = min((nm for nm, _ in lists), key=lambda nm: nm.count("."))  # the outermost
    decoder, _, layers = name.rpartition(".")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"model of type {model_type!r} has no output head (get_output_embeddings() is None)")
    names = {id(m): nm for nm, m in model.named_modules()}
    embeddings = tuple(
        nm for nm, m in model.named_modules() if isinstance(m, nn.Embedding) and not nm.startswith(name + ".")
    )
    return ModelAdapter(model_type or type(model).__name__, decoder, layers, names[id(head)], embeddings)


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
    A set the model cannot form (``qv`` with a fused q/k/v projection) is an error naming why.
    Expert matrices of fused 3-D expert tensors get no LoRA (a LoRA layer wraps a linear module;
    the paper's Mixtral set is attention only): under ``all`` they are skipped, and the description
    says so (``"skipped": {"fused_experts": [names relative to the block], "why": ...}``)."""
    adapter = adapter_for(model)
    resolved = resolve_lora_set(model, which)
    matrices = adapter.prunable(model)
    prunable = [n for n, m in matrices.items() if not isinstance(m, ExpertMatrix)]
    experts = sorted({n for block in adapter.blocks(model) for n in experts_modules(block)})
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
    described: dict[str, Any] = {"set": which, "resolved": resolved, "modules": modules}
    if resolved == "all" and len(prunable) < len(matrices):
        described["skipped"] = {
            "fused_experts": experts,
            "why": "expert matrices are slices of fused 3-D tensors, not linear modules a LoRA layer can wrap",
        }
    return layers, described


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a Hugging Face causal LM: an explicit ``FAMILIES`` entry, else ``discover``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILIES[model_type] if model_type in FAMILIES else discover(model)


@dataclass
class BlockInput:
    """What the decoder passes to a block for one calibration batch: the hidden states and the
    keyword arguments (rotary position embeddings, attention mask, position ids, ...)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    # the keyword arguments every block receives (blocks may differ: Gemma 3's sliding-window and
    # global layers get different masks and rotary tables); ``use(i)`` makes block i's current
    block_kwargs: list[dict[str, Any]] = field(default_factory=list)

    def use(self, index: int, device: torch.device | str | None = None) -> None:
        if self.block_kwargs:
            self.kwargs = self.block_kwargs[index] if device is None else to_device(self.block_kwargs[index], device)


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
    """Run a *truncated* forward (the decoder with its first block, the others replaced by stand-ins
    that only record their arguments and pass block 0's output on) over ``batches`` of token ids and
    record what block 0 receives and the keyword arguments of every block (``BlockInput.use``).
    Only the decoder's own modules and block 0 visit ``device``; everything is moved back
    afterwards, so the model can live on the CPU."""
    from . import offload  # a device-mapped model: its modules may be offloaded (meta) or on other GPUs

    adapter = adapter_for(model)
    decoder = adapter.decoder_module(model)
    blocks = adapter.blocks(model)
    device = torch.device(device) if device is not None else offload.input_device(model)
    captured: list[BlockInput] = []
    last: list[Any] = [None]

    import inspect

    signature = inspect.signature(blocks[0].forward)
    first = next(iter(signature.parameters))  # the hidden states
    var_keyword = next((n for n, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)

    def clean(args, kwargs):
        # positional arguments by name (GPT-2 passes its mask positionally); caches are per forward
        # and meaningless for replay; None-valued arguments are defaults
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop(var_keyword, {}) if var_keyword else {}
        bound = {**bound, **extra}
        hidden = bound.pop(first, None)
        return hidden, {k: v for k, v in bound.items() if k not in _DROP and v is not None}

    def record(_module, args, kwargs):
        hidden, kwargs = clean(args, kwargs)
        captured.append(BlockInput(hidden.detach(), kwargs, [kwargs]))

    def keep_output(_module, _args, output):
        last[0] = output

    def stand_in(_index, args, kwargs):
        captured[-1].block_kwargs.append(clean(args, kwargs)[1])
        return last[0]

    visiting = [m for n, m in decoder.named_children() if n != adapter.layers] + [blocks[0]]
    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    handle_out = blocks[0].register_forward_hook(keep_output)
    setattr(decoder, adapter.layers, nn.ModuleList([blocks[0], *(_StandIn(b, i, stand_in) for i, b in
                                                                   enumerate(blocks) if i)]))  # fmt: skip
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
        handle_out.remove()
    return captured


class _StandIn(nn.Module):
    """In place of block ``index`` while inputs are captured: records its arguments, returns the
    output of block 0 (the right type for the decoder's loop), and answers attribute look-ups the
    decoder makes on its blocks (e.g. Gemma 3's ``attention_type``) from the real block."""

    def __init__(self, block: nn.Module, index: int, sink) -> None:
        super().__init__()
        object.__setattr__(self, "_real", block)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_sink", sink)

    def forward(self, *args, **kwargs):
        return self._sink(self._index, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_real"), name)


def run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """Run one decoder block on captured inputs and return its output hidden states."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out

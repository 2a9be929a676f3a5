"""Will a run fit? Peak memory per device, from a model's configuration alone (``perp plan``).

The paper retrains OPT-30B with PERP on one 80 GB A100 (bf16 frozen weights, fp32 trainable
parameters, gradient checkpointing) where Full IMP needs several GPUs (Sections 1, 3.2). This
module says so before a run, for any model whose ``config.json`` is at hand:

- **parameters** are counted on the model built on the ``meta`` device (accelerate's
  ``init_empty_weights``: no weights are read or allocated), after the same
  ``perplib.retrain.mark_trainable_`` a run uses, so the trainable set (LoRA targets, head mode,
  tied head) is the run's own;
- **activations** are counted, not fitted: a *narrow* copy of the configuration (same family and
  code path, widths divided by a common factor ``k``, head size kept, two blocks, a tiny
  vocabulary) runs one training forward on the CPU under autograd's saved-tensor hooks, which
  report every tensor kept for the backward pass; bytes per token per block scale back by ``k``;
- the rest is arithmetic, per component (:data:`COMPONENTS`) and per device.

Assumptions, stated once: SDPA/flash attention (no ``seqlen²`` attention matrix is kept); the
training loop of ``perplib.retrain.train_`` (AdamW with two fp32 moments, fp32 master copies of
what trains when the weights are half precision, autocast, non-reentrant checkpointing that keeps
each block's input); the loss of Hugging Face causal LMs (fp32 logits and log-softmax); several
GPUs hold contiguous ranges of blocks (accelerate's device map, no tensor parallelism); gradients
live alongside the next micro-batch's activations (gradient accumulation, as in the paper; with
one micro-batch per step the estimate is an upper bound). ``fits``
means the estimate is at most ``1 - headroom`` of a GPU's memory (the rest: CUDA context, allocator
fragmentation). ``benchmarks/plan_vs_measured.py`` checks the estimate against measured peaks.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

GiB = 2**30
COMPONENTS = {
    "weights": "frozen weights, in the model dtype",
    "trainable": "what trains, as fp32 master copies (LoRA matrices included)",
    "gradients": "fp32 gradients of what trains",
    "optimizer": "AdamW's two fp32 moments per trained parameter",
    "masks": "boolean pruning masks: Full IMP's enforced masks, masked LoRA's M",
    "autocast": "half-precision copies of trained weight matrices that autocast keeps during a step",
    "activations": "tensors saved for the backward pass (block inputs only, plus one block, with checkpointing)",
    "logits": "batch x seqlen x vocab: logits, fp32 log-softmax and its gradient",
    "workspace": "transients of one layer: backward buffers, masked LoRA's effective weight",
}
METHOD_NAMES = {"none": "no retraining", "full": "Full IMP", "perp": "PERP", "ln": "LN-Parameters",
                "biases": "Biases", "linear-probing": "Linear Probing"}  # fmt: skip
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Architecture hyperparameters of the paper's models (Section 2.3, Tables 1-10) as their public
# config.json files state them, so that `perp plan` answers for them offline. Only the sizes
# matter to a plan; any other model needs its own config.json (a folder or the HF cache).
_OPT = {"model_type": "opt", "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True,
        "activation_function": "relu", "enable_bias": True, "torch_dtype": "float16", "pad_token_id": 1,
        "bos_token_id": 2, "eos_token_id": 2}  # fmt: skip
_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float16", "bos_token_id": 1,
           "eos_token_id": 2}  # fmt: skip
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    **{f"facebook/opt-{size}": {**_OPT, "hidden_size": h, "word_embed_proj_dim": h, "ffn_dim": 4 * h,
                                "num_hidden_layers": layers, "num_attention_heads": heads}
       for size, h, layers, heads in [("1.3b", 2048, 24, 32), ("2.7b", 2560, 32, 32), ("6.7b", 4096, 32, 32),
                                      ("13b", 5120, 40, 40), ("30b", 7168, 48, 56), ("66b", 9216, 64, 72)]},
    **{f"meta-llama/Llama-2-{size}-hf": {**_LLAMA2, "hidden_size": h, "intermediate_size": i,
                                         "num_hidden_layers": layers, "num_attention_heads": heads,
                                         "num_key_value_heads": kv}
       for size, h, i, layers, heads, kv in [("7b", 4096, 11008, 32, 32, 32), ("13b", 5120, 13824, 40, 40, 40),
                                             ("70b", 8192, 28672, 80, 64, 8)]},
    "mistralai/Mistral-7B-v0.1": {**_LLAMA2, "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "max_position_embeddings": 32768, "sliding_window": 4096, "torch_dtype": "bfloat16"},
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------


def _default_lora_targets() -> str | None:
    """RunConfig's default LoRA target set, where RunConfig has one (None: every prunable linear)."""
    from .config import RunConfig

    return getattr(RunConfig(), "lora_targets", None)


def run_seqlen(seqlen: int | None, context: int | None) -> int:
    """The sequence length a run uses: ``seqlen``, or the model's context capped at 4096 as a run
    with ``seqlen=None`` resolves it (:func:`perplib.experiments.context_seqlen`)."""
    from .experiments import SEQLEN_CAP

    return seqlen or (min(context, SEQLEN_CAP) if context else 2048)


@dataclass(frozen=True)
class PlanSpec:
    """What to plan for; defaults are the paper's LLM setting (Section 2.3, Appendix A)."""

    model: str = field(metadata={"help": "embedded alias, local folder with config.json, HF id (cache or paper model)"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights dtype: float32|bfloat16|float16"})
    seqlen: int | None = field(default=None, metadata={"help": "tokens per sequence (None: the model's context)"})
    batch_size: int = field(default=2, metadata={"help": "micro-batch of retraining, sequences"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    retrain: str = field(default="perp", metadata={"help": "preset or '+'-joined parameter groups"})
    lora: str = field(default="masked", metadata={"help": "LoRA kind: masked | plain"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    head: str = field(default="lora", metadata={"help": "how the head group trains: lora | full"})
    lora_targets: str | None = field(default_factory=_default_lora_targets, metadata={"help": "LoRA target set"})
    prune: str = field(default="sparsegpt", metadata={"help": "criterion of the pruning step planned alongside"})
    nsamples: int = field(default=128, metadata={"help": "calibration windows of seqlen tokens"})
    prune_batch: int = field(default=8, metadata={"help": "calibration windows per forward (prune_'s batch_size)"})
    gpus: int = field(default=1, metadata={"help": "GPUs to plan for (hypothetical: need not be present)"})
    gpu_memory: int = field(default=80 * GiB, metadata={"help": "memory of each GPU, bytes"})
    headroom: float = field(default=0.1, metadata={"help": "share of a GPU left free (CUDA context, fragmentation)"})

    def __post_init__(self) -> None:
        from .config import HEAD_MODES, LORA_KINDS, retrain_groups
        from .pruning import METHODS

        if self.dtype not in _BYTES:
            raise ValueError(f"dtype must be one of {list(_BYTES)}, got {self.dtype!r}")
        retrain_groups(self.retrain)
        if self.lora not in LORA_KINDS:
            raise ValueError(f"lora must be one of {list(LORA_KINDS)}, got {self.lora!r}")
        if self.head not in HEAD_MODES:
            raise ValueError(f"head must be one of {list(HEAD_MODES)}, got {self.head!r}")
        if self.prune not in METHODS:
            raise ValueError(f"prune must be one of {list(METHODS)}, got {self.prune!r}")
        for name in ("batch_size", "lora_rank", "nsamples", "prune_batch", "gpus", "gpu_memory"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seqlen is not None and not (isinstance(self.seqlen, int) and self.seqlen >= 1):
            raise ValueError(f"seqlen must be an integer >= 1, got {self.seqlen!r}")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom!r}")

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * (1 - self.headroom))


# ---------------------------------------------------------------------------------------------
# The model, from its configuration
# ---------------------------------------------------------------------------------------------


def read_config(name: str):
    """The configuration of ``name`` without the network: an embedded or ``tiny-*`` alias, a local
    folder, the Hugging Face cache, or one of the paper's models (:data:`PAPER_CONFIGS`)."""
    from transformers import AutoConfig

    from . import models

    if name.startswith("tiny-") or name == models.EMBEDDED or models.is_gguf(name):
        return models.model_config(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        cause = e
    if name in PAPER_CONFIGS:
        values = dict(PAPER_CONFIGS[name])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    raise ValueError(
        f"cannot read the configuration of {name!r} offline: it is not an embedded alias {models.known_aliases()}, "
        f"not a local folder, not in the Hugging Face cache and not one of the paper's models {sorted(PAPER_CONFIGS)}. "
        f"Put its config.json (nothing else is needed) into a folder and pass that folder as --model, or fill the "
        f"cache with `huggingface-cli download {name} config.json` where there is network. ({type(cause).__name__})"
    )


def _text_config(config):
    return getattr(config, "text_config", None) or config


@lru_cache(maxsize=4)
def _empty_of(name: str, dtype: str) -> nn.Module:
    """The model of ``name`` on the meta device, built once (callers that change it take a copy)."""
    return _empty(read_config(name), dtype)


def _empty(config, dtype: str) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .models import _DTYPES

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    model.tie_weights()
    return model


def mark_as_run(model: nn.Module, groups: tuple[str, ...], spec: PlanSpec, kind: str):
    """``mark_trainable_`` as a run calls it (LoRA targets passed on where it takes them)."""
    import inspect

    from .lora import LoraSpec
    from .retrain import mark_trainable_

    extra = {}
    if spec.lora_targets is not None and "targets" in inspect.signature(mark_trainable_).parameters:
        extra["targets"] = spec.lora_targets
    lora = LoraSpec(kind=kind, rank=spec.lora_rank, alpha=2.0 * spec.lora_rank)
    return mark_trainable_(model, groups, lora=lora, head=spec.head, **extra)


@dataclass
class _Part:
    """Parameters of one placement unit (a block, or the embeddings / final norm / head)."""

    frozen: int = 0  # elements kept in the model dtype
    trained: int = 0  # elements trained (fp32 master copies)
    trained_matrices: int = 0  # of which matrices (autocast keeps half-precision copies of them)
    masks: int = 0  # boolean mask elements
    largest: int = 0  # elements of the largest linear weight


@dataclass(frozen=True)
class Shape:
    """What a plan needs to know about a model, and nothing else."""

    name: str
    family: str
    layers: int
    hidden: int
    vocab: int
    context: int | None
    params: int
    head_tied: bool
    blocks: list[_Part]
    embed: _Part
    tail: _Part  # final norm and head (on the embedding's device when the head is tied)


def _units(model: nn.Module, adapter, masks: dict[str, int], tied: bool) -> tuple[list[_Part], _Part, _Part]:
    n = len(adapter.blocks(model))
    blocks = [_Part() for _ in range(n)]
    embed, tail = _Part(), _Part()
    embed_names = tuple(adapter.embeddings)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = tail
        for i in range(n):
            if name.startswith(adapter.block_prefix(i) + "."):
                part = blocks[i]
                break
        else:
            if name.startswith(embed_names):
                part = embed
        if p.requires_grad:
            part.trained += p.numel()
            # autocast casts what linear layers read; an embedding lookup reads its table as it is
            cast = p.ndim >= 2 and "lora_" not in name and (part is not embed or tied)
            part.trained_matrices += p.numel() if cast else 0
        else:
            part.frozen += p.numel()
        if p.ndim == 2 and "lora_" not in name and part is not embed:
            part.largest = max(part.largest, p.numel())
    for name, count in masks.items():
        i = next((i for i in range(n) if name.startswith(adapter.block_prefix(i) + ".")), None)
        (blocks[i] if i is not None else tail).masks += count
    return blocks, embed, tail


@lru_cache(maxsize=64)
def _shape_cached(name: str, dtype: str, groups: tuple[str, ...], kind: str, spec_key: tuple) -> Shape:
    spec = PlanSpec(**dict(spec_key))
    import copy

    from .adapters import adapter_for
    from .lora import lora_layers

    config = read_config(name)
    model = copy.deepcopy(_empty_of(name, dtype))
    adapter = adapter_for(model)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    params = sum(p.numel() for p in model.parameters())
    masks: dict[str, int] = {}
    if groups:
        trainable = mark_as_run(model, groups, spec, kind="plain")  # the masked kind's mask needs real weights
        masks = {n: m.numel() for n, m in trainable.masks.items()}  # Full IMP
        if kind == "masked":
            masks |= {
                n: layer.get_base_layer().weight.numel()
                for n, layer in lora_layers(model).items()
                if n != adapter.head  # a dense head gets no mask
            }
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    blocks, embed, tail = _units(model, adapter, masks, bool(tied))
    text = _text_config(config)
    return Shape(
        name=name,
        family=adapter.family,
        layers=len(blocks),
        hidden=int(text.hidden_size),
        vocab=int(text.vocab_size),
        context=getattr(text, "max_position_embeddings", None),
        params=params,
        head_tied=bool(tied),
        blocks=blocks,
        embed=embed,
        tail=tail,
    )


def model_shape(spec: PlanSpec, groups: tuple[str, ...], kind: str) -> Shape:
    key = tuple(sorted((k, v) for k, v in asdict(spec).items() if k in ("model", "lora_rank", "head", "lora_targets")))
    return _shape_cached(spec.model, spec.dtype, groups, kind, key)


# ---------------------------------------------------------------------------------------------
# Activations: counted on a narrow copy of the configuration
# ---------------------------------------------------------------------------------------------

_WIDTHS = ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim", "intermediate_size", "ffn_dim", "n_inner",
           "moe_intermediate_size", "num_attention_heads", "n_head", "num_key_value_heads")  # fmt: skip
_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
_TRACE_VOCAB, _TRACE_BATCH, _TRACE_SEQ = 64, 2, 64
_MAX_FACTOR = 16  # the largest width divisor tried (1: trace at the real width)


def _narrow(config, layers: int):
    """``config`` with every width divided by the largest ``k`` (up to 16) that divides them all
    and keeps the hidden size >= 128 (so head sizes stay as they are), ``layers`` blocks and a
    tiny vocabulary. Returns ``(config, k)``."""
    import copy

    text = copy.deepcopy(_text_config(config))
    present = {a: getattr(text, a) for a in _WIDTHS if isinstance(getattr(text, a, None), int)}
    hidden = int(text.hidden_size)
    k = max(
        (c for c in range(1, _MAX_FACTOR + 1) if all(v % c == 0 for v in present.values()) and hidden // c >= 128),
        default=1,
    )
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and "num_attention_heads" in present:
        text.head_dim = hidden // present["num_attention_heads"]  # kept fixed while widths shrink
    for a, v in present.items():
        setattr(text, a, v // k)
    text.num_hidden_layers = layers
    text.vocab_size = _TRACE_VOCAB
    for t in _TOKENS:
        v = getattr(text, t, None)
        if isinstance(v, int) and v >= _TRACE_VOCAB:
            setattr(text, t, _TRACE_VOCAB - 1)
        elif isinstance(v, list):
            setattr(text, t, [min(x, _TRACE_VOCAB - 1) for x in v])
    text._attn_implementation = "sdpa"
    return text, k


@dataclass(frozen=True)
class Activations:
    """Bytes per token saved for the backward pass, at the real width: per block (``block``), the
    block's input as checkpointing keeps it (``block_input``), outside the blocks (``rest``,
    without the vocabulary terms, which :func:`estimate` adds), and how the pruning statistics
    group the block's linear layers (layers fed the same input share one)."""

    block: float
    block_input: float
    rest: float
    compute_bytes: int
    width_factor: int
    input_groups: tuple[tuple[str, ...], ...]


def _trace(config, dtype: str, groups: tuple[str, ...], spec: PlanSpec, kind: str) -> dict[str, Any]:
    """One training forward of the (narrow) ``config`` on the CPU, as ``train_`` runs it, with
    autograd's saved-tensor hooks: bytes per token kept for the backward pass inside block 1
    (block 0 may differ: it sees the embeddings), outside the blocks, and block 1's input."""
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_for
    from .models import _DTYPES
    from .pruning import prune_

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        prune_(model, "magnitude", 0.5, device="cpu")  # real zeros: masked LoRA keeps a mask only then
        model.to(_DTYPES[dtype])
        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        input_groups = _input_groups(blocks[1], model)
        if groups:
            mark_as_run(model, groups, spec, kind)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        amp = _DTYPES[dtype] if dtype != "float32" else None
        for p in model.parameters():
            if p.requires_grad and amp is not None:
                p.data = p.data.float()  # as train_: fp32 master copies of what trains
        owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        where = {"at": "rest"}
        saved: dict[int, tuple[Any, int]] = {}
        input_bytes: list[int] = []

        def enter(i):
            def hook(_m, args, kwargs):
                where["at"] = i
                if i == 1:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    input_bytes.append(hidden.element_size() * hidden.shape[-1])

            return hook

        def leave(_m, _args, _out):
            where["at"] = "rest"

        def pack(t):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in owned and ptr not in saved:
                saved[ptr] = (where["at"], storage.nbytes())
            return t

        handles = [b.register_forward_pre_hook(enter(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles += [b.register_forward_hook(leave) for b in blocks]
        ids = torch.randint(0, int(config.vocab_size), (_TRACE_BATCH, _TRACE_SEQ))
        model.train()
        try:
            with (
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                torch.autocast("cpu", dtype=amp, enabled=amp is not None),
            ):
                model(input_ids=ids, labels=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    tokens = _TRACE_BATCH * _TRACE_SEQ
    per = {key: sum(b for at, b in saved.values() if at == key) / tokens for key in (1, "rest")}
    return {"block": per[1], "rest": per["rest"], "input": input_bytes[0] if input_bytes else 0,
            "groups": input_groups}  # fmt: skip


@lru_cache(maxsize=64)
def _activations_cached(name: str, dtype: str, groups: tuple[str, ...], kind: str, spec_key: tuple) -> Activations:
    """Three traces separate what scales with the width (everything at the narrow width times
    ``k``) from what does not: the LoRA rank's terms (a trace at rank 2r) and the vocabulary's
    (a trace at twice the tiny vocabulary; ``estimate`` adds the real vocabulary's logits)."""
    import copy

    spec = PlanSpec(**dict(spec_key))
    config, k = _narrow(read_config(name), layers=2)
    base = _trace(config, dtype, groups, spec, kind)
    rank = {"block": 0.0, "rest": 0.0}
    if "lora" in groups or ("head" in groups and spec.head == "lora"):
        doubled = _trace(config, dtype, groups, PlanSpec(**{**dict(spec_key), "lora_rank": 2 * spec.lora_rank}), kind)
        rank = {key: doubled[key] - base[key] for key in rank}
    wider = copy.deepcopy(config)
    wider.vocab_size = 2 * config.vocab_size
    vocab = _trace(wider, dtype, groups, spec, kind)["rest"] - base["rest"]
    return Activations(
        block=(base["block"] - rank["block"]) * k + rank["block"],
        block_input=base["input"] * k,
        rest=max(base["rest"] - rank["rest"] - vocab, 0.0) * k + rank["rest"],
        compute_bytes=_BYTES[dtype],
        width_factor=k,
        input_groups=base["groups"],
    )


def _input_groups(block: nn.Module, model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Linear layers of a block grouped by the tensor they read (as the pruning statistics share them)."""
    from .adapters import capture_block_inputs, run_block

    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    owners: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []

    def hook(name):
        def fn(_m, args):
            keep.append(args[0])
            owners.setdefault(id(args[0]), []).append(name)

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            inp = capture_block_inputs(model, [torch.randint(0, _TRACE_VOCAB, (1, 8))], "cpu")[0]
            run_block(block, inp)
    finally:
        for h in handles:
            h.remove()
    return tuple(tuple(v) for v in owners.values())


def activation_profile(spec: PlanSpec, groups: tuple[str, ...], kind: str) -> Activations:
    key = tuple(sorted((k, v) for k, v in asdict(spec).items() if k in ("model", "lora_rank", "head", "lora_targets")))
    return _activations_cached(spec.model, spec.dtype, groups, kind, key)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


@dataclass
class MethodPlan:
    """Peak memory of retraining with one method: components on one device, per device for
    ``spec.gpus`` GPUs, and the fewest GPUs of ``spec.gpu_memory`` that hold it."""

    method: str
    label: str
    components: dict[str, int]
    total: int
    per_device: list[int]
    fits: bool
    gpus_needed: int | None


def _method(retrain: str) -> tuple[str, tuple[str, ...]]:
    from .config import retrain_groups

    groups = retrain_groups(retrain)
    return retrain, groups


def _label(retrain: str, groups: tuple[str, ...], kind: str) -> str:
    name = METHOD_NAMES.get(retrain, retrain)
    return f"{name} ({kind} LoRA)" if "lora" in groups or (retrain == "perp") else name


def _train_units(spec: PlanSpec, shape: Shape, act: Activations, groups: tuple[str, ...], kind: str):
    """Bytes per placement unit (embeddings, each block, tail) by component, and the per-device
    transients (logits on the head's device, workspace on every device)."""
    w = _BYTES[spec.dtype]
    half = spec.dtype != "float32"
    seqlen = run_seqlen(spec.seqlen, shape.context)
    tokens = spec.batch_size * seqlen
    training = bool(groups)

    def unit(part: _Part) -> dict[str, int]:
        trained = part.trained if training else 0
        return {
            "weights": (part.frozen + (0 if training else part.trained)) * w,
            "trainable": trained * 4,
            "gradients": trained * 4,
            "optimizer": trained * 8,
            "masks": part.masks if training else 0,
            "autocast": part.trained_matrices * act.compute_bytes if (training and half) else 0,
        }

    # gradients flow through every block when anything at or below the blocks trains
    through_blocks = training and (any(b.trained for b in shape.blocks) or shape.embed.trained > 0)
    blocks = []
    for part in shape.blocks:
        cost = unit(part)
        if through_blocks:
            per_token = act.block_input if spec.grad_checkpointing else act.block
            cost["activations"] = int(per_token * tokens)
        blocks.append(cost)
    embed, tail = unit(shape.embed), unit(shape.tail)
    if training:
        tail["activations"] = int(act.rest * tokens)
        tail["logits"] = 12 * tokens * shape.vocab  # fp32 log-softmax + its gradient + the logits
    else:  # evaluation: a forward in batches of 4 (perplib.evaluation.perplexity)
        tail["logits"] = (act.compute_bytes + 8) * 4 * seqlen * shape.vocab
    # per device: one block recomputed (checkpointing) and its backward buffers; masked LoRA
    # builds a layer's effective weight (and its masked gradient) in the compute dtype
    largest = max((b.largest for b in shape.blocks), default=0)
    workspace = 0
    if through_blocks:
        workspace += int(act.block * tokens) if spec.grad_checkpointing else 0
        workspace += 2 * tokens * shape.hidden * 4
        if kind == "masked" and "lora" in groups:
            workspace += largest * (2 * act.compute_bytes + 4)
        if groups == ("full",):
            workspace += largest * act.compute_bytes
    return embed, blocks, tail, {"workspace": workspace}


def _split(n_blocks: int, devices: int) -> list[range]:
    """Contiguous block ranges, as even as possible (accelerate's balanced map, by count)."""
    base, extra = divmod(n_blocks, devices)
    out, start = [], 0
    for d in range(devices):
        size = base + (1 if d < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _per_device(embed, blocks, tail, shared, devices: int, tied: bool) -> list[int]:
    ranges = _split(len(blocks), devices)
    totals = []
    for d, r in enumerate(ranges):
        total = sum(sum(blocks[i].values()) for i in r) + sum(shared.values())
        if d == 0:
            total += sum(embed.values())
        if (d == 0 and tied) or (d == devices - 1 and not tied):
            total += sum(tail.values())
        totals.append(total)
    return totals


def plan_method(spec: PlanSpec, retrain: str, kind: str | None = None) -> MethodPlan:
    """The memory plan of retraining with ``retrain`` (a preset or '+'-joined groups)."""
    kind = kind or spec.lora
    retrain, groups = _method(retrain)
    lora_kind = kind if ("lora" in groups or ("head" in groups and spec.head == "lora")) else "plain"
    shape = model_shape(spec, groups, lora_kind)
    act = activation_profile(spec, groups, lora_kind)
    embed, blocks, tail, shared = _train_units(spec, shape, act, groups, lora_kind)
    components: dict[str, int] = {c: 0 for c in COMPONENTS}
    for unit in [embed, *blocks, tail, shared]:
        for c, v in unit.items():
            components[c] += v
    total = sum(components.values())
    per_device = _per_device(embed, blocks, tail, shared, min(spec.gpus, len(blocks)), shape.head_tied)
    needed = None
    for n in range(1, len(blocks) + 1):
        if max(_per_device(embed, blocks, tail, shared, n, shape.head_tied)) <= spec.usable:
            needed = n
            break
    return MethodPlan(
        method=retrain,
        label=_label(retrain, groups, lora_kind) if groups else METHOD_NAMES["none"],
        components=components,
        total=total,
        per_device=per_device,
        fits=max(per_device) <= spec.usable,
        gpus_needed=needed,
    )


@dataclass
class PrunePlan:
    """Block-by-block pruning (perplib.pruning): one block and the calibration activations on the
    GPU, the rest of the model in CPU memory (or on disk with an offload folder)."""

    method: str
    gpu: dict[str, int]
    gpu_total: int
    host_weights: int
    fits: bool


def plan_prune(spec: PlanSpec) -> PrunePlan:
    shape = model_shape(spec, (), "plain")
    act = activation_profile(spec, (), "plain")
    w = _BYTES[spec.dtype]
    seqlen = run_seqlen(spec.seqlen, shape.context)
    h = shape.hidden
    block = max(shape.blocks, key=lambda b: b.frozen + b.trained)
    from .adapters import adapter_for

    empty = _empty_of(spec.model, spec.dtype)
    adapter = adapter_for(empty)
    first = adapter.blocks(empty)[0]
    widths = []
    for group in act.input_groups:
        lin = first.get_submodule(group[0])
        widths.append(lin.weight.shape[1])
    shapes = [tuple(m.weight.shape) for m in first.modules() if isinstance(m, nn.Linear)]
    from .adapters import expert_views, experts_modules

    for module in experts_modules(first).values():  # fused MoE experts: statistics per expert, of its own input
        views = expert_views(module)
        shapes += [tuple(v.weight.shape) for v in views.values()]
        for e in range(module.down_proj.shape[0]):  # gate and up read one input, down another
            widths += [views[f"{e}.up_proj"].in_features, views[f"{e}.down_proj"].in_features]
    out_f, in_f = max(shapes, key=lambda s: s[0] * s[1])
    wide = max(max(s) for s in shapes)  # the MLP's inner width
    max_in = max(widths) if widths else in_f
    gpu = {"block weights": (block.frozen + block.trained) * w}
    if spec.prune == "magnitude":
        gpu["solve"] = out_f * in_f * 12  # fp32 scores, top-k values and indices, the mask
    else:
        gpu["calibration activations"] = (spec.nsamples + spec.prune_batch) * seqlen * h * w
        gpu["block forward"] = spec.prune_batch * seqlen * (4 * h + 2 * wide) * w
        if spec.prune == "wanda":
            gpu["statistics"] = sum(widths) * 4
            gpu["solve"] = out_f * in_f * 12
        else:
            gpu["statistics"] = sum(x * x for x in widths) * 4  # X^T X per distinct input, fp32
            gpu["solve"] = 4 * max_in * max_in * 4 + out_f * in_f * (6 + w)  # H^-1 and Cholesky, fp32 W, masks
    total = sum(gpu.values())
    return PrunePlan(spec.prune, gpu, total, shape.params * w, total <= spec.usable)


@dataclass
class Plan:
    spec: PlanSpec
    shape: dict[str, Any]
    requested: MethodPlan
    methods: dict[str, MethodPlan]
    prune: PrunePlan
    summary: str

    def as_record(self) -> dict[str, Any]:
        from .results import environment

        return {
            "kind": "plan",
            "config": {**asdict(self.spec), "seqlen": self.seqlen},
            "model": self.shape,
            "requested": asdict(self.requested),
            "methods": {k: asdict(v) for k, v in self.methods.items()},
            "prune": asdict(self.prune),
            "summary": self.summary,
            "components": COMPONENTS,
            "environment": environment(),
        }

    @property
    def seqlen(self) -> int:
        return run_seqlen(self.spec.seqlen, self.shape.get("context"))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _short(name: str) -> str:
    return name.rstrip("/").split("/")[-1].lower()


def _fit_phrase(p: MethodPlan, spec: PlanSpec, first: bool) -> str:
    """'fits one 80 GiB GPU (60.6 GiB)' / 'needs 10 of them' (after a first phrase that named the
    GPU) / 'needs 2 GPUs of 80 GiB' / 'does not fit ... even one block per GPU'."""
    size = f"{spec.gpu_memory / GiB:g} GiB"
    if p.gpus_needed is None:
        return f"{p.label} does not fit GPUs of {size} even with one block per GPU ({_gib(p.total)} in all)"
    if p.gpus_needed == 1:
        return f"{p.label} fits one {size} GPU ({_gib(p.total)})"
    them = f"GPUs of {size}" if first else "of them"
    return f"{p.label} needs {p.gpus_needed} {them} ({_gib(p.total)} in all)"


def estimate(spec: PlanSpec, compare: tuple[str, ...] = ("perp", "full", "ln", "none")) -> Plan:
    """The memory plan of ``spec``: the requested retraining method, the ``compare`` methods, and
    the pruning step, with a one-line summary a person reads at a glance."""
    config = read_config(spec.model)
    text = _text_config(config)
    context = getattr(text, "max_position_embeddings", None)
    if spec.seqlen is not None and context and spec.seqlen > context:
        raise ValueError(f"seqlen {spec.seqlen} exceeds the context length of {spec.model} ({context})")
    requested = plan_method(spec, spec.retrain)
    methods = {requested.method: requested}
    for retrain in compare:
        if retrain not in methods:
            methods[retrain] = plan_method(spec, retrain)
    if "lora" in requested.label.lower() or spec.retrain == "perp":
        other = "plain" if spec.lora == "masked" else "masked"
        methods[f"{spec.retrain} ({other})"] = plan_method(spec, spec.retrain, other)
    prune = plan_prune(spec)
    shape = model_shape(spec, (), "plain")
    seqlen = run_seqlen(spec.seqlen, context)
    head = f"{_short(spec.model)}, {spec.dtype}, seqlen {seqlen}, batch {spec.batch_size}" + (
        ", checkpointing" if spec.grad_checkpointing else ""
    )
    phrases = [_fit_phrase(requested, spec, first=True)]
    if requested.method != "full" and "full" in methods:
        phrases.append(_fit_phrase(methods["full"], spec, first=requested.gpus_needed is None))
    where = "CPU memory (or disk with --offload-folder)"
    phrases.append(
        f"pruning ({prune.method}, {spec.nsamples} x {seqlen}) "
        + (f"fits one GPU block by block ({_gib(prune.gpu_total)})" if prune.fits else f"needs {_gib(prune.gpu_total)} on one GPU (does not fit)")
        + f" with the weights ({_gib(prune.host_weights)}) in {where}"
    )  # fmt: skip
    summary = f"{head}: " + "; ".join(phrases)
    info = {
        "name": spec.model,
        "family": shape.family,
        "params": shape.params,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "vocab": shape.vocab,
        "context": context,
        "head_tied": shape.head_tied,
        "activation_bytes_per_token": asdict(activation_profile(spec, requested_groups(spec), requested_kind(spec))),
    }
    return Plan(spec, info, requested, methods, prune, summary)


def requested_groups(spec: PlanSpec) -> tuple[str, ...]:
    return _method(spec.retrain)[1]


def requested_kind(spec: PlanSpec) -> str:
    groups = requested_groups(spec)
    return spec.lora if ("lora" in groups or ("head" in groups and spec.head == "lora")) else "plain"


def table(plan: Plan) -> str:
    """Per method: estimate on one device, per device for the planned GPUs, GPUs needed."""
    spec = plan.spec
    lines = [f"{'method':28s} {'one device':>11s} {f'max of {spec.gpus} GPU(s)':>16s} {'GPUs needed':>11s}"]
    for p in plan.methods.values():
        needed = "-" if p.gpus_needed is None else str(p.gpus_needed)
        lines.append(f"{p.label:28s} {_gib(p.total):>11s} {_gib(max(p.per_device)):>16s} {needed:>11s}")
    lines.append("")
    lines.append(f"{plan.requested.label} on one device, by component:")
    for c, v in plan.requested.components.items():
        if v:
            lines.append(f"  {c:12s} {_gib(v):>11s}  {COMPONENTS[c]}")
    lines.append(f"pruning on the GPU ({plan.prune.method}):")
    for c, v in plan.prune.gpu.items():
        lines.append(f"  {c:24s} {_gib(v):>11s}")
    lines.append(
        f"fits: at most {_gib(spec.usable)} per {spec.gpu_memory / GiB:g} GiB GPU ({100 * spec.headroom:g}% headroom)"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet() -> Any:
    """transformers/accelerate warnings about empty or tied weights say nothing to a plan's reader."""
    import logging

    loggers = [logging.getLogger(n) for n in ("transformers", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

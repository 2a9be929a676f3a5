"""Low-rank adaptation of pruned linear layers (paper Section 3.1 "Retraining as Low-Rank Adaption").

A frozen, pruned weight ``W`` (out x in) is used as ``W + s·B·A`` with ``A`` (r x in), ``B`` (out x r)
and ``s = alpha / r``. Two kinds, both built on Hugging Face peft (its ``LoraConfig``, its injection,
its ``lora.Linear`` layer that keeps ``base_layer``, its adapter file format):

- ``plain``: peft's LoRA. ``W``, ``A`` and ``B`` stay separate after training, as the paper
  describes for unstructured sparsity; merging ``B·A`` would destroy the zeros, so the few extra
  parameters lower the overall sparsity slightly and that loss is accounted. The backward needs no
  weight-gradient product for ``W``: it is the cheap kind. Its layer (``PlainLoraLinear``) is peft's
  ``lora.Linear`` (same parameters, state dict, merge) whose training forward is one autograd node:
  the update is added into the base output by one GEMM-with-add, and the backward forms only the
  products the trainable tensors need.
- ``masked`` (the PERP code's default): the update is ``M ⊙ (s·B·A)`` with ``M = 1[W ≠ 0]``, so
  ``merge_()`` folds it into ``W`` without losing a single zero and leaves plain sparse ``nn.Linear``
  layers with no inference overhead. The gradient of ``A`` and ``B`` needs the masked product
  ``M ⊙ (gᵀx)``, one weight-gradient GEMM per layer, so a step costs more than with ``plain``.

One ``get_delta_weight()`` per layer serves forward, ``merge`` and ``unmerge`` (peft's shape).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapters import is_conv1d, is_prunable
from .config import LORA_KINDS

LORA_INITS = ("zero", "random")
ADAPTER_SUBFOLDER = "adapter"


@dataclass(frozen=True)
class LoraSpec:
    """How every adapted layer is reparametrised (Section 3.1, Appendix C.2)."""

    kind: str = field(default="masked", metadata={"help": "masked (M ⊙ sBA, mergeable, keeps zeros) | plain (peft)"})
    rank: int = field(default=16, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input (plain kind only)"})
    init: str = field(
        default="zero",
        metadata={"help": "zero: B = 0 so training starts from the pruned model; random: A and B random (tests)"},
    )

    def __post_init__(self) -> None:
        if self.kind not in LORA_KINDS:
            raise ValueError(f"LoRA kind must be one of {list(LORA_KINDS)}, got {self.kind!r}")
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.kind == "masked" and self.dropout:
            raise ValueError(
                f"masked LoRA folds the update into the weight, so it cannot drop the LoRA input only; "
                f"use dropout 0 or kind 'plain' (got dropout {self.dropout!r})"
            )
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {list(LORA_INITS)}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_peft(self, targets: Iterable[str]) -> LoraConfig:
        """The equivalent peft config for the qualified module names ``targets``."""
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=sorted(targets),
            bias="none",
            init_lora_weights=self.init == "zero",
            task_type="CAUSAL_LM",
        )
        from transformers.pytorch_utils import Conv1D

        layer = MaskedLoraLinear if self.kind == "masked" else PlainLoraLinear
        config._register_custom_module({nn.Linear: layer, Conv1D: layer})
        return config


# ---------------------------------------------------------------------------------------------
# The math: pure functions on tensors
# ---------------------------------------------------------------------------------------------


def masked_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``M ⊙ (s·B·A)``; ``mask=None`` means a dense layer (every entry kept)."""
    delta = (lora_b @ lora_a) * scaling
    return delta if mask is None else delta.masked_fill_(~mask, 0.0)


_HALF = (torch.bfloat16, torch.float16)


def _masked_update(lora_a, lora_b, mask, scaling, dtype) -> torch.Tensor:
    """``M ⊙ s·B·A`` in ``dtype``; multiplying by the mask's bytes is ~10x faster on CPU than
    masked_fill_ or where."""
    return torch.mm(lora_b.to(dtype), lora_a.to(dtype)).mul_(scaling).mul_(mask.view(torch.uint8))


def _effective_weight(weight, lora_a, lora_b, mask, scaling, dtype) -> torch.Tensor:
    # fp32: W is exactly zero where the mask is, so W + M ⊙ sBA = (W + sBA) ⊙ M: one GEMM-with-add
    # and one multiply, and the layer then runs a single GEMM.
    return torch.addmm(weight.to(dtype), lora_b.to(dtype), lora_a.to(dtype), alpha=scaling).mul_(mask.view(torch.uint8))


def _split_product(a: torch.Tensor, weight: torch.Tensor, update: torch.Tensor, dtype) -> torch.Tensor:
    """``a·(W + U)`` for a half ``dtype`` without ever forming ``W + U`` in it.

    bf16 keeps 8 significant bits: ``bf16(W + U)`` drops every entry of an update below ~2⁻⁹·|W|,
    and so does adding two rounded outputs. Here ``a·U`` is computed first (its own rounding is
    relative to the update) and passed as the accumulator of ``addmm(a·U, a, W)``, which sums in
    fp32 and rounds once: the update reaches the output as it does in fp32, up to that rounding.
    """
    return torch.addmm(a @ update, a, weight.to(dtype))


class _MaskedLoraLinearFn(torch.autograd.Function):
    """``y = x (W + M ⊙ sBA)ᵀ + b`` with a backward that stores no out x in tensor.

    fp32: forward builds the effective weight once (one GEMM) and drops it. Half precision: the
    split form ``x·Wᵀ + x·(M ⊙ sBA)ᵀ`` (:func:`_split_product`), so a small update is not rounded
    away. Backward recomputes the update for the input gradient (a rank-r GEMM, cheap next to the
    T x out x in products) and forms the one masked weight-gradient product ``G = M ⊙ (gᵀx)``
    that both ``dA = s·BᵀG`` and ``dB = s·GAᵀ`` need.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, mask, scaling, dtype):
        b = None if bias is None else bias.to(dtype)
        if dtype in _HALF:
            update = _masked_update(lora_a, lora_b, mask, scaling, dtype)
            out = _split_product(x.reshape(-1, x.shape[-1]).to(dtype), weight.t(), update.t(), dtype)
            out = out.view(*x.shape[:-1], weight.shape[0])
            out = out if b is None else out.add_(b)
        else:
            out = F.linear(x.to(dtype), _effective_weight(weight, lora_a, lora_b, mask, scaling, dtype), b)
        ctx.save_for_backward(x, weight, lora_a, lora_b, mask)
        ctx.scaling, ctx.dtype, ctx.bias_dtype = scaling, dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, mask = ctx.saved_tensors
        s, dtype = ctx.scaling, ctx.dtype
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            if dtype in _HALF:
                gx = _split_product(g2, weight, _masked_update(lora_a, lora_b, mask, s, dtype), dtype)
            else:
                gx = g2 @ _effective_weight(weight, lora_a, lora_b, mask, s, dtype)
            grad_x = gx.view(*x.shape[:-1], weight.shape[1]).to(x.dtype)
        if need_w or need_a or need_b:
            gw = g2.t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            if need_w:
                grad_w = gw.to(weight.dtype)
            gw = gw.to(lora_a.dtype).mul_(mask.view(torch.uint8))
            if need_a:
                grad_a = (lora_b.t() @ gw).mul_(s)
            if need_b:
                grad_b = (gw @ lora_a.t()).mul_(s)
        if need_bias and ctx.bias_dtype is not None:
            grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def masked_lora_linear(x, weight, bias, lora_a, lora_b, mask, scaling: float) -> torch.Tensor:
    """Functional masked-LoRA linear layer; the compute dtype follows autocast when it is on."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    with torch.autocast(device, enabled=False):
        return _MaskedLoraLinearFn.apply(x, weight, bias, lora_a, lora_b, mask, scaling, dtype)


class _PlainLoraLinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ`` (peft's plain LoRA) as one node.

    Forward: the base GEMM, then the update accumulated into its output in place (``addmm_``: no
    T x out temporary for the update, no separate scale and add). Backward: ``g·B`` once (T x r), the
    input gradient ``g·W + s·(g·B)·A`` with the same in-place accumulation, ``dB = s·gᵀ(xAᵀ)``,
    ``dA = s·(g·B)ᵀx``, and ``gᵀx`` only if ``W`` itself trains. Saved: ``x`` and ``xAᵀ`` (T x r).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ lora_a.t()
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gb = g2 @ lora_b if (need_x or need_a) else None
        if need_x:
            grad_x = (g2 @ weight).addmm_(gb, lora_a, alpha=s).view(x.shape)
        if need_a:
            grad_a = (gb.t() @ x2).mul_(s)
        if need_b:
            grad_b = (g2.t() @ xa).mul_(s)
        if need_w:
            grad_w = g2.t() @ x2
        if need_bias and ctx.has_bias:
            grad_bias = g2.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def plain_lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """Functional plain-LoRA linear layer ``x Wᵀ + b + s·(x Aᵀ) Bᵀ``; all tensors of one dtype."""
    return _PlainLoraLinearFn.apply(x, weight, bias, lora_a, lora_b, scaling)


def _fused_plain_forward(layer: PeftLoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """:func:`plain_lora_linear` for a peft layer in training form (one active adapter, no dropout,
    autocast, variant or mixed dtypes); ``None`` where peft's own forward must run."""
    if layer.disable_adapters or layer.merged or args or kwargs:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    adapter = active[0]
    dropout = layer.lora_dropout[adapter]
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    if (
        (isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training)
        or torch.is_autocast_enabled(x.device.type)
        or not (x.dtype == weight.dtype == lora_a.dtype == lora_b.dtype)
        or (bias is not None and bias.dtype != x.dtype)
    ):
        return None
    weight = weight.t() if layer.fan_in_fan_out else weight
    return plain_lora_linear(x, weight, bias, lora_a, lora_b, layer.scaling[adapter])


class PlainLoraLinear(PeftLoraLinear):
    """peft's LoRA linear layer with :func:`plain_lora_linear` as its training forward.

    Parameters, state dict, ``merge``/``unmerge`` and ``get_delta_weight`` are peft's own, so a
    saved adapter loads into an ordinary peft model. The fused forward runs for one active adapter
    without dropout, autocast or mixed dtypes; anything else (merged, disabled, mixed batches, a bf16
    model with fp32 adapters) takes peft's forward.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        if is_conv1d(base_layer):  # GPT-2's Conv1D stores W as in x out (peft's flag for it)
            self.fan_in_fan_out = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = _fused_plain_forward(self, x, args, kwargs)
        return super().forward(x, *args, **kwargs) if out is None else out


# ---------------------------------------------------------------------------------------------
# The layer: peft's lora.Linear with a mask
# ---------------------------------------------------------------------------------------------


class MaskedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear layer whose update is restricted to the base weight's non-zeros.

    The mask ``M = 1[W ≠ 0]`` is taken once, when the layer is attached (``set_mask_``), and kept as
    a non-persistent boolean buffer. A layer without zeros (a dense head) gets no mask and runs
    plain LoRA's cheaper fused forward; its merge is then an ordinary dense LoRA merge.
    """

    lora_mask: torch.Tensor | None

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        if is_conv1d(base_layer):  # GPT-2's Conv1D stores W as in x out (peft's flag for it)
            self.fan_in_fan_out = True

    def _weight(self) -> torch.Tensor:
        """The base weight as out x in (Conv1D's transposed)."""
        weight = self.get_base_layer().weight
        return weight.t() if self.fan_in_fan_out else weight

    def set_mask_(self, dense: bool = False) -> None:
        """Take ``M = 1[W ≠ 0]`` now; ``dense=True`` (or a weight without zeros) means no mask."""
        mask = None if dense else self._weight().detach() != 0
        self.register_buffer("lora_mask", None if mask is None or bool(mask.all()) else mask, persistent=False)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        mask = getattr(self, "lora_mask", None)
        weight_a, weight_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = masked_delta(weight_a.float(), weight_b.float(), mask, self.scaling[adapter])
        return (delta.t() if self.fan_in_fan_out else delta).to(weight_b.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask = getattr(self, "lora_mask", None)
        if mask is None:  # a dense layer (the head): plain LoRA's fused node
            out = _fused_plain_forward(self, x, args, kwargs)
            return super().forward(x, *args, **kwargs) if out is None else out
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            raise RuntimeError(f"masked LoRA runs exactly one active adapter, got {active}")
        adapter = active[0]
        base = self.get_base_layer()
        return masked_lora_linear(
            x, self._weight(), base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight, mask,
            self.scaling[adapter],
        )  # fmt: skip

    def __repr__(self) -> str:
        return "masked" + super().__repr__()


# ---------------------------------------------------------------------------------------------
# Model-level drivers
# ---------------------------------------------------------------------------------------------


def add_lora_(
    model: nn.Module, spec: LoraSpec, targets: Iterable[str], *, unmasked: Iterable[str] = ()
) -> dict[str, LoraLayer]:
    """Attach LoRA of ``spec`` to the ``nn.Linear`` modules named in ``targets`` (in place).

    With the masked kind, every target's update is masked by its weight's non-zeros except for the
    layers named in ``unmasked``: layers that were not pruned (the head; OPT's head, tied to the
    embedding, has an all-zero padding row that is no pruning mask). peft freezes every non-adapter
    parameter while injecting; callers choose what trains afterwards
    (``perplib.retrain.mark_trainable_``). Returns the adapted layers by qualified name.
    """
    targets = sorted(set(targets))
    unmasked = set(unmasked)
    if not targets:
        raise ValueError("add_lora_ needs at least one target layer")
    if not unmasked <= set(targets):
        raise ValueError(f"unmasked layers must be among the targets, these are not: {sorted(unmasked - set(targets))}")
    if lora_layers(model):
        raise ValueError("the model already carries LoRA layers; merge_() or remove them first")
    modules = dict(model.named_modules())
    bad = [t for t in targets if not is_prunable(modules.get(t))]
    if bad:
        raise ValueError(f"LoRA targets must name nn.Linear (or Conv1D) modules of the model, these do not: {bad[:5]}")
    with warnings.catch_warnings():
        # a tied head carries LoRA on purpose: training never changes the shared weight, and
        # merge_() unties the head before folding the update in
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        inject_adapter_in_model(spec.to_peft(targets), model)
    layers = lora_layers(model)
    for name, layer in layers.items():
        if isinstance(layer, MaskedLoraLinear):
            layer.set_mask_(dense=name in unmasked)
        # adapters of a half-precision model are kept in fp32, as peft's get_peft_model does: they are
        # what trains, they are tiny, and the merge then folds an unrounded update into the weight
        for pname, p in layer.named_parameters():
            if "lora_" in pname and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
    model.perp_lora_spec = spec
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of the model (merged or not) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_parameter_count(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Number of adapter parameters (A and B) on the given (default: all) LoRA layers."""
    layers = lora_layers(model)
    chosen = layers.values() if names is None else [layers[n] for n in names if n in layers]
    return sum(p.numel() for m in chosen for n, p in m.named_parameters() if "lora_" in n)


def untie_head_(model: nn.Module) -> bool:
    """Give the output head its own copy of a weight it shares with the input embedding.

    Needed before the head's weight itself changes (a fully trained head, a merged head LoRA),
    so that the input embedding stays as it was. Returns whether the head was tied.
    """
    head = model.get_output_embeddings()
    head = head.get_base_layer() if isinstance(head, LoraLayer) else head
    embedding = model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    return True


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def merge_(model: nn.Module, *, allow_dense: bool = False) -> list[str]:
    """Fold every LoRA update into its base weight and put the plain ``nn.Linear`` back (in place).

    Masked layers keep every zero of their base weight. Merging a plain LoRA into a pruned layer
    fills its zeros, so it is refused unless ``allow_dense=True``. A tied head is untied first so
    the input embedding is unchanged. Returns the merged layer names.
    """
    layers = lora_layers(model)
    unsafe = [
        n for n, m in layers.items()
        if not isinstance(m, MaskedLoraLinear) and bool((m.get_base_layer().weight == 0).any())
    ]  # fmt: skip
    if unsafe and not allow_dense:
        raise ValueError(
            f"merging plain LoRA would fill the zeros of {len(unsafe)} pruned layers (e.g. {unsafe[0]}); "
            "keep it unmerged (the paper's choice), use masked LoRA, or pass allow_dense=True"
        )
    # a decoder block (block-wise reconstruction) has no head to untie
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, LoraLayer):
        untie_head_(model)
    for name, layer in layers.items():
        layer.merge()
        _set_submodule(model, name, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "perp_lora_spec"):
        del model.perp_lora_spec
    return list(layers)


@contextlib.contextmanager
def base_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily swap every LoRA layer for its ``base_layer`` (e.g. to save a clean checkpoint)."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.get_base_layer())
    try:
        yield model
    finally:
        for name, layer in layers.items():
            _set_submodule(model, name, layer)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed as ``PeftModel.save_pretrained`` writes them."""
    out = {}
    for name, layer in lora_layers(model).items():
        for adapter in layer.lora_A:
            out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().contiguous()
    return out


def save_pretrained(model: nn.Module, path: str | Path, tokenizer=None) -> dict[str, Path]:
    """Write a retrained model as a normal Hugging Face checkpoint in ``path``.

    Merged (or adapter-free) models are saved as they are. Unmerged LoRA (plain kind) is saved as
    the sparse base model in ``path`` plus the adapter in peft's format in ``path/adapter``
    (``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), path / "adapter")``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = lora_layers(model)
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"layers {merged[:3]} hold a merged adapter; call merge_() to finish merging first")
    masked = [n for n, m in layers.items() if getattr(m, "lora_mask", None) is not None]
    if masked:
        raise ValueError(
            f"masked LoRA layers (e.g. {masked[0]}) cannot be written in peft's format (it has no mask); "
            "call merge_() first: the merged layers keep every zero"
        )
    with base_modules(model):
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    written = {"model": path}
    if layers:
        adapter_dir = path / ADAPTER_SUBFOLDER
        adapter_dir.mkdir(exist_ok=True)
        config = model.peft_config["default"]
        config.base_model_name_or_path = str(path.resolve())
        config.save_pretrained(adapter_dir)
        save_file(adapter_state_dict(model), adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
        spec = getattr(model, "perp_lora_spec", None)
        if spec is not None:
            (adapter_dir / "perplib_lora.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
        written["adapter"] = adapter_dir
    return written

"""Retraining after pruning: parameter groups, Full IMP with the mask enforced, the training loop.

Section 3.1 defines nested sets of trainable parameters; for LLMs (Section 3.2, Appendix C.1)
they are four groups that combine freely:

- ``biases``: every bias outside the normalisation layers;
- ``norms``: LayerNorm / RMSNorm weights and biases (the paper's "LN-Parameters");
- ``head``: the linear head, trained through LoRA (the paper's choice for LLMs, more stable) or
  fully; a head tied to the input embedding is untied first, so the embedding never changes;
- ``lora``: LoRA on the pruned linear layers of a target set (``perplib.lora``, kind ``masked`` or
  ``plain``; ``perplib.adapters.lora_target_layers``: the paper's set per family, q,v, attention,
  or every prunable linear).

Presets (``perplib.config.RETRAIN_PRESETS``): none, biases, ln, linear-probing, perp, and ``full``
(Full IMP: every parameter trains and the pruning mask is enforced at every step: gradients of
pruned weights are zeroed before the optimizer step and the weights re-zeroed after it, so
neither Adam's moments nor weight decay can revive a pruned weight).

The loop reads like nanoGPT's: AdamW (weight decay 0 by default, applied to matrices only), linear
warmup over the first 10% of steps then linear decay, micro-batches with gradient accumulation,
optional gradient checkpointing, autocast with fp32 trainable parameters, a seeded data order.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import ExpertMatrix, adapter_for, lora_target_layers
from .config import HEAD_MODES, RETRAIN_GROUPS, RETRAIN_PRESETS, RunConfig, retrain_groups
from .lora import LoraSpec, add_lora_, lora_layers, lora_parameter_count, merge_, untie_head_

# training windows are drawn from the same split as calibration, with a seed of their own, so
# the retraining batches are not the calibration windows
TRAIN_SEED_OFFSET = 1_000_003


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


def _unique(params: Iterable[tuple[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    out, seen = {}, set()
    for name, p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def parameter_groups(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """The base model's parameters of the groups ``biases``, ``norms`` and ``head`` (full), by name."""
    adapter = adapter_for(model)
    norms = adapter.norms(model)
    norm_ids = {id(m) for m in norms.values()}
    biases = []
    for mname, module in model.named_modules():
        if id(module) in norm_ids or "lora_" in mname:
            continue
        bias = module._parameters.get("bias")
        if isinstance(bias, nn.Parameter):
            biases.append((f"{mname}.bias" if mname else "bias", bias))
    head = adapter.head_module(model)
    head_name = adapter.head
    return {
        "biases": _unique(biases),
        "norms": _unique((f"{n}.{pn}", p) for n, m in norms.items() for pn, p in m.named_parameters()),
        "head": _unique((f"{head_name}.{pn}", p) for pn, p in head.named_parameters()),
    }


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class Trainable:
    """What ``mark_trainable_`` set up: counts per group, the LoRA targets and the Full-IMP masks."""

    groups: tuple[str, ...]
    counts: dict[str, int]
    # parameters of the model as it trains: the adapters included, a tied embedding/head once (the
    # paper's "% trainable" counts this way, as the PERP code does)
    total: int
    lora_targets: tuple[str, ...]
    head_untied: bool
    masks: dict[str, torch.Tensor]  # Full IMP: keep-masks of the prunable weights, by name
    lora_set: dict[str, Any] = field(default_factory=dict)  # lora_target_layers' description (if "lora")

    @property
    def trainable(self) -> int:
        return sum(self.counts.values())

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _check_groups(groups: Iterable[str]) -> tuple[str, ...]:
    groups = tuple(groups)
    if groups == ("full",):
        return groups
    bad = [g for g in groups if g not in RETRAIN_GROUPS]
    if bad:
        raise ValueError(f"parameter groups must be ('full',) or drawn from {list(RETRAIN_GROUPS)}, got {bad}")
    return tuple(g for g in RETRAIN_GROUPS if g in groups)


def mark_trainable_(
    model: nn.Module,
    groups: Iterable[str],
    *,
    lora: LoraSpec | None = None,
    head: str = "lora",
    targets: str = "all",
) -> Trainable:
    """Freeze the model, attach LoRA where the groups ask for it, unfreeze the chosen groups (in place).

    ``groups``: any combination of ``biases``, ``norms``, ``head``, ``lora`` (all 16 are valid, the
    empty one trains nothing) or ``("full",)``. ``head="lora"`` trains the head through LoRA,
    ``head="full"`` trains its weight (untied from the embedding first). ``lora`` gives the LoRA
    kind, rank and alpha (default: masked, r=16, alpha=32). ``targets`` names the set of prunable
    layers the ``lora`` group adapts (``perplib.config.LORA_TARGET_SETS``; runs pass
    ``RunConfig.lora_targets``, default ``paper``; here the default is every prunable linear).
    """
    groups = _check_groups(groups)
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {list(HEAD_MODES)}, got {head!r}")
    adapter = adapter_for(model)
    prunable = prunable_linears(model)
    base_total = count_parameters(model)  # a tied embedding/head once (also after untying a fully trained head)
    if groups == ("full",):
        for p in model.parameters():
            p.requires_grad_(True)
        # fused experts: one mask per 3-D tensor (by parameter name), enforced on the tensor itself
        masks = {name: (m.weight.detach() != 0) for name, m in prunable.items() if not isinstance(m, ExpertMatrix)}
        masks |= {name: (p.detach() != 0) for name, p in adapter.expert_tensors(model).items()}
        return Trainable(groups, {"full": base_total}, base_total, (), False, masks)

    head_untied = False
    if "head" in groups and head == "full":
        head_untied = untie_head_(model)
    chosen = parameter_groups(model)  # by identity: the Parameters survive LoRA injection
    layers, lora_set = lora_target_layers(model, targets) if "lora" in groups else ([], {})
    names = list(layers)
    if "head" in groups and head == "lora":
        names.append(adapter.head)
    for p in model.parameters():
        p.requires_grad_(False)
    if names:
        add_lora_(model, lora or LoraSpec(), names, unmasked=[adapter.head] if adapter.head in names else [])
    counts: dict[str, int] = {}
    seen: set[int] = set()  # a parameter in two groups (the head's bias is also a bias) counts once
    direct = [g for g in ("biases", "norms") if g in groups] + (["head"] if "head" in groups and head == "full" else [])
    for group in direct:
        counts[group] = 0
        for p in chosen[group].values():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                counts[group] += p.numel()
    for layer in lora_layers(model).values():
        for pname, p in layer.named_parameters():
            if "lora_" in pname:
                p.requires_grad_(True)
    if "head" in groups and head == "lora":
        counts["head"] = lora_parameter_count(model, [adapter.head])
    if "lora" in groups:
        counts["lora"] = lora_parameter_count(model, layers)
    total = base_total + lora_parameter_count(model)  # the model as it trains: with the adapters
    return Trainable(groups, counts, total, tuple(names), head_untied, {}, lora_set)


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The prunable ``nn.Linear`` layers by their original names, seen through any LoRA wrapper
    (``q_proj.base_layer`` is reported as ``q_proj``; the adapters' own matrices are skipped)."""
    out = {}
    for name, module in adapter_for(model).prunable(model).items():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer", "")] = module
    return out


def prunable_sparsity(model: nn.Module, include_lora: bool = True) -> float:
    """Zeros of the prunable weights as a share of everything a deployed model stores for those
    layers: their weights plus, while unmerged, their LoRA matrices (Section 3.1: the extra
    parameters lower the overall sparsity slightly)."""
    layers = lora_layers(model)
    zeros = stored = 0
    for name, module in prunable_linears(model).items():
        zeros += int((module.weight == 0).sum())
        stored += module.weight.numel()
        if include_lora and name in layers and not layers[name].merged:
            stored += lora_parameter_count(model, [name])
    return zeros / stored if stored else 0.0


@torch.no_grad()
def effective_sparsity(model: nn.Module) -> float:
    """Zeros of the weights the prunable layers compute with, as a share of those weights: ``W``,
    or ``W + ΔW`` while a LoRA update ``ΔW`` is attached unmerged. Masked LoRA's ``ΔW = M ⊙ sBA``
    keeps every zero of ``W``; plain LoRA's ``sBA`` fills them wherever it reaches. Counted in fp32,
    one layer at a time."""
    layers = lora_layers(model)
    zeros = total = 0
    for name, module in prunable_linears(model).items():
        w = module.weight
        layer = layers.get(name)
        if layer is not None and not layer.merged and not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    w = w.float() + layer.get_delta_weight(adapter).to(w.device, torch.float32)
        zeros += w.numel() - int(torch.count_nonzero(w))
        total += w.numel()
    return zeros / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# Schedule and loop
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, lr: float, warmup: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over the first
    ``w = round(warmup * steps)`` steps (``lr·(step+1)/(w+1)``, as nanoGPT, so no step has lr 0),
    ``lr`` at step ``w``, then linear decay ``lr·(steps-step)/(steps-w)`` towards 0 (Section 2.3)."""
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")
    w = int(round(warmup * steps))
    if step < w:
        return lr * (step + 1) / (w + 1)
    return lr * (steps - step) / (steps - w)


def _weights_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's frozen weights are stored in (that of its input embedding)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        return embedding.weight.dtype
    return next(model.parameters()).dtype


def _autocast_dtype(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """GPU: bf16 where supported, else fp16. CPU: the weights' dtype if it is a half type."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    weight_dtype = _weights_dtype(model)
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else None


def check_half_precision(dtype: torch.dtype | str, device: torch.device | str) -> None:
    """float16 is for GPUs: on a CPU its matrix products run on a slow fallback (~90x slower than
    float32 on the 2-core AVX-512 machine this was measured on, where bf16 was 2.6x faster than
    float32) and training needs loss scaling. Raise early, naming the alternatives."""
    name = str(dtype).removeprefix("torch.")
    if name == "float16" and torch.device(device).type == "cpu":
        raise ValueError(
            "dtype float16 needs a CUDA GPU: on the CPU its matrix products run on a slow fallback and training "
            "needs loss scaling; use bfloat16 (half the memory of float32, float32's exponent range) or float32"
        )


@contextlib.contextmanager
def fp32_master_weights(params: Iterable[nn.Parameter], enabled: bool = True) -> Iterator[None]:
    """Train half-precision parameters through fp32 master copies, in place (mixed precision).

    Inside the block every parameter in ``params`` stored in bf16/fp16 holds an fp32 copy of
    itself (gradients, Adam moments and updates in fp32, so updates far below bf16's resolution
    accumulate); frozen weights stay in half precision and the forward runs under autocast. On
    exit each parameter is rounded back to the dtype it came in, so the model leaves training as
    homogeneous as it entered it: evaluation, lm-eval, merging and ``save_pretrained`` see a plain
    bf16 model, as it would be deployed. The Parameter objects are kept (only ``.data`` changes),
    so optimizers and masks holding them stay valid.
    """
    upcast = [(p, p.dtype) for p in params if enabled and p.dtype in (torch.bfloat16, torch.float16)]
    for p, _ in upcast:
        p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in upcast:
            p.grad = None
            p.data = p.data.to(dtype)


class Diverged(FloatingPointError):
    """Training diverged: a loss, gradient norm or held-out perplexity became NaN or infinite. The
    run stops with a one-line message naming the step and the learning rate; no record is written."""


NonFiniteLoss = Diverged  # the name from when only the loss was guarded


@dataclass(frozen=True)
class TrainSettings:
    """The loop's knobs (a subset of ``RunConfig``)."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 2
    grad_accum: int = 4
    weight_decay: float = 0.0
    warmup: float = 0.1
    grad_checkpointing: bool = False
    seed: int = 0
    eval_every: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (isinstance(self.eval_every, int) and self.eval_every >= 0):
            raise ValueError(f"eval_every must be an integer >= 0 (0: never), got {self.eval_every!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def windows_needed(self) -> int:
        return self.steps * self.batch_size * self.grad_accum

    @classmethod
    def from_config(cls, config: RunConfig, eval_every: int = 0) -> TrainSettings:
        return cls(
            steps=config.steps, lr=config.lr, batch_size=config.batch_size, grad_accum=config.grad_accum,
            weight_decay=config.weight_decay, warmup=config.warmup, grad_checkpointing=config.grad_checkpointing,
            seed=config.seed, eval_every=eval_every,
        )  # fmt: skip


def train_(
    model: nn.Module,
    windows: torch.Tensor,
    settings: TrainSettings,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    evaluate: Callable[[], float] | None = None,
    evaluate_last: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the parameters that require gradients on token ``windows`` [N, seqlen] (in place).

    ``masks`` (Full IMP) maps prunable layer names (fused expert tensors: parameter names) to
    keep-masks enforced after every step.
    ``evaluate()`` (a perplexity) is called at step 0, every ``settings.eval_every`` steps and, with
    ``evaluate_last``, after the last step (a caller that evaluates the final model anyway passes
    False and adds that value itself). Returns the loss / lr / throughput history and timings.

    Precision: a model stored in bf16 (or fp16 on a GPU) trains its trainable parameters through
    fp32 master copies (:func:`fp32_master_weights`) with the forward under autocast, and the
    evaluations during training run under the same autocast, on the model as it trains. When
    training ends every parameter is back in the dtype it came in.
    """
    from tqdm import tqdm  # a text bar, also in notebooks (widget state would bloat stored notebooks)

    s = settings
    if windows.ndim != 2:
        raise ValueError(f"training windows must be a [N, seqlen] tensor, got shape {tuple(windows.shape)}")
    if windows.shape[0] < s.windows_needed:
        raise ValueError(
            f"{s.steps} steps x batch {s.batch_size} x accumulation {s.grad_accum} need {s.windows_needed} "
            f"training windows, got {windows.shape[0]}"
        )
    device = next(model.parameters()).device
    check_half_precision(_weights_dtype(model), device)
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []
    amp_dtype = _autocast_dtype(model, device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def tracked(step: int, lr: float) -> float:
        with autocast():
            value = evaluate()
        if not math.isfinite(value):
            when = "before any update" if step == 0 else f"after step {step}"
            raise Diverged(
                f"training diverged: held-out perplexity is {value} {when} (step {step}, lr {lr:.3g}); "
                + ("the pruned model's outputs are not finite" if step == 0 else "lower --lr")
            )
        return value

    if not params or s.steps == 0:
        if evaluate is not None:
            history.append({"step": 0, "perplexity": tracked(0, s.lr)})
        return {"history": history, "train_s": 0.0, "tokens": 0, "steps": 0, "loss": None}

    generator = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(windows.shape[0], generator=generator)[: s.windows_needed]
    batches = windows[order].view(s.steps, s.grad_accum, s.batch_size, -1)
    tokens_per_step = s.grad_accum * s.batch_size * windows.shape[1]
    modules = dict(model.named_modules())
    layers = lora_layers(model)
    enforced = []
    for name, mask in (masks or {}).items():
        if name in layers or name in modules:
            weight = (layers[name].get_base_layer() if name in layers else modules[name]).weight
        else:  # a fused 3-D expert tensor, by its parameter name
            weight = model.get_parameter(name)
        # beside its weight (a device map may spread layers over GPUs); multiplying: ~25x masked_fill_
        enforced.append((weight, mask.to(weight.device).view(torch.uint8)))
    use_cache = getattr(model.config, "use_cache", None)
    start = time.perf_counter()
    trained_s, loss_value = 0.0, float("nan")
    with fp32_master_weights(params, enabled=amp_dtype is not None):
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        try:  # the fused kernel (CPU and CUDA) updates all parameters in one pass
            optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        except (RuntimeError, ValueError):
            optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if s.grad_checkpointing:
            model.config.use_cache = False
            # transformers v5 renamed it; recompute each block's activations in the backward pass
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        bar = tqdm(range(s.steps), desc="retrain", disable=not progress, dynamic_ncols=True)
        try:
            if evaluate is not None:
                history.append({"step": 0, "perplexity": tracked(0, lr_at(0, s.steps, s.lr, s.warmup))})
            torch.manual_seed(s.seed)  # dropout
            model.train()
            for step in bar:
                t0 = time.perf_counter()
                lr = lr_at(step, s.steps, s.lr, s.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(s.grad_accum):
                    ids = batches[step, micro].to(device, non_blocking=True)
                    with autocast():
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    if not torch.isfinite(loss):
                        raise Diverged(
                            f"training diverged: loss is {loss.item()} at step {step} (lr {lr:.3g}, micro-batch "
                            f"{micro}); lower --lr or check the data"
                        )
                    scaler.scale(loss / s.grad_accum).backward()
                    loss_sum += loss.item()
                for weight, keep in enforced:  # Full IMP: no update can reach a pruned weight
                    if weight.grad is not None:
                        weight.grad.mul_(keep)
                scaler.unscale_(optimizer)  # no-op without fp16's loss scaling
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                # with fp16 loss scaling an overflow is routine: the scaler skips the step and lowers the scale
                if not math.isfinite(grad_norm) and not scaler.is_enabled():
                    raise Diverged(
                        f"training diverged: gradient norm is {grad_norm} at step {step} (lr {lr:.3g}); lower --lr"
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for weight, keep in enforced:
                        weight.mul_(keep)
                dt = time.perf_counter() - t0
                trained_s += dt
                loss_value = loss_sum / s.grad_accum
                entry = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                         "tokens_per_s": tokens_per_step / dt}  # fmt: skip
                due = s.eval_every and (step + 1) % s.eval_every == 0
                last = step + 1 == s.steps
                if evaluate is not None and (due or last) and (evaluate_last or not last):
                    entry["perplexity"] = tracked(step + 1, lr)
                    model.train()
                history.append(entry)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:.0f}")
        finally:
            bar.close()
            model.eval()
            if s.grad_checkpointing:
                disable = (
                    getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                )
                disable()
                if use_cache is not None:
                    model.config.use_cache = use_cache
            optimizer.zero_grad(set_to_none=True)
    return {
        "history": history,
        "train_s": trained_s,
        "wall_s": time.perf_counter() - start,
        "tokens": tokens_per_step * s.steps,
        "steps": s.steps,
        "loss": loss_value,
    }


# ---------------------------------------------------------------------------------------------
# The experiment step: what run_llm calls
# ---------------------------------------------------------------------------------------------


def canonical_retrain(groups: Iterable[str]) -> str:
    """One spelling per method: the preset's name if the groups form one, else the groups joined
    with '+' in the order biases, norms, head, lora (so 'lora+norms' and 'norms+lora' key alike)."""
    groups = _check_groups(groups)
    for name, preset in RETRAIN_PRESETS.items():
        if preset == groups:
            return name
    return "+".join(groups)


def group_combinations(include_biases: bool = True) -> list[tuple[str, ...]]:
    """The 16 combinations of parameter groups in the order of Table 13 (Appendix C.1); without
    biases (models that have none: LLaMA, Mistral, SmolLM2), the 8 that do not use them."""
    groups = RETRAIN_GROUPS if include_biases else tuple(g for g in RETRAIN_GROUPS if g != "biases")
    return [c for r in range(len(groups) + 1) for c in itertools.combinations(groups, r)]


def method_config(base: RunConfig, retrain: str | Iterable[str], **changes: Any) -> RunConfig:
    """``base`` with a retraining method, and the fields that cannot affect that method reset to
    their defaults, so a run shared between notebooks (e.g. no retraining at 50%) is stored once:
    no training resets the loop settings; no LoRA resets the LoRA fields (no ``lora`` group: the target set); no head group the head mode."""
    groups = retrain_groups(retrain) if isinstance(retrain, str) else _check_groups(retrain)
    config = base.replace(retrain=canonical_retrain(groups), **changes)
    defaults = RunConfig()
    reset: dict[str, Any] = {}
    if not groups or config.steps == 0:
        reset |= {f: getattr(defaults, f) for f in _LOOP_FIELDS}
        reset["retrain"] = "none"
    if not uses_lora(config.replace(**reset)) or "retrain" in reset:
        reset |= {f: getattr(defaults, f) for f in ("lora", "lora_rank", "lora_alpha")}
    if "lora" not in groups or "retrain" in reset:  # the head's own LoRA does not depend on the set
        reset["lora_targets"] = defaults.lora_targets
    if "head" not in groups:
        reset["head"] = defaults.head
    return config.replace(**reset)


_LOOP_FIELDS = (
    "steps", "lr", "batch_size", "grad_accum", "weight_decay", "warmup", "grad_checkpointing", "train", "eval_every",
)  # fmt: skip


def lora_spec(config: RunConfig) -> LoraSpec:
    return LoraSpec(kind=config.lora, rank=config.lora_rank, alpha=config.lora_alpha)


def uses_lora(config: RunConfig) -> bool:
    groups = config.groups
    return "lora" in groups or ("head" in groups and config.head == "lora")


def retrain_(
    model: nn.Module,
    tokenizer,
    config: RunConfig,
    *,
    windows: torch.Tensor | None = None,
    eval_ids: torch.Tensor | None = None,
    eval_every: int = 0,
    evaluate_last: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrain a pruned model with the method of ``config`` (Sections 3.1-3.2), in place.

    Training windows come from ``config.train`` (unless ``windows`` is given). Masked LoRA is merged
    at the end (every zero kept); plain LoRA stays unmerged. With ``eval_every > 0`` and
    ``eval_ids``, the held-out perplexity is tracked (Figure 3). Returns ``metrics`` (trainable
    share, sparsity before training, ``sparsity_effective`` (of the weights the layers compute with
    after training: masked LoRA keeps every zero, plain LoRA's ``W + sBA`` is dense where it
    reaches), ``sparsity_with_adapters`` (storage, unmerged adapters counted) and
    ``sparsity_merged`` (storage after merging masked LoRA), LoRA kind, final loss), ``timings``
    and ``history``, to be merged into the run's record. Raises ``Diverged`` on a NaN/inf loss,
    gradient norm or tracked perplexity.
    """
    settings = TrainSettings.from_config(config, eval_every=eval_every)
    if windows is None:
        from .data import resolve_bos, sample_windows

        bos, _ = resolve_bos(config.bos, getattr(model.config, "model_type", None), tokenizer)
        windows = sample_windows(
            tokenizer, config.train, max(settings.windows_needed, 1), config.seqlen,
            seed=config.seed + TRAIN_SEED_OFFSET, split="train", bos=bos,
        )  # fmt: skip
    before = {n: m.weight for n, m in prunable_linears(model).items()}
    # kept in host memory: one byte per prunable weight next to the model would not fit (OPT-30B: 27.6 GiB)
    zero_before = {n: (w == 0).cpu() for n, w in before.items()}
    sparsity_before = prunable_sparsity(model)

    torch.manual_seed(config.seed)  # LoRA initialisation
    trainable = mark_trainable_(
        model, config.groups, lora=lora_spec(config), head=config.head, targets=config.lora_targets
    )
    evaluate = None
    if eval_every and eval_ids is not None:
        from .data import resolve_bos
        from .evaluation import perplexity

        bos, bos_id = resolve_bos(config.bos, getattr(model.config, "model_type", None), tokenizer)
        eval_bos = bos_id if bos == "window" else None

        def evaluate() -> float:
            return perplexity(model, eval_ids, config.seqlen, windows=config.windows, bos_id=eval_bos)["perplexity"]

    t0 = time.perf_counter()
    result = train_(
        model, windows, settings, masks=trainable.masks, evaluate=evaluate, evaluate_last=evaluate_last,
        progress=progress,
    )  # fmt: skip
    retrain_s = time.perf_counter() - t0
    sparsity_effective = effective_sparsity(model)
    sparsity_with_adapters = prunable_sparsity(model)
    t1 = time.perf_counter()
    merged = merge_(model) if config.lora == "masked" and lora_layers(model) else []
    merge_s = time.perf_counter() - t1
    for p in model.parameters():
        p.requires_grad_(False)
    after = {n: m.weight for n, m in prunable_linears(model).items()}
    lost = [n for n, z in zero_before.items() if not bool((after[n][z.to(after[n].device)] == 0).all())]
    if lost:
        raise AssertionError(f"pruned weights became non-zero in {lost[:3]}: the mask was not enforced")
    kind = config.lora if uses_lora(config) else None
    lora_params = trainable.counts.get("lora", 0) + (trainable.counts.get("head", 0) if config.head == "lora" else 0)
    metrics = {
        "lora_kind": kind,
        "trainable_params": trainable.trainable,
        "total_params": trainable.total,
        "trainable_share": trainable.share,
        "trainable_by_group": trainable.counts,
        "lora_params": lora_params,
        "lora_targets": trainable.lora_set or None,
        "head_untied": trainable.head_untied,
        "sparsity_before": sparsity_before,
        "sparsity_effective": sparsity_effective,
        "sparsity_with_adapters": sparsity_with_adapters,
        "sparsity_merged": prunable_sparsity(model),
        "lora_merged": bool(merged),
        "retrain_steps": result["steps"],
        "train_loss": result["loss"],
        "train_tokens": result["tokens"],
        "train_tokens_per_s": result["tokens"] / result["train_s"] if result["train_s"] else None,
    }
    timings = {
        "retrain_s": retrain_s,
        "train_s": result["train_s"],
        "merge_s": merge_s,
    }
    return {"metrics": metrics, "timings": timings, "history": result["history"]}


def final_perplexity(history: list[dict[str, Any]]) -> float | None:
    """The last tracked perplexity of a history, if any."""
    values = [h["perplexity"] for h in history if "perplexity" in h and math.isfinite(h["perplexity"])]
    return values[-1] if values else None

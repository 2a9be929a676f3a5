"""Magnitude pruning of vision models (paper Appendix A.2).

The paper's vision setting prunes every weight except biases and BatchNorm parameters with the
*Global* criterion: all prunable weights form one vector and one threshold removes the smallest
magnitudes. The layer-wise allocations of Appendix A.2 are here too:

- ``uniform`` (Zhu & Gupta 2017): every layer loses the same fraction;
- ``uniform+`` (Gale et al. 2019): the first convolution stays dense and the head loses at most 80%,
  the other layers share the rest equally;
- ``erk`` (Evci et al. 2020): layer density proportional to ``sum(shape) / prod(shape)``;
- ``lamp`` (Lee et al. 2020): global threshold on LAMP scores ``w_u^2 / sum_{v>=u} w_v^2``
  (weights of a layer sorted by magnitude).

Scores are pure functions; :func:`prune_` is the one in-place transform. Masks are boolean
*keep* masks, built with :func:`perplib.sparsity.topk_mask` so counts are exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sparsity import Sparsity, topk_mask

ALLOCATIONS = ("global", "uniform", "uniform+", "erk", "lamp")
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every convolution and linear weight (head included), by ``<module>.weight`` name; never
    biases or BatchNorm. LoRA-wrapped layers contribute their base layer's weight."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            out[f"{name.replace('.base_layer', '')}.weight"] = module.weight
    return out


def parse_ratio(sparsity: float | str | Sparsity) -> float:
    """Unstructured sparsity ratio in [0, 1); N:M patterns are an LLM setting and rejected here."""
    spec = Sparsity.parse(sparsity)
    if spec.is_nm:
        raise ValueError(f"vision pruning takes an unstructured ratio in [0, 1), got N:M pattern '{spec}'")
    return spec.ratio


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every entry: ``w_u^2 / sum_{v: |w_v| >= |w_u|} w_v^2`` (Lee et al. 2020, Eq. 2)."""
    sq = weight.detach().reshape(-1).float() ** 2
    order = torch.argsort(sq)
    sorted_sq = sq[order]
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / suffix.clamp_min(torch.finfo(sq.dtype).tiny)
    return scores.view_as(weight)


def erk_densities(shapes: dict[str, torch.Size], density: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel layer densities with total kept fraction ``density`` (Evci et al. 2020).

    Density of a layer is ``eps * sum(shape) / prod(shape)``; layers that would exceed 1 are kept
    dense and ``eps`` is solved again over the rest.
    """
    numel = {k: int(torch.Size(s).numel()) for k, s in shapes.items()}
    raw = {k: sum(s) / numel[k] for k, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[k] for k in dense)
        free = sum(raw[k] * numel[k] for k in shapes if k not in dense)
        eps = budget / free if free > 0 else 0.0
        over = {k for k in shapes if k not in dense and eps * raw[k] > 1.0}
        if not over:
            return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}
        dense |= over


def layer_ratios(shapes: dict[str, torch.Size], ratio: float, allocation: str) -> dict[str, float]:
    """Per-layer pruning ratios of a layer-wise allocation (``uniform``, ``uniform+``, ``erk``)."""
    names = list(shapes)
    if allocation == "uniform":
        return dict.fromkeys(names, ratio)
    if allocation == "erk":
        return {k: 1.0 - d for k, d in erk_densities(shapes, 1.0 - ratio).items()}
    if allocation == "uniform+":
        numel = {k: int(torch.Size(s).numel()) for k, s in shapes.items()}
        first, last = names[0], names[-1]
        ratios = {first: 0.0, last: min(ratio, 0.8)}
        rest = [k for k in names if k not in ratios]
        need = ratio * sum(numel.values()) - ratios[last] * numel[last]
        share = need / max(sum(numel[k] for k in rest), 1)
        if rest and not 0.0 <= share < 1.0:
            raise ValueError(f"uniform+ cannot reach sparsity {ratio:g} with the first layer dense and the head at 80%")
        ratios.update(dict.fromkeys(rest, share))
        return {k: ratios[k] for k in names}
    raise ValueError(f"layer-wise allocation must be one of ['uniform', 'uniform+', 'erk'], got {allocation!r}")


def compute_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float | str | Sparsity,
    allocation: str = "global",
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing a ``sparsity`` fraction of all entries of ``weights``.

    ``masks`` (from an earlier prune-retrain cycle) marks weights already removed: they stay
    removed, and the new target counts them. ``global`` and ``lamp`` remove exactly
    ``round(sparsity * total)`` entries.
    """
    ratio = parse_ratio(sparsity)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if not weights:
        raise ValueError("the model has no convolution or linear weights to prune")
    masks = masks or {}

    def scores_of(name: str, w: torch.Tensor) -> torch.Tensor:
        s = lamp_scores(w) if allocation == "lamp" else w.detach().abs().float()
        if name in masks:  # already pruned: lowest possible score
            s = s.masked_fill(~masks[name].to(s.device), -1.0)
        return s

    if allocation in ("global", "lamp"):
        names = list(weights)
        flat = torch.cat([scores_of(k, weights[k]).reshape(-1).cpu() for k in names])
        keep = topk_mask(flat, ratio)
        out, start = {}, 0
        for k in names:
            n = weights[k].numel()
            out[k] = keep[start : start + n].view(weights[k].shape).to(weights[k].device)
            start += n
        return out
    ratios = layer_ratios({k: w.shape for k, w in weights.items()}, ratio, allocation)
    return {k: topk_mask(scores_of(k, w), ratios[k]) for k, w in weights.items()}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight its mask removes (in place)."""
    weights = prunable_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].dtype))


def prune_(
    model: nn.Module,
    sparsity: float | str | Sparsity,
    allocation: str = "global",
    masks: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Magnitude-prune ``model`` in place to ``sparsity`` (Appendix A.2); returns the keep-masks."""
    new = compute_masks(prunable_weights(model), sparsity, allocation, masks)
    apply_masks_(model, new)
    return new


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all prunable weights (what the paper's sparsity axis counts)."""
    weights = prunable_weights(model).values()
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(total, 1)


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """``||W - W_pruned||_2 / ||W||_2`` over all prunable weights (used by ALLR)."""
    num = sum(float((before[k].detach().float() - after[k].detach().float()).pow(2).sum()) for k in before)
    den = sum(float(before[k].detach().float().pow(2).sum()) for k in before)
    return (num / den) ** 0.5 if den > 0 else 0.0

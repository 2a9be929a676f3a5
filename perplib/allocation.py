"""Layer-wise sparsity allocation: uniform (Section 2.3) or OWL (Yin et al., ICML 2024).

OWL gives every decoder block a sparsity from its share of *outlier* scores: with the Wanda score
``|W_ij| * ||X_j||`` of the dense model, a block's outlier ratio is the fraction of its scores
above ``M`` times the block's mean score. Blocks with more outliers are pruned less:
``s_b = S - 2λ (x_b - mean(x))`` with ``x`` the outlier ratios scaled to [0, 1] (OWL's code),
so the block sparsities span ``2λ`` and average exactly ``S``; a skewed distribution is shrunk
towards ``S`` so every block stays within ``±λ`` (the bound of the OWL paper). The sparsities
become exact per-layer counts (largest remainders) that sum to ``round(S · N)`` over all ``N``
prunable weights; :func:`perplib.pruning.prune_` takes them as ``counts``. Everything here but
:func:`outlier_ratios` (one walk of the pruning driver over the dense model) is a pure function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .sparsity import Sparsity

ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class Allocation:
    """How the target sparsity is spread over the decoder blocks."""

    kind: str = field(default="uniform", metadata={"help": "uniform | owl"})
    m: float = field(default=5.0, metadata={"help": "OWL: a score is an outlier above M x its block's mean"})
    lam: float = field(default=0.08, metadata={"help": "OWL: block sparsities within ±λ of the target"})

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}, got {self.kind!r}")
        if not (isinstance(self.m, (int, float)) and math.isfinite(self.m) and self.m > 0):
            raise ValueError(f"OWL's M (outlier threshold, a multiple of the mean score) must be > 0, got {self.m!r}")
        if not (isinstance(self.lam, (int, float)) and 0 <= self.lam < 0.5):
            raise ValueError(
                f"OWL's λ (largest deviation from the target sparsity) must be in [0, 0.5), got {self.lam!r}"
            )

    def check(self, sparsity: Sparsity, method: str, calibrated: bool) -> None:
        """Refuse what OWL cannot do, before any work."""
        if self.kind == "uniform":
            return
        if sparsity.is_nm:
            raise ValueError(
                f"OWL allocates unstructured sparsity; N:M ({sparsity}) fixes the count in every group of "
                f"{sparsity.m} weights, so there is nothing to allocate: use allocation 'uniform'"
            )
        if not (self.lam <= sparsity.ratio < 1 - self.lam):
            raise ValueError(f"OWL's block sparsities {sparsity.ratio:g} ± λ={self.lam:g} must stay in [0, 1): lower λ")
        if not calibrated:
            raise ValueError(
                f"OWL needs calibration data for its outlier ratios (|W|·||X|| of the dense model), also "
                f"with {method!r}: give calibration windows (perp: --nsamples/--calib)"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Fraction of one block's scores (all its matrices together) above ``m`` x their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Block sparsities from outlier ratios: ``target - 2λ(x - mean(x))``, ``x`` the ratios scaled
    to [0, 1]; mean exactly ``target``, each within ``±λ`` (deviations shrunk when skewed)."""
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        raise ValueError("OWL needs at least one block")
    spread = float(r.max() - r.min())
    if spread == 0 or lam == 0:
        return [float(target)] * r.numel()
    x = (r - r.min()) / spread
    dev = -2 * lam * (x - x.mean())
    largest = float(dev.abs().max())
    if largest > lam:
        dev = dev * (lam / largest)
    return [float(target + d) for d in dev]


def apportion(quotas: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers summing to ``total``, each as close to its quota as the largest-remainder rule
    allows (quotas scaled to ``total`` first), never above its cap."""
    q = [float(v) for v in quotas]
    scale = total / sum(q) if sum(q) else 0.0
    q = [v * scale for v in q]
    out = [min(int(math.floor(v)), c) for v, c in zip(q, caps, strict=True)]
    order = sorted(range(len(q)), key=lambda i: (-(q[i] - math.floor(q[i])), i))
    left = total - sum(out)
    while left > 0:
        moved = False
        for i in order:
            if left and out[i] < caps[i]:
                out[i] += 1
                left -= 1
                moved = True
        if not moved:
            raise ValueError(f"cannot remove {total} weights: the layers hold only {sum(caps)}")
    return out


def layer_counts(sizes: Mapping[str, int], block_of: Mapping[str, int], block_sparsity: Sequence[float],
                 target: float) -> dict[str, int]:  # fmt: skip
    """Weights to remove per layer: each layer at its block's sparsity, together exactly
    ``round(target · N)``."""
    names = list(sizes)
    total = int(round(target * sum(sizes.values())))
    quotas = [block_sparsity[block_of[n]] * sizes[n] for n in names]
    return dict(zip(names, apportion(quotas, total, [sizes[n] for n in names]), strict=True))


@torch.no_grad()
def outlier_ratios(model: nn.Module, calibration: torch.Tensor, m: float, *, device=None,
                   batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
    """OWL's outlier ratio of every decoder block of the *dense* model, from Wanda scores on the
    activations the pruning driver's walk propagates through the dense blocks. Returns the ratios
    and the wall time."""
    import time

    from .adapters import block_matrices, matrix, routed_experts
    from .criteria import column_norms, wanda_scores
    from .pruning import collect_input_stats, walk_blocks

    ratios: list[float] = []
    t0 = time.perf_counter()

    def visit(_i: int, block: nn.Module, inputs: list, at: torch.device) -> None:
        linears = block_matrices(block)
        with routed_experts(block, linears):  # fused experts: each expert's own tokens
            stats = collect_input_stats(block, linears, inputs, False, at)
        # an expert no calibration token reached has no Wanda score: it takes no part in the ratio
        scores = [wanda_scores(matrix(lin), column_norms(stats[n].value())) for n, lin in linears.items() if n in stats]
        ratios.append(outlier_ratio(scores, m))

    walk_blocks(model, calibration, visit, device=device, batch_size=batch_size, write_back=False)
    return {"ratios": ratios, "m": m, "seconds": time.perf_counter() - t0}


def owl_counts(
    model: nn.Module, ratios: Sequence[float], target: float, lam: float
) -> tuple[dict[str, int], list[float]]:
    """Per-layer counts and block sparsities of OWL for ``model`` (its prunable layers)."""
    from .adapters import adapter_for, block_matrices

    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    if len(ratios) != len(blocks):
        raise ValueError(f"{len(ratios)} outlier ratios for {len(blocks)} decoder blocks")
    sizes, block_of = {}, {}
    for i, block in enumerate(blocks):
        for name, mod in block_matrices(block).items():
            full = f"{adapter.block_prefix(i)}.{name}"
            sizes[full], block_of[full] = mod.weight.numel(), i
    sparsities = owl_sparsities(ratios, target, lam)
    return layer_counts(sizes, block_of, sparsities, target), sparsities


def block_sparsities(layers: Mapping[str, float], sizes: Mapping[str, int], block_of: Mapping[str, int]) -> list[float]:
    """Achieved sparsity per block from a prune report's per-layer sparsities."""
    n = max(block_of.values()) + 1
    zeros, total = [0.0] * n, [0] * n
    for name, s in layers.items():
        zeros[block_of[name]] += s * sizes[name]
        total[block_of[name]] += sizes[name]
    return [z / t for z, t in zip(zeros, total, strict=True)]


def plan(model: nn.Module, allocation: Allocation, target: float, calibration: torch.Tensor | None, *,
         ratios: Sequence[float] | None = None, device=None, batch_size: int = 8) -> tuple[dict[str, int], dict]:  # fmt: skip
    """Per-layer counts for ``prune_`` and what goes into its report: the allocation, the outlier
    ratios (measured now unless ``ratios`` are given, e.g. from an earlier record) and the block
    targets. ``ratios_s``: the time spent measuring ratios here (0 when given)."""
    seconds = 0.0
    if ratios is None:
        if calibration is None:
            raise ValueError("OWL needs calibration data for its outlier ratios (|W|·||X|| of the dense model)")
        measured = outlier_ratios(model, calibration, allocation.m, device=device, batch_size=batch_size)
        ratios, seconds = measured["ratios"], measured["seconds"]
    counts, targets = owl_counts(model, ratios, target, allocation.lam)
    info = {**allocation.as_dict(), "ratios": list(ratios), "targets": targets, "ratios_s": seconds}
    return counts, info

"""Sparsity specifications and the mask creators every criterion shares.

A criterion (magnitude, Wanda, SparseGPT, global vision magnitude) turns weights and statistics
into *scores*; the functions here turn scores into a boolean keep-mask. Keeping the two apart is
what lets every criterion support unstructured and N:M sparsity (paper Section 2.3, Appendix A.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Sparsity:
    """Either an unstructured ratio in [0, 1) or a semi-structured N:M pattern.

    N:M follows Mishra et al. (2021) and the Wanda/SparseGPT code: in every group of M
    consecutive input weights of a row, N are zero (2:4 and 4:8 both remove half; 1:4 removes a
    quarter). ``ratio`` is the fraction of weights removed either way.
    """

    ratio: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not (0 < self.n < self.m):
                raise ValueError(f"sparsity must be a ratio in [0, 1) or 'N:M' with 0 < N < M, got '{self.n}:{self.m}'")
        elif not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"sparsity must be a ratio in [0, 1) or 'N:M' with 0 < N < M, got {self.ratio!r}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def parse(cls, spec: str | float | int | Sparsity) -> Sparsity:
        """Parse ``0.5``, ``"0.5"``, ``"50%"``, ``"2:4"``; reject anything else with a clear message."""
        if isinstance(spec, Sparsity):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"sparsity must be a ratio in [0, 1) or 'N:M' with 0 < N < M, got {spec!r}")
        if isinstance(spec, (int, float)):
            return cls(ratio=float(spec))
        text = str(spec).strip()
        match = _NM.match(text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if not (0 < n < m):
                raise ValueError(f"sparsity must be a ratio in [0, 1) or 'N:M' with 0 < N < M, got '{text}'")
            return cls(ratio=n / m, n=n, m=m)
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(
                f"sparsity must be a ratio in [0, 1) (e.g. 0.5 or 50%) or 'N:M' with 0 < N < M (e.g. 2:4), got '{text}'"
            ) from None
        return cls(ratio=value)

    def check_width(self, width: int, name: str = "layer") -> None:
        """N:M groups run along the input dimension, so M must divide it."""
        if self.is_nm and width % self.m:
            raise ValueError(f"N:M sparsity {self} needs M={self.m} to divide the input width of {name}, got {width}")


def topk_mask(scores: torch.Tensor, ratio: float, dim: int | None = None) -> torch.Tensor:
    """Keep-mask removing the ``round(ratio * count)`` lowest scores, over the whole tensor
    (``dim=None``) or independently along ``dim`` (``dim=-1``: per output row).

    Exactly that many entries are removed per group, ties broken by position, so the achieved
    sparsity equals the request.
    """
    if dim is None:
        flat = scores.reshape(-1)
        k = int(round(ratio * flat.numel()))
        mask = torch.ones_like(flat, dtype=torch.bool)
        if k:
            mask[torch.topk(flat, k, largest=False, sorted=False).indices] = False
        return mask.view_as(scores)
    k = int(round(ratio * scores.shape[dim]))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask zeroing the ``n`` lowest scores in every group of ``m`` consecutive inputs."""
    rows, cols = scores.shape[0], scores[0].numel()
    if cols % m:
        raise ValueError(f"N:M sparsity {n}:{m} needs M={m} to divide the input width, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False, sorted=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False)
    return mask.view_as(scores)


def make_mask(scores: torch.Tensor, sparsity: Sparsity, per_row: bool = False) -> torch.Tensor:
    """The one entry point criteria use: N:M if the spec says so, else top-k per row or per matrix."""
    if sparsity.is_nm:
        return nm_mask(scores, sparsity.n, sparsity.m)
    return topk_mask(scores, sparsity.ratio, dim=-1 if per_row else None)


def density(t: torch.Tensor) -> float:
    """Fraction of non-zero entries."""
    return float(torch.count_nonzero(t)) / max(t.numel(), 1)


def count_mask(scores: torch.Tensor, k: int, per_row: bool = False) -> torch.Tensor:
    """Keep-mask removing exactly ``k`` lowest scores: over the whole matrix, or spread over the
    output rows (``per_row``: every row removes ``k // rows`` and the first ``k % rows`` rows one
    more). What a non-uniform allocation (:mod:`perplib.allocation`) needs for exact totals."""
    total = scores.numel()
    if not (0 <= k <= total):
        raise ValueError(f"cannot remove {k} of {total} weights")
    if not per_row or scores.ndim < 2:
        mask = torch.ones(total, dtype=torch.bool, device=scores.device)
        if k:
            mask[torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices] = False
        return mask.view_as(scores)
    rows = scores.shape[0]
    base, extra = divmod(k, rows)
    flat = scores.reshape(rows, -1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    take = base + (1 if extra else 0)
    if take:
        idx = torch.topk(flat, take, dim=1, largest=False, sorted=True).indices
        drop = torch.ones_like(idx, dtype=torch.bool)
        if extra:  # rows from `extra` on remove one fewer: keep their largest candidate
            drop[extra:, -1] = False
        mask.scatter_(1, idx, ~drop)
    return mask.view_as(scores)

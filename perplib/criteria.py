"""Pruning criteria for LLM weight matrices: magnitude, Wanda and SparseGPT (paper Section 3.3).

Every function here is pure math on one weight matrix ``W`` of shape ``[out, in]`` (as stored
by ``nn.Linear``) plus, for the calibration-based criteria, statistics of that layer's inputs.
Masks are boolean *keep* masks built by :func:`perplib.sparsity.make_mask`, so every criterion
supports unstructured (per matrix or per output row) and N:M sparsity alike. The block-by-block
plumbing that gathers the statistics lives in :mod:`perplib.pruning`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .sparsity import Sparsity, make_mask

# Below this many elements per op, OpenMP fork/join costs more than the op itself; on a machine
# whose cores are oversubscribed it costs 10x more (measured: a SparseGPT solve 1.8 s -> 0.18 s).
_SMALL_OP = 1 << 20


@contextlib.contextmanager
def few_threads(numel: int, limit: int = _SMALL_OP) -> Iterator[None]:
    """Run the ops inside single-threaded when they touch at most ``limit`` elements each (CPU only;
    results are identical, only speed changes). Restores the thread count afterwards."""
    before = torch.get_num_threads()
    if numel > limit or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select(scores: torch.Tensor, sparsity: Sparsity, per_row: bool = False) -> torch.Tensor:
    """Keep-mask from scores (:func:`perplib.sparsity.make_mask`), single-threaded for small CPU tensors."""
    with few_threads(scores.numel() if scores.device.type == "cpu" else _SMALL_OP + 1, limit=4 * _SMALL_OP):
        return make_mask(scores, sparsity, per_row=per_row)


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """Magnitude criterion: ``|W_ij|`` (Section 2.3)."""
    return W.abs()


def wanda_scores(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda criterion (Sun et al. 2023): ``|W_ij| * ||X_j||_2``.

    ``x_norm`` is the L2 norm of input feature ``j`` over all calibration tokens, shape ``[in]``.
    Scores are float32 whatever ``W``'s dtype (as the reference, which multiplies by a float32 norm).
    """
    if x_norm.shape != (W.shape[1],):
        raise ValueError(
            f"x_norm must have shape ({W.shape[1]},) to match W {tuple(W.shape)}, got {tuple(x_norm.shape)}"
        )
    return W.abs().float() * x_norm.float().unsqueeze(0)


def column_norms(sum_sq: torch.Tensor) -> torch.Tensor:
    """``||X_j||_2`` from the streamed per-feature sum of squares ``sum_t X_tj^2``."""
    return sum_sq.clamp_min(0).sqrt()


def hessian(xtx: torch.Tensor, n: int) -> torch.Tensor:
    """SparseGPT's layer Hessian ``H = 2 X X^T / n`` from the streamed sum ``X X^T`` over every
    calibration token, normalised by the number ``n`` of calibration *sequences*, as the reference
    code's running ``H *= n/(n+b); X *= sqrt(2/n)`` per batch of ``b`` sequences amounts to. The scale
    matters: dead input features get ``H_jj = 1`` and the damping is 1% of the mean diagonal, so
    dividing by tokens instead changes the masks of layers with dead inputs (OPT's fc2 after ReLU)."""
    if n < 1:
        raise ValueError(f"the Hessian needs at least one calibration sequence, got n={n}")
    return xtx * (2.0 / n)


def prune_by_scores(
    W: torch.Tensor, scores: torch.Tensor, sparsity: Sparsity | str | float, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the lowest-scoring weights; returns ``(W_new, keep_mask)`` (``W`` is not modified)."""
    mask = select(scores, Sparsity.parse(sparsity), per_row=per_row)
    return W * mask, mask


def _split_counts(total_k: float, starts: list[int], total: int) -> list[int]:
    """How many entries each column block prunes so that the blocks together prune exactly
    ``round(ratio * total)``: block ``[a, b)`` prunes ``round(r*b) - round(r*a)``."""
    bounds = starts + [total]
    return [
        int(round(total_k * bounds[i + 1] / total)) - int(round(total_k * bounds[i] / total))
        for i in range(len(starts))
    ]


def sparsegpt_inverse_hessian(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the mask of dead input features.

    Dead features (``H_jj == 0``: the input never fires) get ``H_jj = 1`` as in the reference
    code; damping adds ``percdamp`` times the mean diagonal (Frantar & Alistarh 2023, Section 3).
    """
    if not (percdamp >= 0):
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    H = H.to(torch.float32).clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag.add_(percdamp * diag.mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise RuntimeError(
            f"SparseGPT: the damped Hessian is not positive definite (percdamp={percdamp}); "
            "use more calibration samples or a larger percdamp"
        )
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: Sparsity | str | float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    per_row: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): OBS mask selection and weight update.

    Columns are processed in blocks of ``blocksize`` (independent of the number of calibration
    samples). Within a block the mask is chosen from ``w^2 / [H^-1]_jj^2`` of the weights as
    updated so far (per block over all rows, or per row with ``per_row``; N:M groups are chosen
    when the solve reaches their first column), then each column is zeroed where pruned and the
    error is spread over the not-yet-processed columns through the Cholesky factor of ``H^-1``.
    Unstructured pruning removes exactly ``round(ratio * numel)`` weights (per row: per row).

    Returns ``(W_new, keep_mask)`` with ``W_new`` in ``W``'s dtype; ``W`` is not modified.
    """
    sp = Sparsity.parse(sparsity)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) to match W {tuple(W.shape)}, got {tuple(H.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    sp.check_width(cols)
    if sp.is_nm:  # an N:M group must not straddle two column blocks
        blocksize = max(sp.m, blocksize - blocksize % sp.m)

    if not sp.is_nm and sp.ratio == 0:
        return W.clone(), torch.ones_like(W, dtype=torch.bool)

    # The inverse Hessian of a wide input (a 1536-wide Cholesky: ~1e9 flops) on every thread; many
    # small ops (the column loop, a small Cholesky) single-threaded on the CPU, see few_threads.
    cpu = W.device.type == "cpu"
    with few_threads(0 if cpu and cols < _WIDE_INPUT else _SMALL_OP + 1):
        Hinv, dead = sparsegpt_inverse_hessian(H.to(W.device), percdamp)
    small = cpu and rows * blocksize <= _SMALL_OP and cols * cols <= 4 * _SMALL_OP
    with few_threads(0 if small else _SMALL_OP + 1):
        return _sparsegpt_solve(W, Hinv, dead, sp, blocksize, per_row)


_WIDE_INPUT = 1024  # from this input width on, SparseGPT's inverse Hessian uses every CPU thread


def _sparsegpt_solve(W, Hinv, dead, sp: Sparsity, blocksize: int, per_row: bool):
    """The solve of :func:`sparsegpt_prune` on validated arguments and the factor of ``H^-1``."""
    rows, cols = W.shape
    # Work on W^T so that column j of W is the contiguous row Wt[j]: the per-column updates below
    # then touch contiguous memory.
    Wt = W.to(torch.float32).t().contiguous()
    Wt[dead] = 0
    prune = torch.zeros(cols, rows, dtype=torch.bool, device=W.device)  # True = pruned, transposed
    starts = list(range(0, cols, blocksize))
    if not sp.is_nm:
        per_block = _split_counts(sp.ratio * (cols if per_row else rows * cols), starts, cols)

    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2]  # view: updated in place
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal().unsqueeze(1)
        P1 = torch.zeros(count, rows, dtype=torch.bool, device=W.device)
        Err1 = torch.empty(count, rows, dtype=torch.float32, device=W.device)

        if not sp.is_nm:  # the whole block's mask from w^2 / [H^-1]_jj^2 before its updates
            if k := per_block[b]:
                score = W1.square() / d.square()
                if per_row:
                    P1.scatter_(0, torch.topk(score, k, dim=0, largest=False, sorted=False).indices, True)
                else:
                    P1.view(-1)[torch.topk(score.view(-1), k, largest=False, sorted=False).indices] = True
            scale = P1 / d  # err_j = w_j / [H^-1]_jj where pruned, 0 where kept

        for i in range(count):
            if sp.is_nm and i % sp.m == 0:  # choose this N:M group from the weights as updated so far
                group = slice(i, i + sp.m)
                score = W1[group].square() / d[group].square()
                P1[group].scatter_(0, torch.topk(score, sp.n, dim=0, largest=False, sorted=False).indices, True)
                scale_group = P1[group] / d[group]
            torch.mul(W1[i], scale_group[i % sp.m] if sp.is_nm else scale[i], out=Err1[i])
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1.0)  # OBS update of this and later columns

        W1.masked_fill_(P1, 0.0)  # pruned entries are ~0 after their own update; make them exact
        prune[i1:i2] = P1
        if i2 < cols:  # lazy batch update of the columns right of this block
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)

    return Wt.t().contiguous().to(W.dtype), ~prune.t().contiguous()

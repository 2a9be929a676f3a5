"""Exact oracles for the pruning criteria on tiny hand-made tensors (Section 3.3)."""

from __future__ import annotations

import pytest
import torch

from perplib.criteria import (
    column_norms,
    hessian,
    magnitude_scores,
    prune_by_scores,
    sparsegpt_prune,
    wanda_scores,
)
from perplib.sparsity import Sparsity

# a Linear(8 -> 2): row 0 is large everywhere, row 1 small
W28 = torch.tensor(
    [
        [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0],
        [0.1, 0.9, -0.2, 0.8, 0.3, -0.7, 0.4, 0.6],
    ]
)
XNORM8 = torch.tensor([4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 0.5])


def kept(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in mask]


# ---------------------------------------------------------------- magnitude
def test_magnitude_linear_4_1():
    W = torch.tensor([[0.5, -3.0, 2.0, -1.0]])
    W_new, mask = prune_by_scores(W, magnitude_scores(W), Sparsity.parse("0.5"))
    assert kept(mask) == [[1, 2]]
    assert torch.equal(W_new, torch.tensor([[0.0, -3.0, 2.0, 0.0]]))


@pytest.mark.parametrize(
    "spec, per_row, expected",
    [
        ("0.5", False, [[0, 1, 2, 3, 4, 5, 6, 7], []]),  # per matrix: row 1 is wiped out
        ("0.5", True, [[4, 5, 6, 7], [1, 3, 5, 7]]),
        ("2:4", False, [[2, 3, 6, 7], [1, 3, 5, 7]]),
        ("4:8", False, [[4, 5, 6, 7], [1, 3, 5, 7]]),
        ("0.25", True, [[2, 3, 4, 5, 6, 7], [1, 3, 4, 5, 6, 7]]),
    ],
)
def test_magnitude_linear_8_2(spec, per_row, expected):
    _, mask = prune_by_scores(W28, magnitude_scores(W28), Sparsity.parse(spec), per_row=per_row)
    assert kept(mask) == expected


# ---------------------------------------------------------------- Wanda
def test_wanda_linear_4_1_from_activations():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    X = torch.tensor([[6.0, 1.0, 0.0, 0.1], [8.0, 0.0, 1.0, 0.0]])  # column norms 10, 1, 1, 0.1
    x_norm = column_norms(X.square().sum(0))
    assert torch.allclose(x_norm, torch.tensor([10.0, 1.0, 1.0, 0.1]))
    scores = wanda_scores(W, x_norm)
    assert torch.allclose(scores, torch.tensor([[10.0, 2.0, 3.0, 0.4]]))
    W_new, mask = prune_by_scores(W, scores, Sparsity.parse("0.5"), per_row=True)
    assert kept(mask) == [[0, 2]]  # magnitude alone would keep columns 2 and 3
    assert torch.equal(W_new, torch.tensor([[1.0, 0.0, 3.0, 0.0]]))


@pytest.mark.parametrize(
    "spec, per_row, expected",
    [
        # scores row 0: 4 8 12 16 5 6 7 4 ; row 1: .4 3.6 .8 3.2 .3 .7 .4 .3
        ("0.5", True, [[1, 2, 3, 6], [1, 2, 3, 5]]),
        ("0.5", False, [[0, 1, 2, 3, 4, 5, 6, 7], []]),
        ("2:4", True, [[2, 3, 5, 6], [1, 3, 5, 6]]),
        ("4:8", False, [[1, 2, 3, 6], [1, 2, 3, 5]]),
    ],
)
def test_wanda_linear_8_2(spec, per_row, expected):
    _, mask = prune_by_scores(W28, wanda_scores(W28, XNORM8), Sparsity.parse(spec), per_row=per_row)
    assert kept(mask) == expected


def test_wanda_rejects_wrong_norm_shape():
    with pytest.raises(ValueError, match=r"x_norm must have shape \(8,\)"):
        wanda_scores(W28, torch.ones(4))


# ---------------------------------------------------------------- SparseGPT
def test_sparsegpt_two_columns_obs_update():
    # x1.x1 = 2, x2.x2 = 2, x1.x2 = 1 ; W = [1, 3]; OBS scores w_j^2 / [H_{j:,j:}^-1]_00: 1 vs 12
    X = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    H = hessian(X.T @ X, n=3)
    W = torch.tensor([[1.0, 3.0]])
    W_new, mask = sparsegpt_prune(W, H, "0.5", percdamp=0.0)
    assert kept(mask) == [[1]]
    # least squares: the surviving weight absorbs x1's contribution, 3 + (x1.x2)/(x2.x2) = 3.5
    assert torch.allclose(W_new, torch.tensor([[0.0, 3.5]]), atol=1e-6)
    W_nm, mask_nm = sparsegpt_prune(W, H, "1:2", percdamp=0.0)
    assert torch.equal(mask_nm, mask) and torch.allclose(W_nm, W_new, atol=1e-6)


def test_sparsegpt_diagonal_hessian_is_wanda_without_update():
    # uncorrelated inputs: no error to propagate; score w^2 * h_jj = (Wanda score)^2
    h = XNORM8.square()
    W_new, mask = sparsegpt_prune(W28, torch.diag(h), "0.5", percdamp=0.0, per_row=True)
    _, wanda_mask = prune_by_scores(W28, wanda_scores(W28, XNORM8), Sparsity.parse("0.5"), per_row=True)
    assert torch.equal(mask, wanda_mask)
    assert torch.equal(W_new, W28 * mask)


def _naive_obs(W, H, ratio, blocksize, percdamp):
    """Independent transcription of SparseGPT with explicit inverses in float64 (per matrix, per block)."""
    W = W.double().clone()
    H = H.double().clone()
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # [H_{j:, j:}^-1]_00 is the squared diagonal of the Cholesky factor of H^-1
        d2 = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(i1, i2)])
        score = W[:, i1:i2].square() / d2
        k = int(round(ratio * rows * i2)) - int(round(ratio * rows * i1))
        block_keep = torch.ones(rows * (i2 - i1), dtype=torch.bool)
        block_keep[torch.argsort(score.flatten(), stable=True)[:k]] = False
        keep[:, i1:i2] = block_keep.view(rows, -1)
        for j in range(i1, i2):
            hinv = torch.linalg.inv(H[j:, j:])
            q = W[:, j] * keep[:, j]
            err = (W[:, j] - q) / hinv[0, 0]
            W[:, j:] -= torch.outer(err, hinv[0, :])
            W[:, j] = q
    return W, keep


def test_sparsegpt_matches_naive_obs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g) @ torch.randn(12, 12, generator=g)
    W = torch.randn(5, 12, generator=g)
    H = hessian(X.T @ X, n=200)
    W_new, mask = sparsegpt_prune(W, H, "0.5", blocksize=4)
    W_ref, keep_ref = _naive_obs(W, H, 0.5, 4, 0.01)
    assert torch.equal(mask, keep_ref)
    assert torch.allclose(W_new.double(), W_ref, atol=1e-4)


@pytest.mark.parametrize("spec", ["0.5", "2:4", "4:8", "0.7"])
def test_layer_output_error_sparsegpt_lt_wanda_lt_magnitude(spec):
    # LLM-like inputs: feature scales spread over orders of magnitude, one shared component
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 64, generator=g) * torch.exp(torch.randn(64, generator=g))
    X = X + 0.5 * X[:, :1]
    W = torch.randn(32, 64, generator=g)
    sp = Sparsity.parse(spec)
    W_sgpt, _ = sparsegpt_prune(W, hessian(X.T @ X, 512), sp)
    W_wanda, _ = prune_by_scores(W, wanda_scores(W, column_norms(X.square().sum(0))), sp, per_row=True)
    W_mag, _ = prune_by_scores(W, magnitude_scores(W), sp)
    err = lambda W2: float((X @ (W - W2).T).norm())  # noqa: E731
    assert err(W_sgpt) < err(W_wanda) < err(W_mag)
    assert err(W_sgpt) < 0.7 * err(W_mag)


# ---------------------------------------------------------------- invariants shared by every criterion
def _all_criteria(W, sp, per_row):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(4 * W.shape[1], W.shape[1], generator=g)
    yield "magnitude", prune_by_scores(W, magnitude_scores(W), sp, per_row)
    yield "wanda", prune_by_scores(W, wanda_scores(W, column_norms(X.square().sum(0))), sp, per_row)
    yield "sparsegpt", sparsegpt_prune(W, hessian(X.T @ X, X.shape[0]), sp, blocksize=16, per_row=per_row)


@pytest.mark.parametrize("shape", [(7, 24), (16, 40)])
@pytest.mark.parametrize("spec", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_pattern_in_every_group(shape, spec):
    sp = Sparsity.parse(spec)
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    for name, (W_new, mask) in _all_criteria(W, sp, per_row=False):
        groups = mask.view(shape[0], -1, sp.m).sum(-1)
        assert torch.all(groups == sp.m - sp.n), name
        assert torch.all(W_new[~mask] == 0), name


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("per_row", [False, True])
def test_achieved_sparsity_equals_request(ratio, per_row):
    W = torch.randn(9, 40, generator=torch.Generator().manual_seed(4))
    for name, (W_new, mask) in _all_criteria(W, Sparsity(ratio), per_row=per_row):
        if per_row:
            assert torch.all((~mask).sum(1) == round(ratio * 40)), name
        assert int((~mask).sum()) == (9 * round(ratio * 40) if per_row else round(ratio * 360)), name
        assert int((W_new == 0).sum()) == int((~mask).sum()), name


def test_sparsegpt_rejects_bad_input():
    W = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"H must have shape \(6, 6\)"):
        sparsegpt_prune(W, torch.eye(5), "0.5")
    with pytest.raises(ValueError, match="M=4 to divide the input width of layer, got 6"):
        sparsegpt_prune(W, torch.eye(6), "2:4")
    with pytest.raises(ValueError, match="0 < N < M"):
        sparsegpt_prune(W, torch.eye(6), "4:2")


def test_sparsegpt_keeps_dtype_and_input():
    W = torch.randn(4, 8).to(torch.bfloat16)
    W0 = W.clone()
    W_new, _ = sparsegpt_prune(W, torch.eye(8) * 3, "2:4")
    assert W_new.dtype == torch.bfloat16 and torch.equal(W, W0)


def reference_sparsegpt_hessian(sequences: torch.Tensor) -> torch.Tensor:
    """Transcription of the reference code's accumulation, one calibration sequence per call (its
    batch size): ``H *= n/(n+b); n += b; X *= sqrt(2/n); H += X Xᵀ``."""
    import math

    cols = sequences.shape[-1]
    H, n = torch.zeros(cols, cols), 0
    for seq in sequences:
        inp = seq.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape(-1, cols).t().float()
        H *= n / (n + tmp)
        n += tmp
        inp = math.sqrt(2 / n) * inp
        H += inp.matmul(inp.t())
    return H


def test_sparsegpt_hessian_per_sequence_as_reference_with_dead_inputs():
    """OPT's fc2 reads a ReLU: features that never fire have H_jj = 0, get the placeholder 1, and
    the 1% damping of the mean diagonal then depends on how H is normalised. perplib's streamed
    H = 2·XᵀX / sequences equals the reference's running form, and so do the masks and weights;
    normalising by tokens (the old way) gives other unstructured masks on the same layer."""
    g = torch.Generator().manual_seed(7)
    nseq, seqlen, cols = 6, 32, 48
    X = 0.1 * torch.relu(torch.randn(nseq, seqlen, cols, generator=g))  # small activations, as fc2's
    X[..., ::3] = 0  # a third of the features never fire
    W = torch.randn(24, cols, generator=g)
    flat = X.reshape(-1, cols)
    H = hessian(flat.T @ flat, n=nseq)
    ref = reference_sparsegpt_hessian(X)
    torch.testing.assert_close(H, ref, rtol=1e-5, atol=1e-5)
    for sp in ("0.5", "2:4"):
        ours, mask = sparsegpt_prune(W, H, sp, blocksize=16)
        theirs, ref_mask = sparsegpt_prune(W, ref, sp, blocksize=16)
        assert torch.equal(mask, ref_mask), sp
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # normalising by tokens instead changes the unstructured masks of this layer
    _, per_token = sparsegpt_prune(W, hessian(flat.T @ flat, n=flat.shape[0]), "0.5", blocksize=16)
    assert not torch.equal(per_token, sparsegpt_prune(W, ref, "0.5", blocksize=16)[1])

import pytest
import torch

from perplib.sparsity import Sparsity, make_mask, nm_mask, topk_mask


@pytest.mark.parametrize(
    "spec, ratio, nm",
    [("0.5", 0.5, (0, 0)), (0.7, 0.7, (0, 0)), ("50%", 0.5, (0, 0)), ("2:4", 0.5, (2, 4)), ("4:8", 0.5, (4, 8)),
     ("1:4", 0.25, (1, 4)), (0, 0.0, (0, 0))],
)  # fmt: skip
def test_parse(spec, ratio, nm):
    s = Sparsity.parse(spec)
    assert s.ratio == pytest.approx(ratio) and (s.n, s.m) == nm


@pytest.mark.parametrize("bad", ["1", 1.0, "-0.1", "3:2", "0:4", "4:4", "a:b", "half", "2:-4", True])
def test_parse_rejects_with_message(bad):
    with pytest.raises(ValueError, match="sparsity must be"):
        Sparsity.parse(bad)


def test_topk_matrix_and_row_oracle():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])
    # per matrix, remove the 4 lowest of 8: 0.5, 1, 2, 3
    assert topk_mask(scores, 0.5).tolist() == [[True, False, False, False], [False, True, True, True]]
    # per row, remove the 2 lowest of each row
    assert topk_mask(scores, 0.5, dim=-1).tolist() == [[True, False, True, False], [False, True, True, False]]


def test_nm_oracle_and_width_check():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 9.0, 8.0, 0.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert make_mask(scores, Sparsity.parse("4:8")).tolist() == [[False, True, False, False, True, True, False, True]]
    with pytest.raises(ValueError, match="divide"):
        nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="divide"):
        Sparsity.parse("2:4").check_width(6, "q_proj")


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_topk_achieves_exact_sparsity(ratio):
    scores = torch.rand(32, 48)
    assert (~topk_mask(scores, ratio)).sum().item() == round(ratio * scores.numel())
    assert ((~topk_mask(scores, ratio, dim=-1)).sum(dim=1) == round(ratio * 48)).all()

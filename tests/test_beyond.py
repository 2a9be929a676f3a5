"""OWL allocation and block-wise reconstruction (notebook 40): exact oracles on hand-made
numbers, invariants on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from perplib.adapters import adapter_for, capture_block_inputs, run_block
from perplib.allocation import Allocation, apportion, layer_counts, outlier_ratio, owl_sparsities
from perplib.config import RunConfig
from perplib.models import tiny_model
from perplib.pruning import prune_
from perplib.reconstruct import Reconstruction, ReconstructSpec, block_loss, parse_groups, reconstruct_block_
from perplib.sparsity import Sparsity, count_mask


def test_outlier_ratio_hand_made():
    # mean of [1, 1, 1, 1, 1, 1, 1, 1, 1, 11] is 2; above 5 x 2 = 10: one of ten
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([11.0])], 5.0) == pytest.approx(0.1)
    assert outlier_ratio([torch.ones(4)], 5.0) == 0.0


def test_owl_more_outliers_less_sparsity_mean_and_bounds():
    ratios = [0.01, 0.05, 0.03, 0.03]  # scaled: 0, 1, 0.5, 0.5 (symmetric: no shrinking)
    s = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)
    assert all(abs(v - 0.7) <= 0.08 + 1e-12 for v in s)
    assert s[1] == min(s) and s[0] == max(s)  # most outliers: least pruned
    assert max(s) - min(s) == pytest.approx(0.16)  # OWL's code: the span is 2λ
    # a skewed distribution is shrunk towards the target to stay within ±λ, mean still exact
    skew = owl_sparsities([0.0, 1.0, 1.0, 1.0, 1.0], 0.5, 0.1)
    assert sum(skew) / 5 == pytest.approx(0.5, abs=1e-12)
    assert max(abs(v - 0.5) for v in skew) == pytest.approx(0.1)
    assert owl_sparsities([0.2, 0.2], 0.5, 0.1) == [0.5, 0.5]


def test_apportion_and_layer_counts_exact():
    assert apportion([1.5, 1.5, 1.0], 4, [10, 10, 10]) == [2, 1, 1]
    assert sum(apportion([0.3, 0.3, 0.4], 7, [3, 3, 3])) == 7
    # two blocks of 10 weights at 60% and 40%: quotas 6 | 2.4, 1.6 -> 6 | 2, 2 (largest remainder)
    counts = layer_counts({"a": 10, "b": 6, "c": 4}, {"a": 0, "b": 1, "c": 1}, [0.6, 0.4], 0.5)
    assert counts == {"a": 6, "b": 2, "c": 2}


def test_count_mask_exact_per_matrix_and_per_row():
    scores = torch.arange(12.0).reshape(3, 4)
    assert (~count_mask(scores, 5)).sum() == 5
    assert not count_mask(scores, 5)[0].any()  # the five smallest: row 0 and the first of row 1
    rows = count_mask(scores, 5, per_row=True)
    assert (~rows).sum(1).tolist() == [2, 2, 1]
    assert not rows[:, 0].any()  # each row drops its smallest first


def test_allocation_validation_and_nm_refused():
    with pytest.raises(ValueError, match="M .* must be > 0"):
        Allocation("owl", m=0)
    with pytest.raises(ValueError, match=r"λ"):
        Allocation("owl", lam=0.6)
    with pytest.raises(ValueError, match="nothing to allocate"):
        RunConfig(prune="wanda", sparsity="2:4", allocation="owl")
    with pytest.raises(ValueError, match="calibration data"):
        Allocation("owl").check(Sparsity.parse(0.5), "magnitude", calibrated=False)


def test_new_fields_keep_old_record_keys():
    from perplib.results import config_key

    old = {k: v for k, v in RunConfig().key_view().items()}
    assert "allocation" not in old and "reconstruct" not in old
    assert config_key(RunConfig(allocation="owl", prune="wanda")) != config_key(RunConfig(prune="wanda"))


def _calib(n=4, seqlen=16, vocab=128):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_owl_prune_exact_total_and_record(method):
    model = tiny_model("llama")
    report = prune_(model, method, 0.6, _calib(), device="cpu", allocation=Allocation("owl", m=3.0, lam=0.1))
    assert report.pruned == round(0.6 * report.prunable)
    info = report.allocation
    assert len(info["ratios"]) == len(info["targets"]) == len(info["achieved"]) == len(adapter_for(model).blocks(model))
    assert sum(info["targets"]) / len(info["targets"]) == pytest.approx(0.6)
    assert all(abs(a - t) < 0.01 for a, t in zip(info["achieved"], info["targets"], strict=True))
    assert info["m"] == 3.0 and info["lam"] == 0.1


def test_owl_magnitude_without_calibration_refused():
    with pytest.raises(ValueError, match="calibration data"):
        prune_(tiny_model("llama"), "magnitude", 0.5, None, allocation="owl")


@pytest.mark.parametrize("groups", ["weights", "norms+lora", "biases+weights"])
def test_reconstruction_lowers_block_error_and_keeps_zeros(groups):
    family = "opt" if "biases" in groups else "llama"
    torch.manual_seed(0)
    dense = tiny_model(family)
    model = tiny_model(family)
    prune_(model, "magnitude", 0.6, device="cpu")
    block = adapter_for(model).blocks(model)[0]
    inputs = capture_block_inputs(dense, [_calib()], "cpu")
    targets = [run_block(adapter_for(dense).blocks(dense)[0], i).detach() for i in inputs]
    zeros = {n: m.weight == 0 for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    before = block_loss(block, inputs, targets)
    with torch.no_grad():
        reconstruct_block_(block, inputs, targets, ReconstructSpec(parse_groups(groups), steps=20, lr=1e-3))
    assert block_loss(block, inputs, targets) < before
    for n, m in block.named_modules():
        if n in zeros:
            assert type(m) is nn.Linear  # LoRA merged away
            assert (m.weight[zeros[n]] == 0).all()


def test_reconstruction_hook_in_the_driver():
    model = tiny_model("llama")
    hook = Reconstruction(ReconstructSpec(("weights",), steps=2, lr=1e-3))
    report = prune_(model, "wanda", 0.5, _calib(), device="cpu", hooks=[hook])
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert len(hook.summary()["loss_last"]) == len(adapter_for(model).blocks(model))
    assert "hooks" in report.timings


def test_spec_validation():
    with pytest.raises(ValueError, match="groups from"):
        parse_groups("weights+heads")
    with pytest.raises(ValueError, match="steps"):
        ReconstructSpec(("weights",), steps=0)
    with pytest.raises(ValueError, match="needs a prune method"):
        RunConfig(reconstruct="weights")

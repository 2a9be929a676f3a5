"""Vision track: pruning, retraining parameter sets, masked conv LoRA, schedules, freezing, data.

Tiny models and tensors only; the end-to-end runs live in test_vision_e2e.py.
"""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perplib.lora import LoraSpec
from perplib.vision import data as vdata
from perplib.vision.artefacts import PAPER_TABLE12, resnet50_table12_shares
from perplib.vision.freezing import GradualFreezer, cycle_sparsities, layer_units, schedule_shares, trainable_flags
from perplib.vision.lora import MaskedLoRAConv, add_conv_lora_, merge_conv_lora_
from perplib.vision.models import build_model
from perplib.vision.pruning import (
    compute_masks,
    erk_densities,
    lamp_scores,
    layer_ratios,
    model_sparsity,
    prunable_weights,
    prune_,
    relative_change,
)
from perplib.vision.retrain import (
    METHODS,
    check_method,
    prepare_,
    recalibrate_bn_,
    train_epochs_,
    trainable_names,
)
from perplib.vision.schedules import allr_factor, final_pretrain_lr, pretrain_lr, retrain_lr


def tiny_resnet(seed: int = 0) -> nn.Module:
    model = build_model("resnet-tiny", num_classes=3, in_channels=1, image_size=8, seed=seed)
    # non-trivial BN parameters and statistics, so "untouched" checks can fail
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return model


def tiny_data(n: int = 24, seed: int = 0) -> vdata.VisionData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return vdata.VisionData("toy", (x, y), (x[:4], y[:4]), (x[:8], y[:8]), 3, 1, 8)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- pruning


def test_global_magnitude_oracle():
    weights = {"a.weight": torch.tensor([[0.1, -2.0], [3.0, 0.2]]), "b.weight": torch.tensor([[-0.3, 0.05, 1.0]])}
    masks = compute_masks(weights, 0.5, "global")
    # the 3 smallest |w| of all 7 (0.05, 0.1, 0.2) go, wherever they are (round(3.5) = 4 -> also 0.3)
    assert masks["a.weight"].tolist() == [[False, True], [True, False]]
    assert masks["b.weight"].tolist() == [[False, False, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 0.99])
def test_global_pruning_exact_and_leaves_biases_and_bn(sparsity):
    model = tiny_resnet()
    before = snapshot(model)
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    masks = prune_(model, sparsity, "global")
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(model).values())
    assert zeros == round(sparsity * total)
    assert sum(int((~m).sum()) for m in masks.values()) == zeros
    after = snapshot(model)
    for k, v in before.items():
        if k not in weights:  # biases, BN parameters and statistics
            assert torch.equal(v, after[k]), k
    assert "fc.weight" in weights and not any("bn" in k or k.endswith("bias") for k in weights)


def test_pruning_keeps_earlier_zeros_and_hits_new_target():
    model = tiny_resnet()
    first = prune_(model, 0.5)
    second = prune_(model, 0.8, "global", masks=first)
    for k in first:
        assert not (second[k] & ~first[k]).any(), "a weight pruned in cycle 1 came back"
    assert model_sparsity(model) == pytest.approx(0.8, abs=1e-4)


def test_layerwise_allocations():
    model = tiny_resnet()
    shapes = {k: w.shape for k, w in prunable_weights(model).items()}
    numel = {k: s.numel() for k, s in shapes.items()}
    total = sum(numel.values())
    uniform = layer_ratios(shapes, 0.7, "uniform")
    assert set(uniform.values()) == {0.7}
    plus = layer_ratios(shapes, 0.7, "uniform+")
    first, last = list(shapes)[0], list(shapes)[-1]
    assert plus[first] == 0.0 and plus[last] == pytest.approx(0.7)  # <= 80% cap not binding at 70%
    assert sum(plus[k] * numel[k] for k in shapes) == pytest.approx(0.7 * total)
    plus95 = layer_ratios(shapes, 0.95, "uniform+")
    assert plus95[last] == 0.8 and sum(plus95[k] * numel[k] for k in shapes) == pytest.approx(0.95 * total)
    erk = erk_densities(shapes, 0.3)
    assert sum(erk[k] * numel[k] for k in shapes) == pytest.approx(0.3 * total)
    assert all(0 < d <= 1 for d in erk.values())
    # ERK: density proportional to sum(shape)/prod(shape) among layers that are not dense
    free = [k for k in shapes if erk[k] < 1]
    ratio = {k: erk[k] * numel[k] / sum(shapes[k]) for k in free}
    assert max(ratio.values()) == pytest.approx(min(ratio.values()))
    for alloc in ("uniform", "uniform+", "erk", "lamp"):
        m = tiny_resnet()
        prune_(m, 0.6, alloc)
        assert model_sparsity(m) == pytest.approx(0.6, abs=0.01), alloc


def test_lamp_scores_oracle():
    w = torch.tensor([1.0, -3.0, 2.0])
    # sorted squares 1, 4, 9: scores 1/14, 4/13, 9/9
    assert torch.allclose(lamp_scores(w), torch.tensor([1 / 14, 1.0, 4 / 13]))


def test_bad_sparsity_rejected():
    model = tiny_resnet()
    for bad in (1.0, 1.5, -0.1, "2:4"):
        with pytest.raises(ValueError, match="sparsity|N:M"):
            prune_(model, bad)


# ---------------------------------------------------------------- retraining parameter sets


def test_recalibration_changes_only_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 3))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = tiny_data(16)
    x = data.train[0]
    recalibrate_bn_(model, [(x[:10], None), (x[10:], None)])
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    conv_out = model[0](x).detach()
    bn = model[1]
    # cumulative average of per-batch statistics, weighted equally per batch (momentum None)
    means = [conv_out[:10].mean(dim=(0, 2, 3)), conv_out[10:].mean(dim=(0, 2, 3))]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, atol=1e-6)
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 2


def test_batchnorm_methods_need_batchnorm():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))
    for method in ("bn-recalibrate", "bn-parameters"):
        with pytest.raises(ValueError, match="needs BatchNorm"):
            check_method(method, mlp)
    with pytest.raises(ValueError, match="needs BatchNorm"):
        recalibrate_bn_(mlp, [(torch.zeros(2, 1, 8, 8), None)])
    with pytest.raises(ValueError, match="retrain method must be one of"):
        check_method("everything")


EXPECTED = {
    "biases": lambda n: n == "fc.bias",
    "bn-parameters": lambda n: n == "fc.bias" or ".bn" in n or n.startswith("bn") or ".downsample.1." in n,
    "linear-probing": lambda n: n.startswith("fc.") or ".bn" in n or n.startswith("bn") or ".downsample.1." in n,
}


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("none", "bn-recalibrate")])
def test_each_method_trains_only_its_parameters_and_keeps_zeros(method):
    model = tiny_resnet()
    masks = prune_(model, 0.7)
    prepare_(model, method, LoraSpec(rank=2, alpha=2.0))
    trainable = trainable_names(model, method)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    if method in EXPECTED:
        assert trainable == {n for n, _ in model.named_parameters() if EXPECTED[method](n)}
    if method == "perp":
        lora = {n for n in trainable if ".lora_" in n}
        convs = [n for n, m in model.named_modules() if isinstance(m, MaskedLoRAConv)]
        assert lora and len(convs) == sum(isinstance(m, nn.Conv2d) for m in tiny_resnet().modules())
        assert trainable - lora == trainable_names(model, "linear-probing")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epochs_(model, tiny_data(), epochs=1, lr_fn=lambda t: 0.5, batch_size=8, masks=masks)
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"{method} changed frozen {n}"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)
    merge_conv_lora_(model)
    for k, w in prunable_weights(model).items():
        assert not w[~masks[k]].any(), f"{method}: pruned weights of {k} became non-zero"


# ---------------------------------------------------------------- masked conv LoRA


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True),
    nn.Conv2d(4, 6, 1, bias=False),
    nn.Linear(12, 5),
])  # fmt: skip
def test_masked_conv_lora_merge_equals_unmerged_and_keeps_zeros(layer):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0
    zeros = layer.weight == 0
    original = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    add_conv_lora_(model, LoraSpec(rank=3, alpha=6.0, init="random"))
    wrapper = model[0]
    assert wrapper.get_delta_weight().abs().sum() > 0, "adapters must be non-zero for the test to bite"
    x = torch.randn(2, 4, 7, 7) if isinstance(layer, nn.Conv2d) else torch.randn(2, 12)
    unmerged = model(x)
    wrapper.merge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    wrapper.unmerge()
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    merge_conv_lora_(model)
    assert model[0] is layer and torch.allclose(model(x), unmerged, atol=1e-5)
    assert zeros.any() and bool((layer.weight[zeros] == 0).all()), "merging filled pruned weights"
    assert not torch.allclose(layer.weight[~zeros], original[~zeros]), "the merge changed nothing"


def test_plain_lora_merge_into_pruned_layer_refused():
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 0
    model = nn.Sequential(conv)
    add_conv_lora_(model, LoraSpec(kind="plain", rank=1, alpha=1.0))
    with pytest.raises(ValueError, match="fill its zeros"):
        merge_conv_lora_(model)


def _oracle_kernel(weight, a, b, mask, scaling):
    """The adapted kernel entry by entry: W[o,i,p,q] + M[o,i,p,q] s sum_r B[o,r] A[r, (i,p,q)]."""
    c_out, c_in, kh, kw = weight.shape
    rows = []
    for o in range(c_out):
        entries = []
        for i in range(c_in):
            for p in range(kh):
                for q in range(kw):
                    col = (i * kh + p) * kw + q
                    update = sum(b[o, r] * a[r, col] for r in range(a.shape[0]))
                    entries.append(weight[o, i, p, q] + mask[o, i, p, q] * scaling * update)
        rows.append(torch.stack(entries))
    return torch.stack(rows).view(c_out, c_in, kh, kw)


@pytest.mark.parametrize("kind", ["masked", "plain"])
def test_conv_lora_matches_f_conv2d_oracle(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) > 0.5).float())
    layer = MaskedLoRAConv(conv, LoraSpec(kind=kind, rank=2, alpha=5.0, init="random"))
    x = torch.randn(2, 3, 7, 7, requires_grad=True)
    g = torch.randn(2, 4, 4, 4)
    (layer(x) * g).sum().backward()
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    bias = conv.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    mask = (conv.weight != 0).float() if kind == "masked" else torch.ones_like(conv.weight)
    y2 = F.conv2d(x2, _oracle_kernel(conv.weight.detach(), a, b, mask, 2.5), bias, stride=2, padding=1)
    (y2 * g).sum().backward()
    assert torch.allclose(layer(x), y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(layer.lora_A.grad, a.grad, atol=1e-5)
    assert torch.allclose(layer.lora_B.grad, b.grad, atol=1e-5)
    assert torch.allclose(conv.bias.grad, bias.grad, atol=1e-5)
    assert conv.weight.grad is None


def test_conv_lora_backward_keeps_no_weight_sized_tensor():
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    layer = MaskedLoRAConv(conv, LoraSpec(kind="masked", rank=2, alpha=2.0))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    existing = {conv.weight.data_ptr(), layer.lora_mask.data_ptr()}
    sized = [t for t in saved if t is not None and t.numel() >= conv.weight.numel()]
    assert all(t.data_ptr() in existing or t.data_ptr() == x.data_ptr() for t in sized), \
        [tuple(t.shape) for t in sized]  # fmt: skip


# ---------------------------------------------------------------- schedules


def test_allr_factor_and_schedules():
    # random pruning of a fraction s changes the norm by about sqrt(s): d1 = 1
    assert allr_factor(math.sqrt(0.5), 0.5, 1, 90) == pytest.approx(1.0)
    assert allr_factor(0.1, 0.25, 1, 90) == pytest.approx(0.2)
    assert allr_factor(0.01, 0.25, 45, 90) == pytest.approx(0.5)  # retraining length dominates
    assert pretrain_lr(45, 0.1, 90) == pytest.approx(0.05)
    allr = retrain_lr("allr", lr_max=0.1, pretrain_epochs=90, retrain_epochs=2, allr_d=0.5, warmup=0.0)
    assert allr(0) == pytest.approx(0.05) and allr(1) == pytest.approx(0.025) and allr(2) == pytest.approx(0.0)
    # half-cosine warmup over 10% (the default): half the end value halfway, the schedule after it
    warm = retrain_lr("allr", lr_max=0.1, pretrain_epochs=90, retrain_epochs=2, allr_d=0.5)
    end = 0.05 * (1 - 0.2 / 2)
    assert warm(0.1) == pytest.approx(0.5 * end) and warm(0.2) == pytest.approx(end) and warm(1) == pytest.approx(0.025)
    assert warm(0.05) == pytest.approx(end * 0.5 * (1 - math.cos(math.pi / 4)))
    # FT: the final rate of pretraining (its last step, at fractional epoch T - 0.5/steps)
    assert final_pretrain_lr(0.1, 10, 4) == pytest.approx(0.1 * 0.125 / 10)
    ft = retrain_lr("ft", lr_max=0.1, pretrain_epochs=10, retrain_epochs=3, ft_lr=final_pretrain_lr(0.1, 10, 4))
    assert ft(0) == ft(2.5) == pytest.approx(0.00125)
    lrw = retrain_lr("lrw", lr_max=0.1, pretrain_epochs=10, retrain_epochs=2)
    assert lrw(0) == pytest.approx(0.02) and lrw(1) == pytest.approx(0.01)
    clr = retrain_lr("clr", lr_max=0.1, pretrain_epochs=10, retrain_epochs=2, warmup=0.0)
    assert clr(1) == pytest.approx(0.05)
    llr = retrain_lr("llr", lr_max=0.1, pretrain_epochs=10, retrain_epochs=2, warmup=0.0)
    slr = retrain_lr("slr", lr_max=0.1, pretrain_epochs=10, retrain_epochs=2, warmup=0.0)
    assert llr(0.5) == pytest.approx(0.075) == pytest.approx(slr(0.5))  # a compressed linear schedule is linear
    with pytest.raises(ValueError, match="schedule must be one of"):
        retrain_lr("step", lr_max=0.1, pretrain_epochs=10, retrain_epochs=2)


def test_relative_change_oracle():
    before = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([[0.0, 12.0]])}
    after = {"a": torch.tensor([0.0, 4.0]), "b": torch.tensor([[0.0, 12.0]])}
    assert relative_change(before, after) == pytest.approx(3 / 13)  # ||(3,0,0,0)|| / ||(3,4,0,12)||
    assert relative_change(before, before) == 0.0


def test_erk_make_dense_branch():
    # a 2x2 layer has raw density 1, a 100x100 one 0.02: at density 0.9 the small layer would exceed 1
    shapes = {"small": torch.Size([2, 2]), "big": torch.Size([100, 100])}
    dens = erk_densities(shapes, 0.9)
    assert dens["small"] == 1.0
    assert dens["big"] == pytest.approx((0.9 * 10004 - 4) / 10000)
    assert dens["small"] * 4 + dens["big"] * 10000 == pytest.approx(0.9 * 10004)
    # without the branch (low density) both follow eps * raw
    low = erk_densities(shapes, 0.01)
    assert low["small"] / low["big"] == pytest.approx(1.0 / 0.02)


# ---------------------------------------------------------------- freezing


def test_trainable_flags_oracle():
    # 4 units, 2 epochs: floor(4 (e+1) / 2) = 2, 4 units switched
    assert trainable_flags(4, 0, 2, unfreeze=False, reverse=False) == [False, False, True, True]
    assert trainable_flags(4, 1, 2, unfreeze=False, reverse=False) == [False] * 4
    assert trainable_flags(4, 0, 2, unfreeze=False, reverse=True) == [True, True, False, False]
    assert trainable_flags(4, 0, 2, unfreeze=True, reverse=False) == [True, True, False, False]
    assert trainable_flags(4, 0, 2, unfreeze=True, reverse=True) == [False, False, True, True]
    assert trainable_flags(4, 1, 2, unfreeze=True, reverse=True) == [True] * 4
    assert trainable_flags(5, 0, 3, unfreeze=True, reverse=False) == [True, False, False, False, False]
    assert trainable_flags(5, 1, 3, unfreeze=True, reverse=False) == [True, True, True, False, False]
    # shares by hand: units of 1, 2, 3 parameters, 4 always trained, 3 epochs
    shares = schedule_shares([1, 2, 3], 4, 3, unfreeze=True, reverse=False)
    assert shares == pytest.approx([5 / 10, 7 / 10, 10 / 10])
    shares = schedule_shares([1, 2, 3], 4, 3, unfreeze=False, reverse=True)
    assert shares == pytest.approx([7 / 10, 5 / 10, 4 / 10])
    assert cycle_sparsities(0.9, 2) == pytest.approx([1 - 0.1**0.5, 0.9])


def test_table12_shares_of_resnet50_match_the_paper():
    # torchvision's ResNet-50 on the meta device, five epochs per phase (paper, Table 12)
    shares = resnet50_table12_shares(5)
    assert shares == pytest.approx(PAPER_TABLE12, abs=0.01)
    assert shares[("✓", "✓")] == pytest.approx(88.83, abs=0.005) and shares[("✗", "✓")] == pytest.approx(
        19.40, abs=0.005
    )


def test_gradual_freezing_freezes_expected_layers_each_epoch():
    model = tiny_resnet()
    units = layer_units(model)
    assert units[0][0] == "conv1" and all(isinstance(model.get_submodule(n), nn.Conv2d) for n, _ in units)
    freezer = GradualFreezer(model, 3, unfreeze=False, reverse=False)
    states = []

    def on_epoch(epoch: int) -> None:
        freezer(epoch)
        states.append((epoch, snapshot(model)))

    train_epochs_(model, tiny_data(), epochs=3, lr_fn=lambda t: 0.5, batch_size=8, on_epoch=on_epoch)
    states.append((3, snapshot(model)))
    for (epoch, before), (_, after) in zip(states, states[1:], strict=False):
        flags = freezer.flags(epoch)
        assert sum(not f for f in flags) == len(units) * (epoch + 1) // 3
        for flag, (name, _) in zip(flags, units, strict=True):
            if not flag:
                assert torch.equal(before[f"{name}.weight"], after[f"{name}.weight"]), f"epoch {epoch}: frozen {name}"
        # BatchNorm and the head always train
        assert not torch.equal(before["fc.weight"], after["fc.weight"])
        assert not torch.equal(before["bn1.weight"], after["bn1.weight"])
    total = sum(p.numel() for p in model.parameters())
    assert freezer.total == total and freezer.shares[0] > freezer.shares[1] > freezer.shares[2]
    conv = sum(p.numel() for _, ps in units for p in ps)
    assert freezer.shares[2] == pytest.approx((total - conv) / total)


# ---------------------------------------------------------------- data


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_fashion_mnist_folder(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 50))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    assert vdata.read_idx(tmp_path / "train-labels-idx1-ubyte.gz").shape == (50,)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        vdata.load_vision_data("fashion-mnist", str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 19))
    with pytest.raises(ValueError, match="malformed"):
        vdata.load_vision_data("fashion-mnist", str(tmp_path))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    d = vdata.load_vision_data("fashion-mnist", str(tmp_path))
    assert (d.size("train"), d.size("val"), d.size("test")) == (45, 5, 20)
    assert d.train[0].shape[1:] == (1, 28, 28) and d.image_size == 28
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="magic"):
        vdata.read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vdata.load_vision_data("fashion-mnist", str(tmp_path / "missing"))


def test_digits_split_is_seeded_and_holds_out_ten_percent():
    a = vdata.load_vision_data("digits", seed=0)
    b = vdata.load_vision_data("digits", seed=0)
    n = a.size("train") + a.size("val")
    assert a.size("val") == round(0.1 * n)
    assert torch.equal(a.val[1], b.val[1]) and torch.equal(a.train[0], b.train[0])
    c = vdata.load_vision_data("digits", seed=1)
    assert not torch.equal(a.val[1], c.val[1])
    assert a.size("test") == round(0.2 * 1797) and a.num_classes == 10


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a root"):
        vdata.load_vision_data("imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vdata.load_vision_data("imagenet", str(tmp_path / "nope"))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match="has no classes"):
        vdata.load_vision_data("imagenet", str(tmp_path))


def test_image_folder_loads(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / split / cls / f"{i}.png")
    d = vdata.load_vision_data("imagenet", str(tmp_path), seed=0)
    assert d.num_classes == 2 and (d.size("train"), d.size("val"), d.size("test")) == (9, 1, 10)
    x, y = next(d.batches("train", 4, shuffle=True))
    assert x.shape == (4, 3, 224, 224) and y.dtype == torch.long


def test_fallback_says_so(tmp_path):
    with pytest.warns(UserWarning, match="falling back to 'digits'"):
        assert vdata.available("fashion-mnist", root=str(tmp_path / "none")) == "digits"
    assert vdata.available("fashion-mnist", root=str(tmp_path)) == "fashion-mnist"

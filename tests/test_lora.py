"""LoRA on pruned layers: exact oracles on tiny tensors, invariants on tiny random LLaMA / OPT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from perplib import lora
from perplib.adapters import adapter_for
from perplib.models import tiny_model

FAMILIES = ("llama", "opt")
KINDS = ("masked", "plain")


def magnitude_prune_(model: nn.Module, ratio: float = 0.5) -> None:
    """Zero the smallest weights of every prunable layer (test helper, independent of perplib.pruning)."""
    for module in adapter_for(model).prunable(model).values():
        w = module.weight.data
        k = int(ratio * w.numel())
        w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0.0


def pruned(family: str, ratio: float = 0.5) -> nn.Module:
    model = tiny_model(family)
    magnitude_prune_(model, ratio)
    return model


def targets(model: nn.Module, head: bool = True) -> list[str]:
    names = list(adapter_for(model).prunable(model))
    return names + (["lm_head"] if head else [])


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# --- the math ---------------------------------------------------------------------------------


def test_spec_validates_with_messages():
    with pytest.raises(ValueError, match="LoRA kind must be one of"):
        lora.LoraSpec(kind="dense")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        lora.LoraSpec(rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lora.LoraSpec(alpha=0)
    with pytest.raises(ValueError, match="masked LoRA .* dropout"):
        lora.LoraSpec(kind="masked", dropout=0.1)
    assert lora.LoraSpec(rank=8, alpha=32).scaling == 4.0
    peft_config = lora.LoraSpec(kind="plain", rank=4, alpha=8).to_peft(["b", "a"])
    assert peft_config.r == 4 and peft_config.lora_alpha == 8 and sorted(peft_config.target_modules) == ["a", "b"]


def test_masked_delta_oracle():
    a = torch.tensor([[1.0, 2.0, 0.0]])  # r=1, in=3
    b = torch.tensor([[1.0], [-1.0]])  # out=2
    mask = torch.tensor([[True, False, True], [False, True, True]])
    expected = torch.tensor([[2.0, 0.0, 0.0], [0.0, -4.0, 0.0]])
    assert torch.equal(lora.masked_delta(a, b, mask, 2.0), expected)
    assert torch.equal(lora.masked_delta(a, b, None, 1.0), b @ a)


def test_masked_function_matches_dense_autograd():
    """Forward and every gradient of the custom backward equal autograd of x(W + M⊙sBA)ᵀ + b."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.5
    w = w * mask
    a0, b0 = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    bias0 = torch.randn(5, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)

    def run(fn):
        x, a, b, bias = (t.clone().requires_grad_() for t in (x0, a0, b0, bias0))
        out = fn(x, a, b, bias)
        out.backward(upstream)
        return out.detach(), x.grad, a.grad, b.grad, bias.grad

    ours = run(lambda x, a, b, bias: lora.masked_lora_linear(x, w, bias, a, b, mask, 1.5))
    ref = run(lambda x, a, b, bias: x @ (w + mask * (1.5 * b @ a)).t() + bias)
    for mine, theirs in zip(ours, ref, strict=True):
        torch.testing.assert_close(mine, theirs)
    # the masked entries of the effective weight get no update: dA, dB see only M ⊙ (gᵀx)
    gw = upstream.reshape(-1, 5).t() @ x0.reshape(-1, 7)
    torch.testing.assert_close(ours[3], 1.5 * (gw * mask) @ a0.t())


def _small_update_case(out=96, inp=256, tokens=256):
    """A half-pruned bf16-exact W with |W| in [1, 2) (one binade: spacing 2⁻⁷), and rank-1 A, B of
    ±1 entries with s = 2⁻¹⁰: every entry of the update M ⊙ sBA is ±2⁻¹⁰, below half the spacing,
    so bf16(W + M ⊙ sBA) = W exactly."""
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(out, inp, generator=g) > 0.5
    w = (torch.randn(out, inp, generator=g).sign() * (1 + torch.rand(out, inp, generator=g)) * mask).bfloat16().float()
    a, b = torch.randn(1, inp, generator=g).sign(), torch.randn(out, 1, generator=g).sign()
    x = torch.randn(2, tokens // 2, inp, generator=g)
    return x, w, mask, a, b, 2.0**-10


def _slope(change: torch.Tensor, reference: torch.Tensor) -> float:
    """Least-squares slope of an output change on the fp32 output change (1: the update fully arrives)."""
    change, reference = change.double().flatten(), reference.double().flatten()
    return float((change @ reference) / (reference @ reference))


@pytest.mark.parametrize("autocast", [False, True])
def test_masked_small_update_reaches_the_output_in_bf16(autocast):
    """An update of ~2⁻¹⁰·|W| changes the bf16 output as it changes the fp32 one; bf16(W + M⊙sBA)
    would round it away entirely (the oracle below shows that form gives ~0)."""
    x, w, mask, a, b, s = _small_update_case()
    fp32 = lora.masked_lora_linear(x, w, None, a, b, mask, s) - x @ w.t()  # the change in fp32
    xh, wh = (x, w) if autocast else (x.bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with_update = lora.masked_lora_linear(xh, wh, None, a, b, mask, s)
        without = lora.masked_lora_linear(xh, wh, None, a, torch.zeros_like(b), mask, s)
    assert with_update.dtype == torch.bfloat16
    assert 0.9 < _slope(with_update - without, fp32) < 1.1
    rounded = torch.nn.functional.linear(xh.bfloat16(), (wh.float() + s * (b @ a) * mask).bfloat16())
    assert torch.equal(rounded, xh.bfloat16() @ wh.bfloat16().t())  # the form this replaces loses it all


def test_masked_bf16_gradients_match_fp64():
    x0, w, mask, a0, b0, s = _small_update_case(out=32, inp=48, tokens=16)
    s = 0.5  # an ordinary update size: gradients, not rounding, are under test here
    bias = torch.randn(32)
    upstream = torch.randn(2, 8, 32)

    def run(dtype):
        x, a, b = (t.clone().to(dtype if t is x0 else torch.float32).requires_grad_() for t in (x0, a0, b0))
        out = lora.masked_lora_linear(x, w.to(dtype), bias.to(dtype), a, b, mask, s)
        out.backward(upstream.to(dtype))
        return [t.double() for t in (out.detach(), x.grad, a.grad, b.grad)]

    for mine, ref in zip(run(torch.bfloat16), run(torch.float64), strict=True):
        torch.testing.assert_close(mine, ref, rtol=3e-2, atol=3e-2 * float(ref.abs().mean()))


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_merge_in_bf16_keeps_every_zero(family):
    model = pruned(family).to(torch.bfloat16)
    zeros = {n: m.weight == 0 for n, m in adapter_for(model).prunable(model).items()}
    torch.manual_seed(0)
    lora.add_lora_(model, lora.LoraSpec(kind="masked", rank=2, init="random"), targets(model), unmasked=["lm_head"])
    with torch.no_grad():
        unmerged = model(IDS).logits
    lora.merge_(model)
    for name, module in adapter_for(model).prunable(model).items():
        # every zero stays (a kept weight may round to 0 in bf16 when the update cancels it)
        assert module.weight.dtype == torch.bfloat16 and bool((module.weight[zeros[name]] == 0).all()), name
    with torch.no_grad():
        assert model(IDS).logits.isfinite().all() and unmerged.isfinite().all()


# --- layers on tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_layers_are_peft_layers_with_masks(family):
    model = pruned(family)
    names = targets(model)
    layers = lora.add_lora_(model, lora.LoraSpec(kind="masked", rank=2, alpha=4), names, unmasked=["lm_head"])
    assert set(layers) == set(names)
    for name, layer in layers.items():
        assert isinstance(layer, lora.MaskedLoraLinear) and isinstance(layer, lora.LoraLayer)
        if name == "lm_head":
            assert layer.lora_mask is None  # dense head: peft's own forward
        else:
            assert torch.equal(layer.lora_mask, layer.base_layer.weight != 0)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: starts at the pruned model


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_keeps_outputs(family):
    model = pruned(family)
    with torch.no_grad():
        ref = model(IDS).logits
    lora.add_lora_(model, lora.LoraSpec(kind="masked", rank=2), targets(model))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_unmerged_and_keeps_zeros(family, kind):
    model = pruned(family)
    zeros = {n: m.weight == 0 for n, m in adapter_for(model).prunable(model).items()}
    torch.manual_seed(0)
    layers = lora.add_lora_(
        model, lora.LoraSpec(kind=kind, rank=3, alpha=6, init="random"), targets(model), unmasked=["lm_head"]
    )
    assert all(torch.count_nonzero(m.lora_B["default"].weight) > 0 for m in layers.values())
    embedding = model.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        unmerged = model(IDS).logits
    assert not torch.allclose(unmerged, pruned(family)(IDS).logits, atol=1e-3)  # the adapters act
    if kind == "plain":
        with pytest.raises(ValueError, match="would fill the zeros"):
            lora.merge_(model)
    merged_names = lora.merge_(model, allow_dense=kind == "plain")
    assert set(merged_names) == set(layers) and not lora.lora_layers(model)
    with torch.no_grad():
        merged = model(IDS).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # tied head was untied first
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    for name, module in adapter_for(model).prunable(model).items():
        assert type(module) is nn.Linear
        if kind == "masked":
            assert torch.equal(module.weight == 0, zeros[name]), name  # exactly the same zeros
        else:
            assert int((module.weight == 0).sum()) < int(zeros[name].sum())  # plain merge densifies


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_restores_the_base(kind):
    model = pruned("llama")
    torch.manual_seed(0)
    layers = lora.add_lora_(model, lora.LoraSpec(kind=kind, rank=2, init="random"), targets(model, head=False))
    layer = layers["model.layers.0.mlp.up_proj"]
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before)
    if kind == "masked":
        assert torch.equal(layer.base_layer.weight == 0, before == 0)


def test_lora_parameter_count_by_hand():
    model = pruned("llama")
    lora.add_lora_(model, lora.LoraSpec(rank=4), targets(model))
    # per block: q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->128, down 128->64
    per_block = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert lora.lora_parameter_count(model) == 2 * per_block + 4 * (64 + 128)
    assert lora.lora_parameter_count(model, ["lm_head"]) == 4 * (64 + 128)


def test_add_lora_rejects_bad_targets():
    model = pruned("llama")
    with pytest.raises(ValueError, match="must name nn.Linear"):
        lora.add_lora_(model, lora.LoraSpec(), ["model.norm"])
    with pytest.raises(ValueError, match="unmasked layers must be among the targets"):
        lora.add_lora_(model, lora.LoraSpec(), ["lm_head"], unmasked=["model.layers.0.mlp.up_proj"])
    lora.add_lora_(model, lora.LoraSpec(), ["lm_head"])
    with pytest.raises(ValueError, match="already carries LoRA"):
        lora.add_lora_(model, lora.LoraSpec(), ["lm_head"])


# --- saving -------------------------------------------------------------------------------------


def test_save_masked_merged_is_a_plain_sparse_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = pruned("opt")
    torch.manual_seed(0)
    lora.add_lora_(model, lora.LoraSpec(kind="masked", rank=2, init="random"), targets(model))
    with pytest.raises(ValueError, match="call merge_\\(\\) first"):
        lora.save_pretrained(model, tmp_path / "unmerged")
    lora.merge_(model)
    written = lora.save_pretrained(model, tmp_path / "m")
    assert "adapter" not in written and not (tmp_path / "m" / "adapter").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("lora" in k or "base_layer" in k for k in loaded.state_dict())
    for (name, mine), theirs in zip(
        adapter_for(model).prunable(model).items(), adapter_for(loaded).prunable(loaded).values(), strict=True
    ):
        assert torch.equal(mine.weight, theirs.weight), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


def test_save_plain_writes_sparse_base_and_peft_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = pruned("llama")
    zeros = sum(int((m.weight == 0).sum()) for m in adapter_for(model).prunable(model).values())
    torch.manual_seed(0)
    names = targets(model)
    lora.add_lora_(model, lora.LoraSpec(kind="plain", rank=2, init="random"), names)
    with torch.no_grad():
        expected = model(IDS).logits
    written = lora.save_pretrained(model, tmp_path / "p")
    assert set(json.loads((written["adapter"] / "adapter_config.json").read_text())["target_modules"]) == set(names)
    assert lora.lora_layers(model)  # the live model keeps its adapters
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert not any("lora" in k or "base_layer" in k for k in base.state_dict())
    assert sum(int((m.weight == 0).sum()) for m in adapter_for(base).prunable(base).values()) == zeros
    restored = PeftModel.from_pretrained(base, written["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(IDS).logits, expected)


# --- plain LoRA's fused node against peft's own layer -----------------------------------------


def _peft_pair(base: nn.Module, fan_in_fan_out: bool, rank: int = 3, alpha: float = 6.0, cls=None):
    """(ours, peft's) LoRA layers on copies of ``base`` with the same random A and B."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    g = torch.Generator().manual_seed(5)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out)
    kwargs = {"config": config, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0}
    ours = (cls or lora.PlainLoraLinear)(copy.deepcopy(base), "default", **kwargs)
    theirs = PeftLinear(copy.deepcopy(base), "default", **kwargs)
    for layer in (ours, theirs):
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
        g = torch.Generator().manual_seed(5)
    return ours, theirs


@pytest.mark.parametrize("layer_kind", ["linear", "linear-nobias", "conv1d", "masked-dense"])
@pytest.mark.parametrize("base_trains", [False, True])
def test_plain_fused_node_matches_peft_layer(layer_kind, base_trains):
    """Output and every gradient (x, A, B, bias, and W when it trains) equal peft's lora.Linear;
    ``masked-dense``: a masked layer without a mask (the head) runs the same fused node."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    if layer_kind == "conv1d":
        base = Conv1D(6, 7)  # in 7, out 6, weight stored in x out
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(7, 6, bias=layer_kind != "linear-nobias")
    with torch.no_grad():
        base.weight.mul_(torch.rand(base.weight.shape) > 0.5)  # pruned
    cls = lora.MaskedLoraLinear if layer_kind == "masked-dense" else None
    ours, theirs = _peft_pair(base, fan_in_fan_out=layer_kind == "conv1d", cls=cls)
    if cls is not None:
        ours.set_mask_(dense=True)
    x0 = torch.randn(2, 5, 7)
    upstream = torch.randn(2, 5, 6)
    results = []
    for layer in (ours, theirs):
        for name, p in layer.named_parameters():
            p.requires_grad_("lora_" in name or base_trains or name.endswith("bias"))
        x = x0.clone().requires_grad_()
        out = layer(x)
        out.backward(upstream)
        grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        results.append((out.detach(), x.grad, grads))
    assert ours(x0).grad_fn.name().startswith("_PlainLoraLinearFn")  # the fused path ran
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-6)
    assert results[0][2].keys() == results[1][2].keys()
    assert ("base_layer.weight" in results[0][2]) == base_trains
    for name in results[0][2]:
        torch.testing.assert_close(results[0][2][name], results[1][2][name], atol=1e-6, rtol=1e-6, msg=name)
    # merge folds the same update as peft's (plain merge fills zeros: only through merge())
    assert torch.equal(ours.get_delta_weight("default"), theirs.get_delta_weight("default"))
    zeros = ours.get_base_layer().weight == 0
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.get_base_layer().weight, theirs.get_base_layer().weight, atol=0, rtol=0)
    assert int((ours.get_base_layer().weight == 0).sum()) < int(zeros.sum())


def test_plain_fused_training_keeps_zeros_and_state_dict_format():
    """A plain-LoRA model trains through the fused node, its base zeros stay zero, and its state dict
    is peft's (same keys as peft's own layers)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = pruned("llama")
    names = targets(model)
    zeros = {n: m.weight == 0 for n, m in adapter_for(model).prunable(model).items()}
    torch.manual_seed(0)
    layers = lora.add_lora_(model, lora.LoraSpec(kind="plain", rank=2, init="random"), names)
    assert all(type(m) is lora.PlainLoraLinear for m in layers.values())
    reference = pruned("llama")
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=32.0, target_modules=names, init_lora_weights=False), reference)
    assert not any(type(m) is lora.PlainLoraLinear for m in reference.modules())
    assert set(model.state_dict()) == set(reference.state_dict())
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in adapter_for(model).prunable(model).items():
        if ".lora_" not in name:
            assert torch.equal(module.weight == 0, zeros[name.replace(".base_layer", "")]), name

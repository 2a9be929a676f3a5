"""Fused mixture-of-experts tensors (transformers 5: one experts module with 3-D ``gate_up_proj`` /
``down_proj``) are pruned per expert and per matrix, with the tokens the router sends to each
expert as calibration statistics; retraining keeps every zero. Tiny random Mixtral, Qwen2-MoE and
(for a transposed, interleaved, biased layout) GPT-OSS configurations, built offline."""

from __future__ import annotations

import pytest
import torch
from test_generic_models import ids, tiny

from perplib import adapters, lora, retrain
from perplib.criteria import column_norms, magnitude_scores, select, wanda_scores
from perplib.pruning import collect_input_stats, prune_
from perplib.sparsity import Sparsity

MOE = ["mixtral", "qwen2_moe"]


def experts_of(model) -> dict[str, adapters.ExpertMatrix]:
    return {
        n: m for n, m in adapters.adapter_for(model).prunable(model).items() if isinstance(m, adapters.ExpertMatrix)
    }


def gpt_oss():
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"] * 2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases are zero at initialisation: make every slice matter
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", MOE + ["gpt_oss"])
def test_expert_matrices_are_views_and_the_routed_forward_is_the_forward(family):
    model = gpt_oss() if family == "gpt_oss" else tiny(family)
    adapter = adapters.adapter_for(model)
    assert adapter.fused_experts(model) == {}  # nothing left dense
    block = adapter.blocks(model)[0]
    experts = block.mlp.experts
    mats = adapters.block_matrices(block)
    e, inter = 2, experts.down_proj.shape[2 if not experts.is_transposed else 1]
    gate_up = experts.gate_up_proj[e].T if experts.is_transposed else experts.gate_up_proj[e]
    down = experts.down_proj[e].T if experts.is_transposed else experts.down_proj[e]
    rows = (slice(0, inter), slice(inter, None)) if experts.is_concatenated else (slice(0, None, 2), slice(1, None, 2))
    assert torch.equal(mats[f"mlp.experts.{e}.gate_proj"].weight, gate_up[rows[0]])
    assert torch.equal(mats[f"mlp.experts.{e}.up_proj"].weight, gate_up[rows[1]])
    assert torch.equal(mats[f"mlp.experts.{e}.down_proj"].weight, down)
    with torch.no_grad():  # a view: editing it edits the fused tensor
        mats[f"mlp.experts.{e}.up_proj"].weight[0, 0] = 123.0
    assert gate_up[rows[1]][0, 0] == 123.0
    batch = ids(2)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
        with adapters.routed_experts(block, mats):
            routed = model(input_ids=batch).logits
    torch.testing.assert_close(routed, expected, atol=1e-6, rtol=1e-5)
    assert "forward" not in vars(experts)  # the module's own forward is back


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_every_expert_matrix_reaches_the_sparsity(family, method, sparsity):
    model = tiny(family)
    report = prune_(model, method, sparsity, None if method == "magnitude" else ids(4, seed=1), device="cpu")
    assert report.unpruned == [] and report.magnitude_fallback == []
    assert report.sparsity == pytest.approx(0.5, abs=1e-9)
    experts = experts_of(model)
    assert len(experts) == 3 * 4 * 3  # blocks x experts x (gate, up, down)
    for name, m in experts.items():
        w = adapters.matrix(m)
        assert report.layers[name] == 0.5 and int((w == 0).sum()) == w.numel() // 2, name
        if sparsity == "2:4":  # 2 zeros in every group of 4 inputs
            assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()), name
    fused = adapters.adapter_for(model).expert_tensors(model)
    assert len(fused) == 6 and all(float((p == 0).float().mean()) == 0.5 for p in fused.values())


@pytest.mark.parametrize("family", MOE)
def test_wanda_statistics_are_the_routed_tokens_of_each_expert(family):
    """Oracle: the block's MoE input, the router run by hand, the routed tokens' squared norms."""
    model = tiny(family)
    block = model.model.layers[0]
    moe, experts = block.mlp, block.mlp.experts
    batch = ids(3, seed=4)
    seen = []
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    inputs = adapters.capture_block_inputs(model, [batch], "cpu")
    with torch.no_grad():
        mats = adapters.block_matrices(block)
        with adapters.routed_experts(block, mats):
            stats = collect_input_stats(block, mats, inputs, False, torch.device("cpu"))
    handle.remove()
    x = seen[-1]
    with torch.no_grad():
        probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)
        chosen = torch.topk(probs, moe.gate.top_k, dim=-1).indices
        for e in range(experts.num_experts):
            routed = x[(chosen == e).any(-1)]
            assert routed.shape[0] > 0
            torch.testing.assert_close(stats[f"mlp.experts.{e}.gate_proj"].value(), routed.square().sum(0))
            assert stats[f"mlp.experts.{e}.up_proj"] is stats[f"mlp.experts.{e}.gate_proj"]  # one input, once
            gate, up = (routed @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up
            torch.testing.assert_close(stats[f"mlp.experts.{e}.down_proj"].value(), hidden.square().sum(0))
            # and the mask Wanda keeps from them (per output row, as its reference code)
            w = mats[f"mlp.experts.{e}.down_proj"].weight.clone()
            expected = select(wanda_scores(w, hidden.square().sum(0).sqrt()), Sparsity.parse("0.5"), per_row=True)
            got = select(wanda_scores(w, column_norms(stats[f"mlp.experts.{e}.down_proj"].value())),
                         Sparsity.parse("0.5"), per_row=True)  # fmt: skip
            assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_an_expert_without_tokens_is_pruned_by_magnitude_and_said_so(method):
    model = tiny("mixtral")
    dense = {n: adapters.matrix(m).clone() for n, m in experts_of(model).items()}
    one_token = ids(1, seed=5)[:, :1]  # one token, two of four experts: two never see calibration data
    report = prune_(model, method, "0.5", one_token, device="cpu")
    assert len(report.magnitude_fallback) == 3 * 2 * 3  # blocks x unseen experts x matrices
    per_row = report.scope == "row"
    for name in report.magnitude_fallback:
        keep = select(magnitude_scores(dense[name]), Sparsity.parse("0.5"), per_row=per_row)
        assert torch.equal(adapters.matrix(experts_of(model)[name]), dense[name] * keep), name
    assert report.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("family", MOE)
def test_block_replay_equals_the_forward_after_pruning(family):
    model = tiny(family)
    prune_(model, "wanda", "0.5", ids(4, seed=1), device="cpu")
    batch = ids(2, seed=6)
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
        inputs = adapters.capture_block_inputs(model, [batch], "cpu")
        for i, block in enumerate(model.model.layers[:-1]):
            inputs[0].use(i)
            inputs[0].hidden = adapters.run_block(block, inputs[0])
            torch.testing.assert_close(inputs[0].hidden, hidden[i + 1], atol=1e-5, rtol=1e-5)


def _zeros(model) -> dict[str, torch.Tensor]:
    return {n: adapters.matrix(m) == 0 for n, m in retrain.prunable_linears(model).items()}


def _by_hand(model) -> float:
    """Zeros over every linear in the blocks and every fused expert tensor, counted directly."""
    adapter = adapters.adapter_for(model)
    tensors = [m.weight for m in adapters.adapter_for(model).prunable(model).values()
               if not isinstance(m, adapters.ExpertMatrix)] + list(adapter.expert_tensors(model).values())  # fmt: skip
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


@pytest.mark.parametrize("family", MOE)
def test_prune_perp_merge_keeps_every_zero_of_the_experts(family):
    model = tiny(family)
    prune_(model, "sparsegpt", "0.5", ids(4, seed=1), device="cpu")
    zeros = _zeros(model)
    assert any(".experts." in n for n in zeros)
    torch.manual_seed(0)
    marked = retrain.mark_trainable_(model, retrain.retrain_groups("perp"), lora=lora.LoraSpec(rank=4), targets="paper")
    # the paper's Mixtral set: attention only; other families' `all`: every linear, the experts skipped
    assert marked.lora_set["resolved"] == ("attention" if family == "mixtral" else "all")
    assert not any(".experts." in n for n in marked.lora_targets)
    assert all(not p.requires_grad for p in adapters.adapter_for(model).expert_tensors(model).values())
    retrain.train_(model, ids(4, seed=2), retrain.TrainSettings(steps=2, lr=1e-2, batch_size=2, grad_accum=1,
                                                                 warmup=0.0), progress=False)  # fmt: skip
    assert retrain.effective_sparsity(model) == pytest.approx(_by_hand(model))
    lora.merge_(model)
    for name, module in retrain.prunable_linears(model).items():
        assert bool((adapters.matrix(module)[zeros[name]] == 0).all()), name


def test_lora_on_all_layers_skips_the_experts_and_says_so():
    model = tiny("qwen2_moe")
    layers, described = adapters.lora_target_layers(model, "all")
    assert layers and not any(".experts." in n for n in layers)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in layers  # a real linear: adapted
    assert described["skipped"]["fused_experts"] == ["mlp.experts"]
    _, attention = adapters.lora_target_layers(model, "attention")
    assert "skipped" not in attention


@pytest.mark.parametrize("family", MOE)
def test_full_imp_keeps_every_zero_of_the_fused_tensors(family):
    model = tiny(family)
    prune_(model, "magnitude", "0.5", device="cpu")
    adapter = adapters.adapter_for(model)
    fused = {n: p.detach().clone() for n, p in adapter.expert_tensors(model).items()}
    marked = retrain.mark_trainable_(model, ("full",))
    assert set(fused) <= set(marked.masks) and all(marked.masks[n].ndim == 3 for n in fused)
    retrain.train_(model, ids(6, seed=2), retrain.TrainSettings(steps=3, lr=1e-2, batch_size=2, grad_accum=1,
                                                                 warmup=0.0), masks=marked.masks, progress=False)  # fmt: skip
    for name, before in fused.items():
        after = model.get_parameter(name)
        assert bool((after[before == 0] == 0).all()), name
        assert not torch.equal(after, before), name  # the experts did train
    assert retrain.effective_sparsity(model) == pytest.approx(_by_hand(model)) == pytest.approx(0.5)


def test_routing_restores_an_instance_forward():
    """An offloaded module's forward is accelerate's wrapper, set on the instance: it comes back."""
    model = tiny("mixtral")
    block = model.model.layers[0]
    experts = block.mlp.experts
    own = experts.forward  # bound class forward, set on the instance as accelerate does
    experts.forward = own
    with adapters.routed_experts(block, adapters.block_matrices(block)):
        assert experts.forward is not own
    assert vars(experts)["forward"] is own


def test_the_pruning_memory_plan_counts_each_experts_statistics(tmp_path):
    """SparseGPT keeps X^T X per distinct input: q/k/v's, o's, and per expert its gate/up and down inputs."""
    from perplib.memory import PlanSpec, plan_prune

    tiny("mixtral").config.save_pretrained(tmp_path)
    plan = plan_prune(PlanSpec(model=str(tmp_path), dtype="float32", seqlen=16, prune="sparsegpt"))
    hidden, inner, experts = 32, 64, 4
    assert plan.gpu["statistics"] == 4 * (2 * hidden**2 + experts * (hidden**2 + inner**2))


def test_owl_allocates_over_the_expert_matrices_too():
    model = tiny("mixtral")
    report = prune_(model, "wanda", "0.5", ids(4, seed=1), device="cpu", allocation="owl")
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert len(report.allocation["achieved"]) == 3 and len(set(report.allocation["targets"])) > 1
    for i, target in enumerate(report.allocation["targets"]):  # every expert matrix of a block at its target
        experts = [s for n, s in report.layers.items() if n.startswith(f"model.layers.{i}.mlp.experts.")]
        assert len(experts) == 12 and all(s == pytest.approx(target, abs=0.02) for s in experts)

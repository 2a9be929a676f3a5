"""The generic adapter (issue 14): families nobody wrote an entry for, found from structure and
config. Tiny random configurations, built offline: pruning + PERP + merge keep every zero, and the
block-by-block replay the pruning driver uses equals the model's own forward."""

from __future__ import annotations

import pytest
import torch

from perplib import adapters, lora, retrain
from perplib.pruning import prune_

VOCAB, SEQ = 96, 12


def tiny(family: str):
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        MixtralConfig,
        Phi3Config,
        Qwen2MoeConfig,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
    configs = {
        # sliding-window and global layers get different masks and rotary tables: a 4-token window
        "gemma3": lambda: Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                           max_position_embeddings=64),
        "phi3": lambda: Phi3Config(**common, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64),
        "mixtral": lambda: MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                            max_position_embeddings=64),
    }  # fmt: skip
    config = configs[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


FAMILIES = ["gemma3", "phi3", "gpt2", "mixtral", "qwen2_moe"]


def ids(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replay_equals_the_forward(family):
    model = tiny(family)
    adapter = adapters.adapter_for(model)
    batch = ids(2)
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
        inputs = adapters.capture_block_inputs(model, [batch], "cpu")
        blocks = adapter.blocks(model)
        assert len(blocks) == 3 and all(len(i.block_kwargs) == 3 for i in inputs)
        for i, block in enumerate(blocks[:-1]):  # the last entry of hidden_states is after the final norm
            inputs[0].use(i)
            inputs[0].hidden = adapters.run_block(block, inputs[0])
            torch.testing.assert_close(inputs[0].hidden, hidden[i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_retrain_merge_keep_every_zero(family, method):
    model = tiny(family)
    adapter = adapters.adapter_for(model)
    assert adapter.head_module(model) is model.get_output_embeddings()
    assert adapter.norms(model) and adapter.embedding_modules(model)
    report = prune_(model, method, "0.5", None if method == "magnitude" else ids(4, seed=1), device="cpu")
    assert report.sparsity == pytest.approx(0.5, abs=0.02)
    assert report.unpruned == []  # fused MoE experts too (tests/test_moe.py)
    zeros = {n: adapters.matrix(m) == 0 for n, m in adapter.prunable(model).items()}
    for kind in ["masked", "plain"] if family == "gpt2" else ["masked"]:
        trained = tiny(family)
        trained.load_state_dict(model.state_dict())
        torch.manual_seed(0)
        marked = retrain.mark_trainable_(trained, retrain.retrain_groups("perp"), lora=lora.LoraSpec(kind=kind, rank=4))
        assert marked.counts["lora"] > 0
        settings = retrain.TrainSettings(steps=2, lr=1e-2, batch_size=2, grad_accum=1, warmup=0.0)
        retrain.train_(trained, ids(4, seed=2), settings, progress=False)
        if kind == "masked":
            with torch.no_grad():
                before = trained(input_ids=ids(2, seed=3)).logits
            lora.merge_(trained)
            with torch.no_grad():
                torch.testing.assert_close(trained(input_ids=ids(2, seed=3)).logits, before, atol=1e-4, rtol=1e-4)
        for name, module in retrain.prunable_linears(trained).items():
            assert bool((adapters.matrix(module)[zeros[name]] == 0).all()), name


def test_gpt2_conv1d_is_its_transposed_matrix():
    model = tiny("gpt2")
    prunable = adapters.adapter_for(model).prunable(model)
    assert "transformer.h.0.attn.c_attn" in prunable
    assert adapters.matrix(prunable["transformer.h.0.attn.c_attn"]).shape == (96, 32)  # out x in


def test_not_a_causal_lm_fails_early():
    from transformers import T5Config

    with pytest.raises(ValueError, match="encoder-decoder"):
        adapters.check_causal_lm(T5Config())
    with pytest.raises(ValueError, match="no causal-LM class"):
        adapters.check_causal_lm(type("C", (), {"model_type": "resnet"})())
    adapters.check_causal_lm(tiny("phi3").config)  # a decoder-only causal LM passes

"""BOS per window (issue 14): ``window`` gives every window what the model's own tokenizer path
gives a text (BOS first), ``reference`` keeps the reference code's single leading BOS."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perplib import data, evaluation
from perplib.config import RunConfig

BOS, VOCAB = 2, 64


class Tokenizer:
    """A Gemma-like tokenizer: every text it encodes starts with BOS."""

    bos_token_id = BOS

    def __call__(self, text):
        return {"input_ids": [BOS] + [3 + (ord(c) % (VOCAB - 3)) for c in text]}


def tiny_gemma():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                              bos_token_id=BOS)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_auto_resolves_by_family():
    tok = Tokenizer()
    assert data.resolve_bos("auto", "gemma3_text", tok) == ("window", BOS)
    assert data.resolve_bos("auto", "llama", tok) == ("reference", BOS)
    assert data.resolve_bos("none", "gemma3_text", tok)[0] == "none"
    with pytest.raises(ValueError, match="bos must be one of"):
        RunConfig(bos="always")


def test_window_is_what_the_model_sees_from_its_tokenizer():
    model, tok, seqlen = tiny_gemma(), Tokenizer(), 8
    text = "perplexity of a gemma model on text it sees with a BOS first"
    stream = torch.tensor(tok(text)["input_ids"])
    ids = data.strip_bos(stream, BOS)
    assert ids.numel() == stream.numel() - 1
    got = evaluation.perplexity(model, ids, seqlen, windows=3, bos_id=BOS)
    # the model's own path: each window's text tokenized on its own (BOS first), through forward
    nll, count = 0.0, 0
    for i in range(3):
        piece = text[i * (seqlen - 1) : (i + 1) * (seqlen - 1)]
        window = torch.tensor([tok(piece)["input_ids"]])
        assert window.shape[1] == seqlen and int(window[0, 0]) == BOS
        with torch.no_grad():
            logits = model(input_ids=window).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1), reduction="sum").item()
        count += seqlen - 1
    assert got["windows"] == 3 and got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # reference: only the first window starts with BOS
    ref = evaluation.perplexity(model, stream, seqlen, windows=3)
    assert ref["perplexity"] != pytest.approx(got["perplexity"], rel=1e-3)


def test_sampled_windows_start_with_bos(monkeypatch):
    monkeypatch.setattr(data, "_stream", lambda tok, source, split: torch.arange(3, 60))
    monkeypatch.setattr(data, "check_source", lambda source: source)
    windows = data.sample_windows(Tokenizer(), "x", 4, 8, seed=0, bos="window")
    assert windows.shape == (4, 8) and bool((windows[:, 0] == BOS).all()) and bool((windows[:, 1:] != BOS).all())
    plain = data.sample_windows(Tokenizer(), "x", 4, 8, seed=0)
    assert plain.shape == (4, 8)

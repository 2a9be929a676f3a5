import pytest
import torch

from perplib import data


def test_wiki_vital_split_is_deterministic_and_disjoint():
    train, held_out = data.documents("wiki-vital", "train"), data.documents("wiki-vital", "eval")
    val = data.documents("wiki-vital", "val")
    titles = lambda docs: {d.split("\n\n", 1)[0] for d in docs}  # noqa: E731
    assert len(held_out) > 500 and len(val) > 500 and len(train) > 7 * len(held_out)
    assert (
        not titles(train) & titles(held_out) and not titles(train) & titles(val) and not titles(val) & titles(held_out)
    )
    assert all(data.is_eval_article(t) for t in titles(held_out))
    assert {data.article_split(t) for t in titles(val)} == {"val"}
    assert data.documents("wiki-vital", "eval") == held_out


def test_validation_text_is_what_eval_split_val_evaluates(tokenizer):
    from perplib.config import RunConfig

    val, held_out = data.eval_ids(tokenizer, "wiki-vital", "val"), data.eval_ids(tokenizer, "wiki-vital")
    assert val.numel() > 10_000 and not torch.equal(val[:256], held_out[:256])
    with pytest.raises(ValueError, match="'eval' or 'val'"):
        data.eval_ids(tokenizer, "wiki-vital", "train")
    with pytest.raises(ValueError, match="eval_split must be one of"):
        RunConfig(eval_split="train")


def test_windows_are_seeded(tokenizer):
    a = data.sample_windows(tokenizer, "wiki-vital", 4, 32, seed=0)
    b = data.sample_windows(tokenizer, "wiki-vital", 4, 32, seed=0)
    c = data.sample_windows(tokenizer, "wiki-vital", 4, 32, seed=1)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_windows_never_come_from_held_out_text(tokenizer):
    held_out = data.eval_ids(tokenizer, "wiki-vital")
    windows = data.sample_windows(tokenizer, "wiki-vital", 8, 16, seed=3)
    stream = held_out.tolist()
    text = " ".join(map(str, stream))
    for w in windows:
        assert " ".join(map(str, w.tolist())) not in text


def test_local_text_file(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    ids = data.eval_ids(tokenizer, str(path))
    assert ids.numel() > 100
    assert data.sample_windows(tokenizer, str(path), 2, 16).shape == (2, 16)


def test_bad_sources_fail_early(tmp_path):
    with pytest.raises(ValueError, match="unknown text source 'nowhere'"):
        data.documents("nowhere")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.check_source(str(empty))
    with pytest.raises(ValueError, match="split must be"):
        data.documents("wiki-vital", "test")
    with pytest.raises(ValueError, match="nsamples must be"):
        data.sample_windows(None, "wiki-vital", 0, 16)


def test_c4_evaluation_is_capped_at_256_windows(monkeypatch, tokenizer):
    """C4 validation perplexity over its first 256 x seqlen tokens, as the reference code; other
    sources are used whole."""
    stream = torch.arange(300 * 16)
    monkeypatch.setattr(data, "_stream", lambda tok, source, split: stream)
    assert torch.equal(data.eval_ids(tokenizer, "c4", seqlen=16), stream[: 256 * 16])
    assert data.eval_ids(tokenizer, "c4", seqlen=8).numel() == 256 * 8
    assert data.eval_ids(tokenizer, "c4").numel() == stream.numel()
    assert data.eval_ids(tokenizer, "wikitext2", seqlen=16).numel() == stream.numel()

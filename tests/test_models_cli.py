import json

import pytest
import torch

from perplib import cli
from perplib.adapters import BlockInput, adapter_for, capture_block_inputs, run_block
from perplib.config import RunConfig
from perplib.models import tiny_model


@pytest.mark.parametrize("family, prunable, norms", [("llama", 14, 5), ("opt", 12, 5), ("neox", 8, 5)])
def test_adapter_finds_layers(family, prunable, norms):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert len(adapter.prunable(model)) == prunable and len(adapter.norms(model)) == norms
    assert adapter.head_module(model) is model.get_output_embeddings()
    assert all(".layers." in name for name in adapter.prunable(model))


@pytest.mark.parametrize("family", ["llama", "opt", "neox"])
def test_block_replay_reproduces_the_forward(family):
    """Captured block-0 inputs, run through every block, equal the last block's real output."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(0, 128, (2, 12))
    inputs = capture_block_inputs(model, [ids])
    for block in adapter.blocks(model):
        inputs = [BlockInput(run_block(block, i), i.kwargs) for i in inputs]
    seen = {}
    hook = adapter.blocks(model)[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(ids)
    hook.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert torch.allclose(out, inputs[0].hidden, atol=1e-6)
    assert len(adapter.blocks(model)) == 2  # the truncated forward restored the block list


def test_config_validation_messages():
    with pytest.raises(ValueError, match="prune must be one of"):
        RunConfig(prune="random")
    with pytest.raises(ValueError, match="windows must be an integer >= 1"):
        RunConfig(windows=0)
    with pytest.raises(ValueError, match="retrain must be a preset"):
        RunConfig(retrain="norms+everything")
    assert RunConfig(retrain="lora+norms").groups == ("norms", "lora")


def test_perp_eval_writes_record_and_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "tiny-llama", "--seqlen", "32", "--windows", "2", "--json", str(out)]
    assert cli.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["config"]["model"] == "tiny-llama" and record["metrics"]["tokens"] == 64
    assert record["metrics"]["perplexity"] > 1 and "eval_s" in record["timings"]
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(argv) == 0 and "reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such-model"], "unknown model 'no/such-model'"),
        (["--model", "tiny-llama", "--seqlen", "100000"], "exceeds the context length"),
        (["--model", "tiny-llama", "--windows", "-3"], "windows must be"),
        (["--model", "tiny-llama", "--eval", "/no/such/file.txt"], "unknown text source"),
    ],
)
def test_perp_eval_bad_input(argv, message, capsys):
    assert cli.main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_perp_eval_unwritable_results(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert cli.main(["eval", "--model", "tiny-llama", "--results", str(tmp_path / "f" / "r")]) == 2
    assert "cannot be written" in capsys.readouterr().err


@pytest.mark.slow
def test_embedded_checkpoint_reproduces_gguf_logits():
    from transformers import AutoModelForCausalLM

    from perplib.models import embedded_gguf, load_model

    model, tokenizer = load_model("smollm2-135m")
    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tokenizer("Pruning removes weights; retraining restores accuracy.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def test_seqlen_none_is_the_models_context_resolved_before_the_key(tmp_path, monkeypatch):
    """The paper profile's ``seqlen: null``: each model's context ("context-length sequences"),
    capped at 4096 as the PERP code; the record is keyed by the length actually used."""
    from types import SimpleNamespace

    from perplib import experiments, models
    from perplib.results import ResultStore

    assert RunConfig(seqlen=None).seqlen is None
    with pytest.raises(ValueError, match="seqlen must be an integer >= 1"):
        RunConfig(seqlen=0)
    assert experiments.context_seqlen("tiny-llama") == 512  # tiny configs: max_position_embeddings 512
    store = ResultStore(tmp_path)
    record = experiments.run_llm(RunConfig(model="tiny-llama", seqlen=None, windows=1), store)
    assert record["config"]["seqlen"] == 512 and record["metrics"]["tokens"] == 512
    again = experiments.run_llm(RunConfig(model="tiny-llama", seqlen=512, windows=1), store)
    assert again.get("reused") and again["key"] == record["key"]
    for context, expected in [(2048, 2048), (4096, 4096), (32768, 4096)]:  # OPT, LLaMA-2, Mistral
        monkeypatch.setattr(models, "model_config", lambda name, c=context: SimpleNamespace(max_position_embeddings=c))
        assert experiments.resolve(RunConfig(model="org/m", seqlen=None)).seqlen == expected
        assert experiments.resolve(RunConfig(model="org/m", seqlen=128)).seqlen == 128
    monkeypatch.setattr(models, "model_config", lambda name: SimpleNamespace())
    with pytest.raises(ValueError, match="config of 'org/m' does not say it"):
        experiments.resolve(RunConfig(model="org/m", seqlen=None))


def test_paper_profile_llm_settings():
    """Paper profile: context-length sequences per model, Section 3.3 Wanda scores per matrix as the
    PERP code (the records then say scope 'matrix')."""
    from perplib.reproduce import load_profile

    profile = load_profile("paper")
    assert profile["common"]["seqlen"] is None
    assert profile["33_magnitude_llms"]["scope"] == "matrix"


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
@pytest.mark.parametrize("command", [["eval"], ["prune", "--method", "magnitude"], ["run", "--retrain", "none"]])
def test_a_bad_thread_count_is_refused_before_anything_runs(command, bad, capsys, monkeypatch):
    from perplib import experiments

    monkeypatch.setattr(experiments, "run_llm", lambda *a, **k: pytest.fail("ran despite a bad --threads"))
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--model", "tiny-llama", "--threads", bad])
    assert exit_.value.code == 2
    assert (
        f"argument --threads: {bad!r} is not a positive integer (the number of torch threads)"
        in capsys.readouterr().err
    )


def test_perp_records_its_threads_and_denormal_flushing(tmp_path):
    import torch

    from perplib import runtime

    threads = torch.get_num_threads()
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "tiny-llama", "--seqlen", "32", "--windows", "1", "--json", str(out),
            "--threads", "1", "--no-flush-denormals", "--no-keep-freed-memory"]  # fmt: skip
    try:
        assert cli.main(argv) == 0
        assert json.loads(out.read_text())["env"]["runtime"] == {
            "torch_threads": 1, "flush_denormals": False, "keep_freed_memory": False,
        }  # fmt: skip
        assert cli.main([*argv[:-4], "--force"]) == 0  # not given: flushing and keeping (the defaults), torch's threads
        assert json.loads(out.read_text())["env"]["runtime"] == runtime.settings()
        assert runtime.settings()["flush_denormals"] is True and runtime.settings()["keep_freed_memory"] is True
    finally:
        runtime.configure(threads=threads, flush_denormals=False)


def test_a_local_gguf_file_is_converted_once_by_content_and_evaluated(tmp_path, monkeypatch, tokenizer, capsys):
    """`--model path/to/x.gguf`: converted once into the cache, keyed by name and content hash (a
    copy elsewhere reuses it, changed bytes convert again), then loaded like any local folder. The
    dequantising conversion itself is transformers' (stubbed here; the slow test below runs it)."""
    from perplib import models

    monkeypatch.setenv("PERPLIB_CACHE", str(tmp_path / "cache"))
    converted = []

    def fake_convert(gguf, target):
        if not (target / "config.json").exists():
            converted.append((gguf.read_bytes(), target.name))
            tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(target)
            tokenizer.save_pretrained(target)
        return target

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    first, copy, changed = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in ((first, b"GGUF one"), (copy, b"GGUF one"), (changed, b"GGUF two")):
        path.parent.mkdir()
        path.write_bytes(content)
    assert models.source(str(first)) == models.source(str(copy)) != models.source(str(changed))
    assert [c for c, _ in converted] == [b"GGUF one", b"GGUF two"]
    assert converted[0][1].startswith("gguf-m-") and models.source("some/hub-id") == "some/hub-id"
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(first), "--seqlen", "32", "--windows", "2", "--json", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["config"]["model"] == str(first) and record["metrics"]["tokens"] == 64
    assert len(converted) == 2  # the run reused the conversion


@pytest.mark.slow
def test_a_gguf_file_path_loads_as_the_embedded_model(tmp_path, monkeypatch):
    """The real conversion of a GGUF given by path equals the embedded model's conversion."""
    import shutil

    from perplib.models import embedded_gguf, load_model

    model, tokenizer = load_model("smollm2-135m")
    monkeypatch.setenv("PERPLIB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "copy.gguf"
    shutil.copy(embedded_gguf(), path)
    other, other_tokenizer = load_model(str(path))
    ids = tokenizer("Pruning removes weights; retraining restores accuracy.", return_tensors="pt").input_ids
    assert other_tokenizer("Pruning").input_ids == tokenizer("Pruning").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)

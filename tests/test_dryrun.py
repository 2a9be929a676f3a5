"""The dry-run mapping (perplib.dryrun): paper names resolve to tiny models and local fixtures that
the real loaders read, sizes are cut, and anything the mapping does not cover fails early."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from perplib import data, dryrun, paths, reproduce
from perplib.models import load_model

PAPER_IDS = {
    "facebook/opt-1.3b": "opt",
    "facebook/opt-30b": "opt",
    "meta-llama/Llama-2-7b-hf": "llama",
    "meta-llama/Llama-2-70b-hf": "llama",
    "mistralai/Mistral-7B-v0.1": "mistral",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral",
}


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory):
    return dryrun.ensure_fixtures(tmp_path_factory.mktemp("dry") / "fixtures")


@pytest.fixture
def dry(fixtures, monkeypatch):
    monkeypatch.setenv(dryrun.ENV, str(fixtures))
    data._documents.cache_clear()  # documents are cached per source name, whatever folder they came from
    yield fixtures
    data._documents.cache_clear()


def test_paper_ids_map_to_their_family_and_others_fail_naming_the_id():
    for name, family in PAPER_IDS.items():
        assert dryrun.model_family(name) == family
    for name in ["facebook/opt-1.3b-x", "meta-llama/Meta-Llama-3-8B", "google/gemma-2b", "EleutherAI/pythia-70m"]:
        assert dryrun.model_family(name) is None
    with pytest.raises(ValueError, match="'google/gemma-2b' is not covered by the dry-run mapping"):
        dryrun.check_parameters("00_dense_baselines", {"models": ["facebook/opt-1.3b", "google/gemma-2b"]})
    with pytest.raises(ValueError, match="32_x, parameter 'figure3_model'.*'org/unknown-7b'"):
        dryrun.check_parameters("32_x", {"figure3_model": "org/unknown-7b"})
    dryrun.check_parameters("31", {"model": "resnet50", "models": ["tiny-opt", "smollm2-135m"]})


def test_without_a_dry_run_names_pass_through(monkeypatch):
    monkeypatch.delenv(dryrun.ENV, raising=False)
    assert dryrun.resolve_model("facebook/opt-1.3b") == "facebook/opt-1.3b"
    assert dryrun.resolve_model("google/gemma-2b") == "google/gemma-2b"
    assert dryrun.hub_dataset("allenai/c4") == {"path": "allenai/c4"}


def test_dry_run_resolves_names_and_redirects_outputs(dry, monkeypatch):
    for name, family in PAPER_IDS.items():
        assert dryrun.resolve_model(name) == str(dry / "models" / family)
    assert dryrun.resolve_model("tiny-opt") == "tiny-opt"  # aliases and local folders stay
    with pytest.raises(ValueError, match="'google/gemma-2b' is not covered"):
        dryrun.resolve_model("google/gemma-2b")
    with pytest.raises(ValueError, match="hub dataset 'openai/gsm8k' is not covered"):
        dryrun.hub_dataset("openai/gsm8k")
    monkeypatch.delenv("PERPLIB_RESULTS")
    monkeypatch.setenv("PERPLIB_BUILD", "/somewhere/build")
    assert str(paths.results_dir()) == "/somewhere/build/dry-run/results"


@pytest.mark.parametrize("name", list(PAPER_IDS))
def test_paper_models_load_as_tiny_models_of_their_family(dry, name):
    model, tokenizer = load_model(name, dtype="bfloat16")
    family = PAPER_IDS[name]
    assert model.config.model_type == family and model.config.num_hidden_layers == 2
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tokenizer("The paper's models, in miniature.")["input_ids"]])
    assert ids[0, 0] == tokenizer.bos_token_id  # BOS first, as the LLaMA and OPT tokenizers do
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_hub_datasets_load_through_the_real_loaders(dry):
    test = data.documents("wikitext2", "eval")
    assert any(line.startswith(" = ") for line in test) and "" in test  # WikiText's raw line format
    c4_train, c4_val = data.documents("c4", "train"), data.documents("c4", "eval")
    assert len(c4_train) == 120 and len(c4_val) == 16 and not set(c4_train) & set(c4_val)
    _, tokenizer = load_model("facebook/opt-1.3b")
    windows = data.sample_windows(tokenizer, "c4", nsamples=4, seqlen=64, seed=0)
    assert windows.shape == (4, 64)
    # every window of the held-out split is evaluated in a dry run: few enough to be quick
    assert 40 <= data.eval_ids(tokenizer, "wikitext2").numel() // 64 <= 200


def test_zero_shot_runs_lm_evals_own_task_definitions_on_local_copies(dry):
    from perplib.evaluation import ZERO_SHOT_TASKS, zero_shot

    model, tokenizer = load_model("meta-llama/Llama-2-7b-hf")
    out = zero_shot(model, tokenizer, ZERO_SHOT_TASKS, batch_size=8)
    assert set(out["zero_shot"]) == set(ZERO_SHOT_TASKS)
    assert all(0.0 <= acc <= 1.0 for acc in out["zero_shot"].values())
    text = (dry / "lm_eval_tasks" / "hellaswag.yaml").read_text()
    assert "lm_eval/tasks/hellaswag/hellaswag.yaml" in text and str(dry / "hub" / "Rowan" / "hellaswag") in text


def test_image_folder_fixture_loads_as_imagenet(dry):
    from perplib.vision.data import load_vision_data

    vd = load_vision_data("imagenet", str(dry / "imagenet"))
    assert vd.num_classes == 3 and vd.image_size == 224 and vd.size("train") + vd.size("val") == 9
    image, label = vd.test[0]
    assert image.shape == (3, 224, 224) and 0 <= label < 3


def test_fixtures_are_deterministic(fixtures, tmp_path):
    def digest(folder):  # what is written on use (datasets cache, lm-eval task files) aside
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not {".cache", "lm_eval_tasks"} & set(p.parts))
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    again = tmp_path / "again"  # in a fresh process: hash seeds and set orders differ there
    code = f"from pathlib import Path; from perplib import dryrun; dryrun.ensure_fixtures(Path({str(again)!r}))"
    env = {**os.environ, "PYTHONPATH": str(paths.repo_root())}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    assert digest(again) == digest(fixtures)
    assert dryrun.ensure_fixtures(again) == again  # complete and current: nothing rebuilt


def test_paper_profile_is_covered_and_cut(dry):
    for book in sorted(reproduce.notebooks_dir().glob("*.ipynb")):
        params = reproduce.notebook_parameters("paper", book.stem, reproduce.declared_parameters(book))
        cut, changed = dryrun.cut_parameters(book.stem, params)
        assert set(cut) == set(params)
        for key, value in cut.items():
            if key.endswith("steps") and isinstance(value, int):
                assert value <= 2
            if key.endswith("epochs") and isinstance(value, int):
                assert value <= 1
        for key in ("models", "full_models"):
            if key in cut:  # one id per family, the first the profile names
                families = [dryrun.model_family(m) for m in cut[key]]
                assert len(families) == len(set(families)) and cut[key][0] == params[key][0]
        if cut.get("data") == "imagenet":
            assert cut["data_root"] == str(dry / "imagenet") and cut["model"] == "resnet-tiny"
        assert cut.get("dtype", "bfloat16") == params.get("dtype", "bfloat16")  # code paths are kept
        assert cut.get("grad_accum") == params.get("grad_accum") and cut.get("batch_size") == params.get("batch_size")
        if "retraining" in cut:  # the LLM run plan: steps and grids cut, code paths (dtype, accumulation) kept
            r, p = cut["retraining"], params["retraining"]
            assert r["steps"] <= 2 and r["eval_every"] <= 1 and r["selection"]["steps"] <= 2
            assert all(len(rates) == 1 for rates in r["selection"]["grid"].values())
            assert (r["dtype"], r["grad_accum"], r["lr"]) == (p["dtype"], p["grad_accum"], p["lr"])


def test_sparsity_grids_keep_both_kinds():
    assert dryrun._sparsities(["0.5", "0.6", "0.7", "0.8", "2:4", "4:8"]) == ["0.5", "0.8", "2:4"]
    assert dryrun._sparsities([0.3, 0.4, 0.5]) == [0.3, 0.5]
    assert dryrun._one_per_family(["facebook/opt-1.3b", "facebook/opt-2.7b", "meta-llama/Llama-2-7b-hf"]) == [
        "facebook/opt-1.3b",
        "meta-llama/Llama-2-7b-hf",
    ]


def test_mixtral_experts_are_prunable():
    """Every weight matrix in the blocks but the router's is pruned: the fused 3-D expert tensors too
    (one matrix per expert and projection, tests/test_moe.py)."""
    from perplib.adapters import adapter_for
    from perplib.models import tiny_model

    model = tiny_model("mixtral")
    prunable = sum(m.weight.numel() for m in adapter_for(model).prunable(model).values())
    in_blocks = sum(p.numel() for p in model.model.layers.parameters() if p.ndim >= 2)
    router = sum(b.mlp.gate.weight.numel() for b in model.model.layers)
    assert prunable == in_blocks - router

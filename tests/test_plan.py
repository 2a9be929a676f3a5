"""The LLM run plan: equal runs get equal keys across notebooks; rates per method; validation only."""

import math

import pytest

from perplib import plan
from perplib.config import RunConfig
from perplib.reproduce import load_profile
from perplib.results import config_key

COMMON = {"eval": "wiki-vital", "calib": "wiki-vital", "train": "wiki-vital", "seqlen": 256, "windows": 16,
          "nsamples": 32}  # fmt: skip
RETRAINING = {"steps": 48, "batch_size": 1, "grad_accum": 1, "lora_rank": 16, "lora_alpha": 32.0, "dtype": "float32",
              "grad_checkpointing": False, "eval_every": 6,
              "figure3": {"prune": "magnitude", "sparsities": ["0.5"], "lora": "masked"},
              "lr": {"perp": 4e-3, "full": 5e-4, "ln": 5e-3, "linear-probing": 5e-3, "default": 4e-3},
              "selection": {"steps": 16, "prune": "magnitude", "sparsity": "0.5",
                            "grid": {"perp": [2e-3, 4e-3], "full": [5e-4]}}}  # fmt: skip


def run(*args, **kw):
    return plan.run_config(COMMON, RETRAINING, "smollm2-135m", *args, **kw)


def test_dense_baseline_is_one_configuration():
    dense = run()
    assert dense == RunConfig(model="smollm2-135m", seqlen=256, windows=16)
    assert config_key(dense) == config_key(run("none", 0.7, "none"))  # the sparsity of no pruning is irrelevant


def test_figure3_runs_are_table1_runs_and_only_they_evaluate_on_the_way():
    perp = run("magnitude", 0.5, "perp")
    assert (perp.eval_every, perp.steps, perp.lr, perp.retrain, perp.lora) == (6, 48, 4e-3, "perp", "masked")
    # notebook 33 passes the scope and the sparsity as text: the same record
    assert config_key(perp) == config_key(run("magnitude", "0.5", "perp", scope="auto"))
    assert run("magnitude", 0.5, "perp", lora="plain").eval_every == 0
    assert run("wanda", 0.5, "perp").eval_every == 0
    assert run("magnitude", 0.7, "perp").eval_every == 0
    assert run("magnitude", 0.5, "perp", steps=8, lora_rank=8).eval_every == 0  # Table 14's variants: no curve


def test_rates_per_method_and_normalised_fields():
    assert run("magnitude", 0.5, "full").lr == 5e-4
    assert run("magnitude", 0.5, "ln").lr == 5e-3
    assert run("magnitude", 0.5, ("norms", "lora")).lr == 4e-3  # not a preset: the default
    none = run("magnitude", 0.5, "none")
    assert (none.steps, none.lr, none.nsamples, none.calib) == (0, RunConfig().lr, RunConfig().nsamples, "wiki-vital")
    assert run("wanda", 0.5).nsamples == 32  # calibration only where it changes the run


def test_group_method_makes_bias_free_combinations_the_presets():
    assert [plan.group_method(g, include_biases=False) for g in [(), ("norms",), ("norms", "head"),
            ("norms", "head", "lora"), ("lora",)]] == ["none", "ln", "linear-probing", "perp", "biases+lora"]  # fmt: skip
    assert plan.group_method(("norms",), include_biases=True) == "norms"


def test_selection_runs_on_the_validation_split_and_chooses_the_lowest():
    configs = plan.selection_configs(COMMON, RETRAINING, "smollm2-135m")
    assert [(c.retrain, c.lr, c.steps, c.eval_split, c.eval_every) for c in configs] == [
        ("perp", 2e-3, 16, "val", 0), ("perp", 4e-3, 16, "val", 0), ("full", 5e-4, 16, "val", 0)]  # fmt: skip
    records = [{"config": {"retrain": c.retrain, "lr": c.lr, "eval_split": "val"}, "metrics": {"perplexity": p}}
               for c, p in zip(configs, [50.0, 45.0, math.inf], strict=True)]  # fmt: skip
    assert plan.choose_rates(records) == {"perp": (4e-3, 45.0)}
    records[0]["config"]["eval_split"] = "eval"
    with pytest.raises(ValueError, match="validation split only"):
        plan.choose_rates(records)


@pytest.mark.parametrize(
    "bad, match",
    [({"steps": 1, "lr": {"perp": 1e-3}}, "default"), ({"steps": 1, "lr": {"default": 0}}, "positive"),
     ({"steps": 1, "lr": {"default": 1e-3}, "epochs": 2}, "unknown key"), ({"lr": {"default": 1e-3}}, "needs")],
)  # fmt: skip
def test_bad_retraining_mappings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        plan.check_retraining(bad)


@pytest.mark.parametrize("profile", ["smoke", "embedded", "paper"])
def test_every_profile_has_a_valid_plan(profile):
    common = load_profile(profile)["common"]
    plan.check_retraining(common["retraining"])
    assert plan.selection_configs(common, common["retraining"], "tiny-opt")


def test_zero_shot_is_measured_on_table2_rows_only():
    r = RETRAINING | {"zero_shot": {"tasks": "wiki_vital_next_sentence", "sparsities": ["0.5"]}}

    def zs(*args, **kw):
        return plan.run_config(COMMON, r, "smollm2-135m", *args, **kw).zero_shot

    assert zs() == zs("wanda", 0.5) == zs("magnitude", "0.5", "perp", seed=0) == "wiki_vital_next_sentence"
    assert zs("magnitude", 0.7) == zs("magnitude", 0.5, "perp", lora="plain") == zs("magnitude", 0.5, "ln") == ""
    assert zs("magnitude", 0.5, "perp", lora_rank=8) == zs("magnitude", 0.5, "perp", eval_split="val") == ""

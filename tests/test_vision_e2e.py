"""Vision end to end on scikit-learn's digits: pretrain (cached) -> prune -> retrain -> record, the
CLI, and the Table 12 / Figure 2 builders. A few seconds in all."""

from __future__ import annotations

import argparse
import json

import pytest

from perplib.results import ResultStore
from perplib.vision import cli as vcli
from perplib.vision.artefacts import accuracy_frame, accuracy_table, table12
from perplib.vision.experiments import VisionConfig, pretrained_model, run_vision
from perplib.vision.pruning import prunable_weights, prune_, relative_change

BASE = VisionConfig(
    model="resnet-tiny",
    data="digits",
    train_subset=300,
    test_subset=300,
    pretrain_epochs=4,
    batch_size=64,
    sparsity=0.8,
    epochs=1,
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One cache and store for the module, so the (cached) pretraining runs once."""
    return tmp_path_factory.mktemp("vision")


@pytest.fixture
def store(shared, monkeypatch):
    monkeypatch.setenv("PERPLIB_CACHE", str(shared / "cache"))
    return ResultStore(shared / "results")


def test_end_to_end_digits(store, shared):
    perp = run_vision(BASE.replace(retrain="perp", lora_rank=2), store)
    m = perp["metrics"]
    assert m["dense_accuracy"] > 60, "pretraining on digits should learn something in 4 epochs"
    assert m["sparsity"] == pytest.approx(0.8, abs=1e-4), "masked LoRA merge must keep the sparsity"
    assert m["sparsity_with_adapters"] == m["sparsity"]  # merged: no adapter left
    assert perp["schedule"] == {
        "warmup": 0.1,
        "warmup_shape": "half-cosine",
        "allr_norm": "all parameters",
        "ft_lr": pytest.approx(0.1 * 0.5 / (4 * 5)),
        "nesterov": True,
        "lora": "masked",
    }
    assert 0 < m["trainable_share"] < 1 and m["accuracy"] > m["pruned_accuracy"]
    assert perp["timings"]["epoch_time_s"] > 0 and not perp["reused"]
    pre = store.records("vision-pretrain")
    assert len(pre) == 1 and (shared / "cache" / "vision").is_dir()
    assert pre[0]["weights"] == f"vision/pretrained-{pre[0]['key']}.pt"  # a key, never a machine path
    assert str(shared) not in json.dumps(pre[0])
    plain = run_vision(BASE.replace(retrain="perp", lora="plain", lora_rank=2), store)
    assert plain["metrics"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert plain["metrics"]["sparsity_with_adapters"] < plain["metrics"]["sparsity"]
    assert plain["metrics"]["trainable_share"] == m["trainable_share"]
    full = run_vision(BASE.replace(retrain="full"), store)
    assert full["pretrain_key"] == perp["pretrain_key"] and len(store.records("vision-pretrain")) == 1
    assert full["metrics"]["trainable_share"] == 1.0 and full["metrics"]["sparsity"] == pytest.approx(0.8, abs=1e-4)
    recal = run_vision(BASE.replace(retrain="bn-recalibrate"), store)
    assert recal["metrics"]["trainable_share"] == 0.0
    assert recal["metrics"]["pruned_accuracy"] == perp["metrics"]["pruned_accuracy"]
    assert run_vision(BASE.replace(retrain="perp", lora_rank=2), store)["reused"]
    # a second results store finds the cached weights and evaluates them instead of pretraining
    other = ResultStore(shared / "other")
    again = run_vision(BASE.replace(retrain="none"), other)
    assert other.records("vision-pretrain")[0]["from_cache"]
    assert again["metrics"]["dense_accuracy"] == perp["metrics"]["dense_accuracy"]
    table = accuracy_table(accuracy_frame([perp, plain, full, recal]), epochs=1)
    assert list(table["method"]) == ["Dense", "Full IMP", "PERP (r=2)", "PERP masked (r=2)", "BN-Recalibrate",
                                     "No retraining"]  # fmt: skip
    assert list(table.columns) == ["method", "% trainable", "Δ sparsity (pp)", "80%"]


def test_allr_inputs_are_the_norm_drop_over_all_parameters(store):
    perp = run_vision(BASE.replace(retrain="perp", lora_rank=2), store)
    dense, _ = pretrained_model(BASE.pretrain_config(), store)
    before = {k: p.detach().clone() for k, p in dense.named_parameters()}
    weights = prunable_weights(dense)
    alive = sum(int((w != 0).sum()) for w in weights.values())
    prune_(dense, 0.8)
    removed = alive - sum(int((w != 0).sum()) for w in prunable_weights(dense).values())
    num = sum(float((before[k] - p.detach()).pow(2).sum()) for k, p in dense.named_parameters())
    den = sum(float(v.pow(2).sum()) for v in before.values())  # BatchNorm and biases included
    change = (num / den) ** 0.5
    assert perp["cycles"][0]["relative_change"] == pytest.approx(change, rel=1e-6)
    d = min(1.0, max(change / (removed / alive) ** 0.5, 1 / 4))
    assert perp["metrics"]["allr_factor"] == pytest.approx(d, rel=1e-6)
    prunable_only = relative_change({k: before[k] for k in weights}, prunable_weights(dense))
    assert prunable_only > change  # the official code's choice is visible in the number


def test_missing_pretrained_weights_are_recomputed(store, shared, capsys):
    cfg = BASE.replace(retrain="none", seed=3)
    first = run_vision(cfg, store)
    weights = shared / "cache" / "vision" / f"pretrained-{first['pretrain_key']}.pt"
    weights.unlink()
    again = run_vision(cfg, store, force=True)
    assert "missing from the cache" in capsys.readouterr().out and weights.exists()
    assert again["metrics"]["dense_accuracy"] == first["metrics"]["dense_accuracy"]


@pytest.mark.slow
def test_magnitude_conservation_cycles(store):
    cfg = BASE.replace(retrain="full", sparsity=0.9, cycles=2, epochs=2)
    full = run_vision(cfg, store)
    frozen = run_vision(cfg.replace(freeze="unfreeze", reverse=True), store)
    assert [c["sparsity"] for c in frozen["cycles"]] == pytest.approx([1 - 0.1**0.5, 0.9])
    assert frozen["metrics"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0 < frozen["metrics"]["trainable_share"] < 1 and full["metrics"]["trainable_share"] == 1.0
    t = table12([full, frozen])
    assert list(t.columns) == ["unfreeze", "reverse", "% agg. trainable", "Δ acc, 2 cycles"]
    assert t["Δ acc, 2 cycles"].iloc[0] == pytest.approx(
        round(frozen["metrics"]["accuracy"] - full["metrics"]["accuracy"], 2)
    )


def test_cli_run_and_errors(store, tmp_path, capsys):
    out = tmp_path / "run.json"
    args = vcli.build_parser().parse_args(
        ["--model", "resnet-tiny", "--data", "digits", "--prune", "global", "--sparsity", "0.9", "--retrain",
         "linear-probing", "--epochs", "1", "--pretrain-epochs", "4", "--batch-size", "64", "--train-subset", "300",
         "--test-subset", "300", "--results", str(store.root), "--json", str(out)]
    )  # fmt: skip
    record = vcli.run_from_args(args)
    assert json.loads(out.read_text())["metrics"]["accuracy"] == record["metrics"]["accuracy"]
    assert record["config"]["lr"] == 0.1 and "dense" in capsys.readouterr().out
    assert vcli.main(["--sparsity", "1.0"]) == 2
    assert "sparsity must be" in capsys.readouterr().err
    assert vcli.main(["--data", "imagenet", "--data-root", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_add_vision_args_to_a_parser_with_shared_options():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prune", default="none", choices=["none", "magnitude", "wanda", "sparsegpt"])
    vcli.add_vision_args(parser)
    args = parser.parse_args(["--model", "resnet18", "--prune", "magnitude", "--sparsity", "0.5"])
    cfg = vcli.config_from_args(args)
    assert cfg.lr == 0.1 and cfg.prune == "global" and cfg.sparsity == 0.5 and cfg.model == "resnet18"
    assert vcli.config_from_args(parser.parse_args(["--model", "resnet18", "--prune", "lamp"])).prune == "lamp"
    assert vcli.is_vision_model("resnet50") and not vcli.is_vision_model("smollm2-135m")


@pytest.mark.parametrize("bad, match", [
    ({"sparsity": 1.0}, "sparsity must be"),
    ({"retrain": "lora"}, "retrain must be one of"),
    ({"model": "vgg16"}, "model must be one of"),
    ({"data": "imagenet"}, "needs data_root"),
    ({"freeze": "unfreeze", "retrain": "perp"}, "applies to retrain 'full'"),
    ({"epochs": 0, "retrain": "perp"}, "needs epochs >= 1"),
    ({"prune": "none"}, "keeps the model dense"),
    ({"lora": "dense"}, "lora must be one of"),
    ({"lora": "plain", "cycles": 2}, "cannot start another"),
    ({"nesterov": 1}, "nesterov must be"),
])  # fmt: skip
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**bad)

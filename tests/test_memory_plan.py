"""`perp plan`: peak memory per device from a configuration alone (issue 11).

Oracles: the parameter accounting equals what a real run marks trainable on the real model; the
activation count on a narrow copy equals the count at the real width; the arithmetic of the
components and of the split over GPUs; the paper's statement that PERP retrains OPT-30B on one
80 GB GPU while full retraining needs several. The estimate against measured peaks is
benchmarks/plan_vs_measured.py (and the slow test at the end).
"""

from __future__ import annotations

import json

import pytest
import torch

from perplib import memory as plan
from perplib.memory import GiB, PlanSpec, estimate, plan_method


def _folder(tmp_path, **values):
    from transformers import LlamaConfig

    config = LlamaConfig(**values)
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_parameter_accounting_matches_a_real_run():
    """Frozen / trained / mask counts of the plan equal those of the real tiny model set up by a run."""
    from perplib.config import retrain_groups
    from perplib.models import load_model

    for retrain, kind in (("perp", "masked"), ("full", "masked"), ("ln", "plain"), ("norms+lora", "plain")):
        spec = PlanSpec(model="tiny-opt", dtype="float32", seqlen=32, retrain=retrain, lora=kind)
        groups = retrain_groups(retrain)
        shape = plan.model_shape(spec, groups, kind)
        model, _ = load_model("tiny-opt")
        from perplib.pruning import prune_

        prune_(model, "magnitude", 0.5)
        marked = plan.mark_as_run(model, groups, spec, kind)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        parts = [shape.embed, *shape.blocks, shape.tail]
        assert sum(p.trained for p in parts) == trained, retrain
        assert sum(p.frozen for p in parts) == frozen, retrain
        masks = sum(m.numel() for m in marked.masks.values())
        from perplib.lora import lora_layers

        masks += sum(
            int(layer.lora_mask.numel())
            for layer in lora_layers(model).values()
            if getattr(layer, "lora_mask", None) is not None
        )
        assert sum(p.masks for p in parts) == masks, retrain


def test_activation_count_on_a_narrow_copy_equals_the_full_width(tmp_path, monkeypatch):
    folder = _folder(tmp_path, hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=320, max_position_embeddings=256)  # fmt: skip
    spec = PlanSpec(model=folder, dtype="float32", seqlen=64)
    plan._activations_cached.cache_clear()
    narrow = plan.activation_profile(spec, ("biases", "norms", "head", "lora"), "plain")
    assert narrow.width_factor == 4
    monkeypatch.setattr(plan, "_MAX_FACTOR", 1)
    plan._activations_cached.cache_clear()
    wide = plan.activation_profile(spec, ("biases", "norms", "head", "lora"), "plain")
    plan._activations_cached.cache_clear()
    assert wide.width_factor == 1
    assert narrow.block == pytest.approx(wide.block, rel=0.02)
    assert narrow.block_input == wide.block_input == 512 * 4
    # LLaMA block, fp32, plain LoRA on all 7 linears (r = 16): 9h + 4i floats of activations,
    # fewer for grouped-query k and v, plus each adapter's r-wide intermediate
    assert 4 * (7 * 512 + 4 * 1376) < wide.block < 4 * (9 * 512 + 4 * 1376 + 7 * 16) * 1.01


def test_components_add_up_and_split_over_gpus():
    spec = PlanSpec(model="smollm2-135m", dtype="bfloat16", seqlen=512, batch_size=2, gpus=4, gpu_memory=GiB)
    p = plan_method(spec, "full")
    assert p.total == sum(p.components.values())
    assert p.components["optimizer"] == 2 * p.components["gradients"] == 2 * p.components["trainable"]
    assert len(p.per_device) == 4 and max(p.per_device) < p.total
    assert sum(p.per_device) >= p.total  # the per-device workspace counts on every device
    one = plan_method(plan.PlanSpec(**{**spec.__dict__, "gpus": 1}), "full")
    assert one.total == p.total and one.per_device == [p.total]
    # no retraining: the weights and an evaluation forward only
    none = plan_method(spec, "none")
    assert none.components["gradients"] == none.components["optimizer"] == none.components["activations"] == 0


def test_checkpointing_and_batch_scale_the_activations():
    base = PlanSpec(model="smollm2-135m", dtype="float32", seqlen=256, batch_size=1)
    off = plan_method(base, "perp").components["activations"]
    on = plan_method(PlanSpec(**{**base.__dict__, "grad_checkpointing": True}), "perp").components["activations"]
    double = plan_method(PlanSpec(**{**base.__dict__, "batch_size": 2}), "perp").components["activations"]
    assert on < off / 5
    assert double == pytest.approx(2 * off, rel=0.01)


def test_opt_30b_perp_fits_one_80gib_gpu_and_full_imp_does_not():
    """Section 3.2: PERP retrains OPT-30B on one A100-80GB (bf16, checkpointing, batch 1 for 30B
    per Appendix A); full retraining needs several GPUs."""
    spec = PlanSpec(model="facebook/opt-30b", dtype="bfloat16", batch_size=1, grad_checkpointing=True, lora="plain")
    result = estimate(spec, compare=("full",))
    assert result.requested.gpus_needed == 1
    assert result.methods["full"].gpus_needed >= 7  # 16 bytes per parameter alone: 30B x 16 B = 447 GiB
    assert result.summary.startswith(
        "opt-30b, bfloat16, seqlen 2048, batch 1, checkpointing: PERP (plain LoRA) fits one 80 GiB GPU"
    )
    assert "Full IMP needs" in result.summary and "pruning (sparsegpt, 128 x 2048) fits one GPU" in result.summary
    assert result.prune.host_weights == pytest.approx(29.97e9 * 2, rel=0.01)


def test_cli_plan_writes_the_plan_and_plans_for_gpus_it_does_not_have(tmp_path, capsys):
    from perplib.cli import main

    out = tmp_path / "plan.json"
    gpus = torch.cuda.device_count() + 3
    argv = ["plan", "--model", "smollm2-135m", "--seqlen", "256", "--gpus", str(gpus), "--gpu-memory", "1GiB",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("smollm2-135m, bfloat16, seqlen 256, batch 2: PERP (masked LoRA)")
    record = json.loads(out.read_text())
    assert record["config"]["gpus"] == gpus and record["config"]["gpu_memory"] == GiB
    assert len(record["requested"]["per_device"]) == gpus
    assert set(record["requested"]["components"]) == set(plan.COMPONENTS)
    assert record["summary"] == printed.splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu-memory", "eighty"], "--gpu-memory must be a positive memory size such as 80GiB"),
        (["--model", "acme/no-such-model"], "cannot read the configuration of 'acme/no-such-model' offline"),
        (["--seqlen", "9000"], "seqlen 9000 exceeds the context length of smollm2-135m"),
        (["--gpus", "0"], "gpus must be an integer >= 1, got 0"),
        (["--headroom", "1.5"], "headroom must be in [0, 1), got 1.5"),
        (["--retrain", "everything"], "retrain must be a preset"),
    ],
)
def test_cli_plan_errors(argv, message, capsys):
    from perplib.cli import main

    assert main(["plan", "--model", "smollm2-135m", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "offline" in message:
        assert "config.json" in err and "--model" in err


def test_a_local_config_folder_is_enough(tmp_path):
    folder = _folder(tmp_path, hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)  # fmt: skip
    p = estimate(PlanSpec(model=folder, dtype="float32"), compare=())
    assert p.shape["layers"] == 3 and p.shape["context"] == 128
    assert p.requested.components["weights"] > 0


@pytest.mark.slow
def test_estimate_within_25_percent_of_the_measured_peak(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "rows.json"
    script = Path(__file__).parents[1] / "benchmarks" / "plan_vs_measured.py"
    subprocess.run([sys.executable, str(script), "--model", "tiny-llama", "--seqlen", "128", "--methods",
                    "full,perp-masked", "--checkpointing", "off", "--threads", "1", "--json", str(out)], check=True)  # fmt: skip
    for row in json.loads(out.read_text())["rows"]:
        assert 0.75 <= row["ratio"] <= 1.25, row


def test_default_seqlen_is_what_a_run_resolves(tmp_path):
    """No --seqlen: the model's context capped at 4096, as experiments.resolve does for seqlen None."""
    folder = _folder(tmp_path, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=32768)  # fmt: skip
    assert estimate(PlanSpec(model=folder, dtype="float32"), compare=()).seqlen == 4096
    assert estimate(PlanSpec(model=folder, dtype="float32", seqlen=512), compare=()).seqlen == 512

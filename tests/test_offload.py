"""Models larger than one device: accelerate device maps with CPU and disk offload (issue 11).

Every path runs on the CPU with tiny random models: a device map with a CPU budget, or an explicit
map, forces blocks onto ``disk`` (accelerate's meta tensors + pre-forward loading); the CPU-offload
store that GPU machines use (a dict of CPU tensors behind the same hooks) is built the way
``accelerate.dispatch_model`` builds it. The oracle is the same model pruned in memory: pruning an
offloaded model must give bit-identical weights, and those weights must be in the offload store
(and in a checkpoint saved from it), not in a temporary copy.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from perplib import offload
from perplib.models import load_model, max_memory_for, parse_size, resolve_device_map
from perplib.pruning import prune_

MAPS = {  # the tied embedding and head stay together on the CPU; blocks and norms go to disk
    "llama": {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.norm": "disk", "lm_head": "cpu",
    },
    "opt": {  # block 0 and the learned positions on disk: the truncated capture forward loads them
        "model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "disk",
        "model.decoder.final_layer_norm": "cpu", "model.decoder.layers.0": "disk", "model.decoder.layers.1": "cpu",
        "lm_head": "cpu",
    },
}  # fmt: skip
MAPS["mixtral"] = MAPS["llama"]  # fused 3-D expert tensors offloaded to disk, pruned through their views


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """tiny-llama, tiny-opt and tiny-mixtral saved as Hugging Face checkpoints (what from_pretrained offloads from)."""
    out = {}
    for family in MAPS:
        model, _ = load_model(f"tiny-{family}")
        path = tmp_path_factory.mktemp(f"ckpt-{family}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


def _calibration() -> torch.Tensor:
    return torch.randint(0, 2000, (6, 24), generator=torch.Generator().manual_seed(0))


def _digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear weight (and fused 3-D expert tensor) of the decoder blocks, loaded from wherever it lives."""
    from perplib.adapters import adapter_for

    adapter, out = adapter_for(model), {}
    for i, block in enumerate(adapter.blocks(model)):
        with offload.materialized(block, "cpu"):
            for name, m in block.named_modules():
                if isinstance(m, nn.Linear):
                    out[f"{adapter.block_prefix(i)}.{name}"] = m.weight.detach().clone()
            for name, p in block.named_parameters():
                if p.ndim == 3:
                    out[f"{adapter.block_prefix(i)}.{name}"] = p.detach().clone()
    return out


@pytest.mark.parametrize("family", list(MAPS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruning_a_disk_offloaded_model_matches_in_memory_pruning(checkpoints, tmp_path, family, method):
    path = checkpoints[family]
    before = _digest(path)
    reference, _ = load_model(str(path))
    model, _ = load_model(str(path), device_map=MAPS[family], offload_folder=tmp_path / "offload")
    assert offload.is_offloaded(model) and any(p.device.type == "meta" for p in model.parameters())

    calib = None if method == "magnitude" else _calibration()
    expected = prune_(reference, method, "2:4" if method == "wanda" else 0.5, calib)
    report = prune_(model, method, "2:4" if method == "wanda" else 0.5, calib)

    assert report.layers == expected.layers
    got, want = _weights(model), _weights(reference)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # offloaded weights are meta again between forwards, and the forward reads the pruned ones
    on_disk = next(k for k, v in MAPS[family].items() if v == "disk" and "layers" in k)
    assert all(p.device.type == "meta" for p in model.get_submodule(on_disk).parameters())
    ids = _calibration()[:2]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # the pruned weights went to the offload folder; the checkpoint it was loaded from is untouched
    assert _digest(path) == before
    written = json.loads((tmp_path / "offload" / "index.json").read_text())
    assert any(k.endswith("proj.weight") or k.endswith("fc1.weight") for k in written)


def test_saved_offloaded_model_reloads_with_the_pruned_weights(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from perplib.pruning import save_pruned

    path = checkpoints["llama"]
    model, tok = load_model(str(path), device_map=MAPS["llama"], offload_folder=tmp_path / "offload")
    report = prune_(model, "wanda", 0.5, _calibration())
    save_pruned(model, tok, tmp_path / "pruned", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    weights = _weights(model)
    for name, lin in reloaded.named_modules():
        if name in weights:
            assert torch.equal(lin.weight, weights[name]), name
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5)


def test_cpu_offload_store_receives_the_pruned_weights():
    """On a GPU machine a device map's 'cpu' modules are offloaded: meta tensors, a dict of CPU
    tensors as the store (accelerate.dispatch_model's OffloadedWeightsLoader(state_dict=...)).
    Built here the same way, with the CPU as execution device."""
    from accelerate.hooks import attach_align_device_hook_on_blocks
    from accelerate.utils import OffloadedWeightsLoader

    reference, _ = load_model("tiny-llama")
    model, _ = load_model("tiny-llama")
    names = ["model.layers.0", "model.layers.1"]
    store = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    attach_align_device_hook_on_blocks(
        model, execution_device=dict.fromkeys(names, torch.device("cpu")), offload=dict.fromkeys(names, True),
        weights_map=OffloadedWeightsLoader(state_dict=store),
    )  # fmt: skip
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"

    prune_(reference, "sparsegpt", 0.6, _calibration())
    prune_(model, "sparsegpt", 0.6, _calibration())
    for name, lin in reference.named_modules():
        if isinstance(lin, nn.Linear) and name.startswith("model.layers."):
            assert torch.equal(store[f"{name}.weight"], lin.weight), name
    ids = _calibration()[:2]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_tiny_model_dispatched_by_a_cpu_budget_prunes_and_evaluates(tmp_path):
    """load_model's 'auto' map under a CPU budget sends the blocks to disk (accelerate's .dat files)."""
    from perplib.evaluation import perplexity

    budget = {"cpu": 12_800_000}  # tiny-llama's tied embedding (12.6 MB) fits, the blocks do not
    resolved = resolve_device_map("tiny-llama", device_map="auto", max_memory=budget)
    assert "disk" in resolved.values() and resolved.get("lm_head", "cpu") == "cpu"
    reference, _ = load_model("tiny-llama")
    model, _ = load_model("tiny-llama", device_map="auto", max_memory=budget, offload_folder=tmp_path)
    assert offload.is_offloaded(model.model.layers[1])
    prune_(reference, "wanda", 0.5, _calibration())
    prune_(model, "wanda", 0.5, _calibration())
    ids = torch.arange(200) % 1000
    assert perplexity(model, ids, 20)["perplexity"] == pytest.approx(
        perplexity(reference, ids, 20)["perplexity"], rel=1e-6
    )
    # accelerate's .dat copy of a pruned weight is replaced by the pruned safetensors file
    assert (tmp_path / "model.layers.1.mlp.up_proj.weight.safetensors").exists()
    assert not (tmp_path / "model.layers.1.mlp.up_proj.weight.dat").exists()


def test_materialized_restores_a_plain_module_and_keeps_its_parameters():
    lin = nn.Linear(4, 3)
    weight = lin.weight
    with offload.materialized(lin, "cpu", write_back=True) as m:
        m.weight.data.zero_()
    assert lin.weight is weight and not lin.weight.any()


def test_materialized_writes_nothing_back_when_the_block_fails(checkpoints, tmp_path):
    model, _ = load_model(str(checkpoints["llama"]), device_map=MAPS["llama"], offload_folder=tmp_path)
    block = model.model.layers[1]
    with offload.materialized(block, "cpu"):
        before = block.mlp.up_proj.weight.clone()
    with pytest.raises(RuntimeError, match="boom"), offload.materialized(block, "cpu", write_back=True):
        block.mlp.up_proj.weight.data.zero_()
        raise RuntimeError("boom")
    with offload.materialized(block, "cpu"):
        assert torch.equal(block.mlp.up_proj.weight, before)
    assert block.mlp.up_proj.weight.device.type == "meta"


# --- bad input: each a clear, early error naming the value ----------------------------------------


def test_device_map_that_leaves_a_pruned_block_on_no_device():
    partial = {k: v for k, v in MAPS["llama"].items() if k != "model.layers.1"}
    with pytest.raises(ValueError, match=r"leaves the pruned block 'model.layers.1' on no device"):
        resolve_device_map("tiny-llama", device_map=partial)


@pytest.mark.parametrize("device", ["cuda:7", 5, "gpu0", "meta"])
def test_device_map_names_a_device_this_machine_lacks(device):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    with pytest.raises(ValueError, match=r"device_map\['model.layers.0'\]"):
        resolve_device_map("tiny-llama", device_map={**MAPS["llama"], "model.layers.0": device})


def test_disk_map_without_offload_folder():
    with pytest.raises(ValueError, match=r"on disk: pass offload_folder / --offload-folder"):
        load_model("tiny-llama", device_map=MAPS["llama"])


def test_gpus_beyond_those_present():
    present = torch.cuda.device_count()
    with pytest.raises(ValueError, match=rf"--gpus {present + 1} but this machine has {present} visible GPU"):
        max_memory_for(gpus=present + 1)


@pytest.mark.parametrize("bad", ["eighty", "80 gigs", "-1GiB", "0", "GiB"])
def test_gpu_memory_not_a_size(bad):
    with pytest.raises(ValueError, match=rf"--gpu-memory must be a positive memory size .*got '{bad}'"):
        parse_size(bad, "--gpu-memory")


def test_sizes():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("79GB") == 79 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 2**40)
    assert parse_size(4096) == 4096
    assert max_memory_for(gpus=0, cpu_memory="2GiB") == {"cpu": 2 * 2**30}


def test_cli_prunes_and_evaluates_an_offloaded_model(checkpoints, tmp_path, capsys):
    from perplib.cli import main

    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps(MAPS["llama"]))
    out = tmp_path / "r.json"
    argv = ["prune", "--model", str(checkpoints["llama"]), "--method", "magnitude", "--sparsity", "0.5",
            "--eval", "wiki-vital", "--seqlen", "32", "--windows", "2", "--device", "cpu",
            "--device-map", str(device_map), "--offload-folder", str(tmp_path / "off"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["metrics"]["sparsity"] == pytest.approx(0.5)
    plain = tmp_path / "plain.json"
    assert main(argv[:-6] + ["--json", str(plain), "--force"]) == 0
    assert json.loads(plain.read_text())["metrics"]["perplexity"] == pytest.approx(record["metrics"]["perplexity"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device-map", "everywhere"], "--device-map must be one of"),
        (["--gpus", "99"], "--gpus 99 but this machine has"),
        (["--gpu-memory", "lots"], "--gpu-memory must be a positive memory size"),
        (["--offload-folder", "x"], "--offload-folder needs a device map"),
        (["--cpu-memory", "12MB", "--retrain", "perp", "--steps", "1"], "retraining needs every weight resident"),
    ],
)
def test_cli_placement_errors(extra, message, capsys, tmp_path):
    from perplib.cli import main

    argv = ["run", "--model", "tiny-llama", "--prune", "magnitude", "--device", "cpu", *extra]
    if "--cpu-memory" in extra:
        argv += ["--offload-folder", str(tmp_path / "off")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err

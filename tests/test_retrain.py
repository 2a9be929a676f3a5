"""Retraining after pruning: every method on tiny random LLaMA and OPT keeps every zero, trains
exactly the parameters it names (hand counts), leaves the rest bit-identical, and merges exactly."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn

from perplib import lora, retrain
from perplib.adapters import adapter_for
from perplib.config import RETRAIN_GROUPS, RunConfig
from perplib.models import tiny_model
from perplib.results import ResultStore

FAMILIES = ("llama", "opt")
VOCAB, HIDDEN, RANK = 128, 64, 4


def magnitude_prune_(model: nn.Module, ratio: float = 0.5) -> None:
    for module in adapter_for(model).prunable(model).values():
        w = module.weight.data
        w.view(-1)[w.abs().view(-1).argsort()[: int(ratio * w.numel())]] = 0.0


def pruned(family: str) -> nn.Module:
    model = tiny_model(family)
    magnitude_prune_(model)
    return model


def hand_counts(family: str) -> dict[str, int]:
    """Group sizes of the tiny configurations in perplib.models, counted by hand."""
    if family == "llama":  # 2 blocks; q,o 64->64; k,v 64->32 (2 kv heads); gate,up 64->128; down 128->64
        lora_per_block = (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3
        return {"biases": 0, "norms": (2 * 2 + 1) * HIDDEN, "lora": 2 * RANK * lora_per_block}
    # OPT: q,k,v,out 64->64 with biases; fc1 64->128, fc2 128->64 with biases; LayerNorms with biases
    lora_per_block = (64 + 64) * 4 + (64 + 128) * 2
    return {
        "biases": 2 * (4 * 64 + 128 + 64),
        "norms": (2 * 2 + 1) * 2 * HIDDEN,
        "lora": 2 * RANK * lora_per_block,
    }


def expected_counts(family: str, groups: tuple[str, ...], head: str) -> dict[str, int]:
    counts = hand_counts(family)
    head_count = RANK * (HIDDEN + VOCAB) if head == "lora" else VOCAB * HIDDEN
    return {g: head_count if g == "head" else counts[g] for g in groups}


def windows(n: int = 16, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


SETTINGS = retrain.TrainSettings(steps=3, lr=1e-2, batch_size=2, grad_accum=2, warmup=0.0)
IDS = windows(2, 12, seed=7)
METHODS = [  # (groups, head mode, LoRA kind)
    (("biases",), "lora", "masked"),
    (("biases", "norms"), "lora", "masked"),
    (("biases", "norms", "head"), "lora", "masked"),
    (("biases", "norms", "head"), "lora", "plain"),
    (("biases", "norms", "head"), "full", "masked"),
    (("biases", "norms", "head", "lora"), "lora", "masked"),
    (("biases", "norms", "head", "lora"), "lora", "plain"),
    (("norms", "lora"), "full", "plain"),
]


# --- pure pieces --------------------------------------------------------------------------------


def test_lr_schedule_oracle():
    lrs = [retrain.lr_at(s, 20, 1.0, 0.1) for s in range(20)]
    assert lrs[:3] == [1 / 3, 2 / 3, 1.0]  # warmup over round(0.1 * 20) = 2 steps
    assert lrs[3] == pytest.approx(17 / 18) and lrs[-1] == pytest.approx(1 / 18)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert [retrain.lr_at(s, 4, 2.0, 0.0) for s in range(4)] == [2.0, 1.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="step must be in"):
        retrain.lr_at(4, 4, 1.0)


def test_settings_validate():
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1, got 0"):
        retrain.TrainSettings(steps=1, grad_accum=0)
    with pytest.raises(ValueError, match="warmup must be in"):
        retrain.TrainSettings(steps=1, warmup=1.0)
    with pytest.raises(ValueError, match="groups must be"):
        retrain.mark_trainable_(pruned("llama"), ("biases", "emb"))
    with pytest.raises(ValueError, match="head must be one of"):
        retrain.mark_trainable_(pruned("llama"), ("head",), head="half")
    with pytest.raises(ValueError, match="need 12 training windows, got 4"):
        retrain.train_(pruned("llama"), windows(4), SETTINGS)


# --- the method matrix ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("groups", "head", "kind"), METHODS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_method_invariants(family, groups, head, kind):
    model = pruned(family)
    zeros = {n: m.weight == 0 for n, m in adapter_for(model).prunable(model).items()}
    embedding = model.get_input_embeddings().weight
    before = {id(p): (name, p.detach().clone()) for name, p in model.named_parameters()}
    torch.manual_seed(0)
    spec = lora.LoraSpec(kind=kind, rank=RANK, alpha=8)
    marked = retrain.mark_trainable_(model, groups, lora=spec, head=head)

    assert marked.counts == expected_counts(family, groups, head)
    assert retrain.count_parameters(model, trainable_only=True) == marked.trainable
    # the share counts the model as it trains: the adapters included
    assert marked.total == sum(p.numel() for _, p in before.values()) + lora.lora_parameter_count(model)

    retrain.train_(model, windows(), SETTINGS, progress=False)
    layers = lora.lora_layers(model)
    for name, layer in layers.items():  # trained adapters are non-zero, so the merge check can fail
        assert torch.count_nonzero(layer.lora_B["default"].weight) > 0, name
    for p in model.parameters():
        if id(p) in before:
            name, old = before[id(p)]
            if p.requires_grad:
                assert not torch.equal(p, old) or p.numel() == 0, f"{name} was trainable but did not change"
            else:
                assert torch.equal(p, old), f"frozen {name} changed"
    assert torch.equal(model.get_input_embeddings().weight, before[id(embedding)][1])
    for name, module in retrain.prunable_linears(model).items():  # after training
        assert bool((module.weight[zeros[name]] == 0).all()), name

    with torch.no_grad():
        unmerged = model(IDS).logits
    if kind == "masked" and layers:
        lora.merge_(model)
        assert not lora.lora_layers(model)
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, unmerged, atol=2e-5, rtol=1e-5)
    for name, module in retrain.prunable_linears(model).items():  # after merging
        assert torch.equal(module.weight == 0, zeros[name]), name
    assert torch.equal(model.get_input_embeddings().weight, before[id(embedding)][1])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_imp_enforces_the_mask_with_weight_decay(family):
    settings = retrain.TrainSettings(steps=3, lr=5e-2, batch_size=2, grad_accum=1, weight_decay=0.1, warmup=0.0)
    model = pruned(family)
    marked = retrain.mark_trainable_(model, ("full",))
    assert marked.counts == {"full": marked.total} and marked.share == 1.0
    dense_before = {n: m.weight.detach().clone() for n, m in adapter_for(model).prunable(model).items()}
    retrain.train_(model, windows(), settings, masks=marked.masks, progress=False)
    for name, module in adapter_for(model).prunable(model).items():
        kept = marked.masks[name]
        assert torch.equal(module.weight == 0, ~kept), name
        assert not torch.equal(module.weight[kept], dense_before[name][kept]), name
    # without enforcement the same run revives pruned weights: the check above can fail
    model = pruned(family)
    masks = retrain.mark_trainable_(model, ("full",)).masks
    retrain.train_(model, windows(), settings, progress=False)
    revived = sum(int((m.weight[~masks[n]] != 0).sum()) for n, m in adapter_for(model).prunable(model).items())
    assert revived > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_all_16_group_combinations_run(family):
    seen = []
    for r in range(len(RETRAIN_GROUPS) + 1):
        for combo in itertools.combinations(RETRAIN_GROUPS, r):
            model = pruned(family)
            retrain_name = "+".join(combo) if combo else "none"
            config = RunConfig(
                model=f"tiny-{family}", prune="magnitude", retrain=retrain_name, lora_rank=RANK, lora_alpha=8.0,
                lora_targets="all", steps=1, batch_size=1, grad_accum=1, seqlen=16, lr=1e-3,
            )  # fmt: skip
            out = retrain.retrain_(model, None, config, windows=windows(4), progress=False)
            m = out["metrics"]
            expected = expected_counts(family, combo, "lora")
            assert m["trainable_by_group"] == expected, retrain_name
            assert m["trainable_params"] == sum(expected.values())
            assert m["sparsity_before"] == m["sparsity_merged"] == 0.5
            assert m["lora_kind"] == ("masked" if {"lora", "head"} & set(combo) else None)
            seen.append(retrain_name)
    assert len(set(seen)) == 16


@pytest.mark.parametrize(
    ("family", "targets", "per_block"),
    [
        ("opt", "paper", 2 * (64 + 64)),  # q_proj and v_proj
        ("opt", "attention", 4 * (64 + 64)),
        ("llama", "paper", (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3),  # every linear
        ("llama", "qv", (64 + 64) + (64 + 32)),
    ],
)
def test_lora_target_sets(family, targets, per_block):
    config = RunConfig(model=f"tiny-{family}", prune="magnitude", retrain="perp", lora_rank=RANK, lora_alpha=8.0,
                       lora_targets=targets, steps=1, batch_size=1, grad_accum=1, seqlen=16, lr=1e-3)  # fmt: skip
    model = pruned(family)
    m = retrain.retrain_(model, None, config, windows=windows(4), progress=False)["metrics"]
    assert m["trainable_by_group"]["lora"] == 2 * RANK * per_block
    assert m["lora_targets"]["set"] == targets and m["lora_targets"]["resolved"] == {
        "paper": {"opt": "qv"}.get(family, "all")
    }.get(targets, targets)
    assert m["sparsity_before"] == m["sparsity_merged"] == 0.5
    with pytest.raises(ValueError, match="lora_targets must be one of"):
        config.replace(lora_targets="q")


def test_lora_targets_only_key_runs_with_a_lora_group():
    base = RunConfig(prune="magnitude", steps=2, lora_targets="qv")
    assert retrain.method_config(base, "linear-probing") == retrain.method_config(
        base.replace(lora_targets="all"), "linear-probing"
    )
    assert retrain.method_config(base, "perp").lora_targets == "qv"


# --- the experiment step ---------------------------------------------------------------------------


def config(**changes) -> RunConfig:
    base = dict(
        model="tiny-llama", prune="magnitude", retrain="perp", lora_rank=RANK, lora_alpha=8.0, lora_targets="all", steps=3,
        batch_size=2, grad_accum=2, seqlen=16, lr=1e-2, windows=2,
    )  # fmt: skip
    return RunConfig(**{**base, **changes})


@pytest.mark.parametrize("kind", ["masked", "plain"])
def test_retrain_accounting(kind):
    model = pruned("opt")
    out = retrain.retrain_(model, None, config(model="tiny-opt", lora=kind), windows=windows(), progress=False)
    m, t = out["metrics"], out["timings"]
    counts = expected_counts("opt", ("biases", "norms", "head", "lora"), "lora")
    assert m["lora_kind"] == kind and m["trainable_params"] == sum(counts.values())
    total = sum(p.numel() for p in pruned("opt").parameters()) + counts["lora"] + counts["head"]  # with adapters
    assert m["total_params"] == total and m["trainable_share"] == pytest.approx(sum(counts.values()) / total)
    prunable = sum(mod.weight.numel() for mod in adapter_for(model).prunable(pruned("opt")).values())
    assert m["sparsity_before"] == 0.5
    assert "sparsity_trained" not in m  # replaced by the two fields below, which say what they count
    # storage with the unmerged adapters counted: the LoRA matrices are stored parameters
    assert m["sparsity_with_adapters"] == pytest.approx(0.5 * prunable / (prunable + counts["lora"]))
    if kind == "masked":
        # the weights computed with are W + M ⊙ sBA: every zero kept, exactly sparsity_before
        assert m["sparsity_effective"] == m["sparsity_before"] == 0.5
        assert m["lora_merged"] and m["sparsity_merged"] == 0.5 and not lora.lora_layers(model)
    else:
        assert not m["lora_merged"] and m["sparsity_merged"] == m["sparsity_with_adapters"]
        layers = lora.lora_layers(model)
        assert layers
        # independent count: W + s·B·A of every prunable layer, dense wherever the adapter reaches
        zeros = total = 0
        for name, mod in retrain.prunable_linears(model).items():
            w = mod.weight.float()
            if name in layers:
                a, b = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
                w = w + layers[name].scaling["default"] * (b.float() @ a.float())
            zeros += int((w == 0).sum())
            total += w.numel()
        assert m["sparsity_effective"] == pytest.approx(zeros / total, abs=1e-12)
        assert m["sparsity_effective"] < 0.1  # trained B·A fills the zeros it reaches
    assert m["retrain_steps"] == 3 and m["train_tokens"] == 3 * 2 * 2 * 16
    assert m["train_tokens_per_s"] > 0 and t["train_s"] > 0 and len(out["history"]) == 3
    assert not any(p.requires_grad for p in model.parameters())


def test_retrain_is_reproducible_and_checkpointing_changes_nothing():
    results = []
    for checkpointing in (False, False, True):
        model = pruned("llama")
        retrain.retrain_(
            model, None, config(grad_checkpointing=checkpointing, lora="masked"), windows=windows(), progress=False
        )
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert all(torch.allclose(results[0][n], results[2][n], atol=1e-6) for n in results[0])


def test_eval_history_for_figure_3():
    model = pruned("llama")
    eval_ids = windows(1, 64, seed=3).view(-1)
    out = retrain.retrain_(
        model, None, config(steps=4), windows=windows(), eval_ids=eval_ids, eval_every=2, progress=False
    )
    tracked = [(h["step"], h["perplexity"]) for h in out["history"] if "perplexity" in h]
    assert [s for s, _ in tracked] == [0, 2, 4]
    assert all(v > 1 for _, v in tracked)
    assert retrain.final_perplexity(out["history"]) == tracked[-1][1]


def test_nonfinite_loss_stops_without_a_record(tmp_path):
    model = pruned("llama")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    store = ResultStore(tmp_path)
    cfg = config()
    with pytest.raises(retrain.Diverged, match=r"loss is nan at step 0 \(lr 0.01,"):
        store.run("llm", cfg, lambda: retrain.retrain_(model, None, cfg, windows=windows(), progress=False))
    assert store.get("llm", cfg) is None and not store.records()


def test_nonfinite_gradient_norm_stops_the_run():
    model = pruned("llama")
    retrain.mark_trainable_(model, ("norms",))
    # a finite loss whose gradient overflows: the loss guard alone would let this step through
    model.model.norm.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(retrain.Diverged, match=r"gradient norm is (nan|inf) at step 0 \(lr 0.01\)"):
        retrain.train_(model, windows(), SETTINGS, progress=False)
    assert model.model.norm.weight.grad is None  # the loop cleaned up


def test_nonfinite_evaluation_stops_the_run():
    values = [20.0, 10.0, float("nan")]
    model = pruned("llama")
    retrain.mark_trainable_(model, ("norms",))
    settings = retrain.TrainSettings(steps=3, lr=1e-2, batch_size=2, grad_accum=2, warmup=0.0, eval_every=1)
    with pytest.raises(retrain.Diverged, match=r"perplexity is nan after step 2 \(step 2, lr 0.00667\)"):
        retrain.train_(model, windows(), settings, evaluate=lambda: values.pop(0), progress=False)
    values = [float("inf")]
    with pytest.raises(retrain.Diverged, match="inf before any update"):
        retrain.train_(model, windows(), settings, evaluate=lambda: values.pop(0), progress=False)


@pytest.mark.parametrize("eval_every", [0, 1])
def test_cli_diverged_run_exits_2_and_records_nothing(text_file, tmp_path, capsys, eval_every):
    from perplib.cli import main

    results, out = tmp_path / "r", tmp_path / "run.json"
    rc = main(["run", "--model", "tiny-llama", "--prune", "magnitude", "--retrain", "perp", "--steps", "2",
               "--lr", "1e9", "--batch-size", "1", "--grad-accum", "1", "--seqlen", "32", "--windows", "2",
               "--calib", text_file, "--train", text_file, "--eval", text_file, "--eval-every", str(eval_every),
               "--results", str(results), "--json", str(out), "--save", str(tmp_path / "saved")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert re.fullmatch(r"perp run: error: training diverged: .* step \d \(lr [0-9.e+]+.*", err), err
    assert not list(results.rglob("*.json")) and not out.exists() and not (tmp_path / "saved").exists()


# --- bf16: every preset runs, merges, keeps every zero and evaluates -------------------------------

BF16_CASES = [  # (retrain, head, LoRA kind): every preset, both head modes, both LoRA kinds, joined groups
    ("none", "lora", "masked"),
    ("biases", "lora", "masked"),
    ("ln", "lora", "masked"),
    ("linear-probing", "lora", "masked"),
    ("linear-probing", "full", "masked"),
    ("perp", "lora", "masked"),
    ("perp", "lora", "plain"),
    ("perp", "full", "masked"),
    ("full", "lora", "masked"),
    ("norms+lora", "lora", "masked"),
    ("head+lora", "lora", "plain"),
    ("biases+head", "full", "masked"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "head", "kind"), BF16_CASES, ids=lambda v: v)
def test_bfloat16_every_preset(family, method, head, kind):
    from perplib.evaluation import perplexity

    model = pruned(family).to(torch.bfloat16)
    zeros = {n: m.weight == 0 for n, m in retrain.prunable_linears(model).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}  # tied head too
    cfg = config(model=f"tiny-{family}", retrain=method, head=head, lora=kind, dtype="bfloat16", steps=2)
    eval_ids = windows(1, 64, seed=3).view(-1)
    out = retrain.retrain_(model, None, cfg, windows=windows(), eval_ids=eval_ids, eval_every=1, progress=False)

    tracked = [h["perplexity"] for h in out["history"] if "perplexity" in h]
    assert len(tracked) == (1 if method == "none" or out["metrics"]["trainable_params"] == 0 else 3)
    assert all(math.isfinite(v) and v > 1 for v in tracked)
    for name, module in retrain.prunable_linears(model).items():  # every zero kept, through the merge
        assert bool((module.weight[zeros[name]] == 0).all()), name
    adapters = lora.lora_layers(model)
    uses_lora = retrain.uses_lora(cfg)
    assert bool(adapters) == (uses_lora and kind == "plain")  # masked LoRA is merged, plain stays
    assert out["metrics"]["sparsity_before"] == 0.5
    assert (out["metrics"]["sparsity_merged"] == 0.5) == (not adapters)
    # the model leaves training as it entered: bf16 weights; plain LoRA adapters kept in fp32 (as peft)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else torch.bfloat16), name
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    changed += [n for n, p in model.named_parameters() if "lora_B" in n and bool(p.count_nonzero())]  # unmerged
    assert bool(changed) == (out["metrics"]["trainable_params"] > 0), changed
    final = perplexity(model, eval_ids, cfg.seqlen, windows=cfg.windows)["perplexity"]
    assert math.isfinite(final) and final == pytest.approx(tracked[-1], rel=0.02)


def test_half_precision_parameters_train_in_fp32_and_return_to_bf16():
    model = pruned("llama").to(torch.bfloat16)
    retrain.mark_trainable_(model, ("norms", "lora"), lora=lora.LoraSpec(rank=RANK, alpha=8))
    norm, seen = model.model.norm.weight, []
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_pre_hook(lambda *_: seen.append((norm.dtype, layer.lora_A["default"].weight.dtype)))
    retrain.train_(model, windows(), SETTINGS, progress=False)
    assert set(seen) == {(torch.float32, torch.float32)}  # fp32 master copies while training
    assert norm.dtype == torch.bfloat16 and layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    # updates far below bf16's resolution accumulate in the fp32 copy: 3 steps of lr 1e-6 on weights
    # near 1 (bf16 step there: 2^-7) would each round away; the fp32 master copy is exact to 1e-7
    model = pruned("llama").to(torch.bfloat16)
    retrain.mark_trainable_(model, ("norms",))
    weight = model.model.norm.weight
    start = weight.detach().float().clone()
    masters = []
    model.model.norm.register_forward_pre_hook(lambda *_: masters.append(weight.detach().clone()))
    retrain.train_(model, windows(), retrain.TrainSettings(steps=3, lr=1e-6, batch_size=2, grad_accum=2, warmup=0),
                   progress=False)  # fmt: skip
    assert masters[-1].dtype == torch.float32 and not torch.equal(masters[-1], start)


def test_float16_on_cpu_fails_early(tmp_path, capsys):
    from perplib.cli import main

    with pytest.raises(ValueError, match="dtype float16 needs a CUDA GPU.*bfloat16"):
        retrain.train_(pruned("llama").to(torch.float16), windows(), SETTINGS, progress=False)
    rc = main(["run", "--model", "tiny-llama", "--dtype", "float16", "--device", "cpu", "--prune", "magnitude",
               "--results", str(tmp_path / "r")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "dtype float16 needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "r").rglob("*.json"))


# --- slow: the embedded model ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["masked", "plain"])
def test_embedded_retraining_lowers_heldout_perplexity(kind):
    from perplib.data import eval_ids
    from perplib.evaluation import perplexity
    from perplib.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    magnitude_prune_(model, 0.5)
    ids = eval_ids(tokenizer, "wiki-vital")
    before = perplexity(model, ids, 128, windows=16)["perplexity"]
    cfg = RunConfig(
        prune="magnitude", retrain="perp", lora=kind, steps=12, batch_size=2, grad_accum=1, seqlen=128, lr=5e-4
    )
    out = retrain.retrain_(model, tokenizer, cfg, progress=False)
    after = perplexity(model, ids, 128, windows=16)["perplexity"]
    assert after < 0.9 * before, (before, after)
    m = out["metrics"]
    stored = sum(mod.weight.numel() for mod in retrain.prunable_linears(model).values())
    lora_params = m["trainable_by_group"]["lora"] if kind == "plain" else 0  # unmerged adapters are stored too
    assert m["sparsity_merged"] == pytest.approx(0.5 * stored / (stored + lora_params), abs=1e-4)


# --- configuration helpers, the pipeline and the CLI ------------------------------------------------


def test_canonical_names_and_combinations():
    assert retrain.canonical_retrain(("norms", "biases")) == "ln"
    assert retrain.canonical_retrain(("lora", "norms")) == "norms+lora"
    assert retrain.canonical_retrain(()) == "none"
    assert len(retrain.group_combinations()) == 16 and retrain.group_combinations()[0] == ()
    without = retrain.group_combinations(include_biases=False)
    assert len(without) == 8 and not any("biases" in c for c in without)


def test_method_config_resets_what_cannot_matter():
    base = RunConfig(prune="magnitude", steps=20, lr=5e-4, lora="plain", lora_rank=8, head="full", eval_every=5)
    none = retrain.method_config(base, "none")
    assert none == RunConfig(prune="magnitude")  # the shared no-retraining run keys identically everywhere
    assert retrain.method_config(base, "ln") == RunConfig(
        prune="magnitude", retrain="ln", steps=20, lr=5e-4, eval_every=5
    )
    perp = retrain.method_config(base, ("lora", "norms", "biases", "head"))
    assert (perp.retrain, perp.lora, perp.lora_rank, perp.head) == ("perp", "plain", 8, "full")
    assert retrain.method_config(base.replace(steps=0), "perp").retrain == "none"


@pytest.fixture
def text_file(tmp_path):
    words = "the pruned model keeps every zero while low rank adapters learn what pruning removed".split()
    rng = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=rng))
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("kind", ["masked", "plain"])
def test_run_llm_records_the_retraining(text_file, tmp_path, kind):
    from perplib.experiments import run_llm

    cfg = RunConfig(
        model="tiny-llama", prune="magnitude", retrain="perp", lora=kind, steps=2, batch_size=1, grad_accum=1,
        seqlen=32, windows=2, calib=text_file, train=text_file, eval=text_file, lr=1e-3, eval_every=1,
    )  # fmt: skip
    record = run_llm(cfg, ResultStore(tmp_path / "store"), save=str(tmp_path / "saved"))
    m = record["metrics"]
    assert record["config"]["lora"] == kind and m["lora_kind"] == kind
    assert m["sparsity_before"] == 0.5 and (m["sparsity_merged"] == 0.5) == (kind == "masked")
    assert 0 < m["trainable_share"] < 1 and m["train_tokens_per_s"] > 0
    assert [h["step"] for h in record["history"] if "perplexity" in h] == [0, 1, 2]
    assert (tmp_path / "saved" / "adapter").exists() == (kind == "plain")


def test_cli_run(text_file, tmp_path, capsys):
    import json

    from perplib.cli import main

    common = ["--model", "tiny-opt", "--prune", "magnitude", "--sparsity", "0.5", "--seqlen", "32", "--windows", "2",
              "--calib", text_file, "--train", text_file, "--eval", text_file, "--results", str(tmp_path / "r")]  # fmt: skip
    out = tmp_path / "run.json"
    rc = main(["run", *common, "--retrain", "ln", "--steps", "2", "--batch-size", "1", "--grad-accum", "1",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["config"]["retrain"] == "ln" and record["metrics"]["trainable_params"] > 0
    assert "sparsity of the prunable layers 0.5000 before" in capsys.readouterr().out
    assert main(["run", *common, "--retrain", "perp"]) == 2
    assert "needs --steps" in capsys.readouterr().err
    assert main(["run", *common, "--retrain", "none", "--epochs", "1"]) == 2
    assert "apply to vision models only" in capsys.readouterr().err
    assert main(["run", "--model", "resnet-tiny", "--steps", "2"]) == 2  # --lora applies to vision too (issue 9)
    assert "apply to LLMs only" in capsys.readouterr().err

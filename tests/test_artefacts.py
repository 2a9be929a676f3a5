"""The LLM artefacts and claim rules on hand-made records: exact frames, both outcomes of each rule."""

import math

import pandas as pd
import pytest

from perplib import artefacts as A
from perplib.claims import claims_frame


def rec(ppl, history=None, **config):
    base = {"model": "m", "prune": "magnitude", "sparsity": "0.5", "retrain": "none", "lora": "masked",
            "eval_every": 0}  # fmt: skip
    r = {"config": base | config, "metrics": {"perplexity": ppl}}
    if history is not None:
        r["history"] = history
    return r


def test_ppl_picks_one_record_and_refuses_ambiguity():
    records = [rec(10.0, prune="none"), rec(300.0), rec(30.0, retrain="perp")]
    assert A.ppl(records, retrain="perp") == 30.0
    assert A.dense_perplexity(records, "m") == 10.0
    assert math.isnan(A.ppl(records, retrain="full"))
    with pytest.raises(ValueError, match="2 records match"):
        A.ppl(records, prune="magnitude")


def test_figure3_frame_is_exact_and_the_dense_level_is_labelled():
    hist = [{"step": 0, "perplexity": 278.0}, {"step": 6, "perplexity": 70.0}, {"step": 12}]
    records = [rec(30.0, hist, retrain="perp", eval_every=6), rec(29.0, [{"step": 0, "perplexity": 1.0}])]
    expected = pd.DataFrame({"model": ["m", "m"], "sparsity": ["0.5", "0.5"], "iteration": [0, 6],
                             "perplexity": [278.0, 70.0]})  # fmt: skip
    pd.testing.assert_frame_equal(A.figure3_frame(records), expected)
    fig = A.figure3(records, {"m": 13.6})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["dense 13.60"]
    assert fig.axes[0].get_lines()[-1].get_ydata()[0] == 13.6


def test_collapse_rule():
    ok = A.claim_collapse(13.6, {"0.5": 278.4, "0.7": 69830.0, "0.3": 20.0})
    assert ok.holds is True and ok.ours == "dense 13.60 -> 278.40 (50%), 69,830 (70%)"
    assert A.claim_collapse(13.6, {"0.5": 50.0}).holds is False  # < 5x dense
    assert A.claim_collapse(13.6, {"0.5": 300.0, "0.7": 200.0}).holds is False  # not growing


def test_fast_then_saturating_rule():
    fast = [(0, 278.4), (6, 71.3), (12, 40.4), (18, 36.0), (24, 34.2), (30, 32.2), (36, 30.5), (42, 29.7), (48, 29.27)]
    c = A.claim_fast_then_saturating(fast)
    assert c.holds is True and "86% of the log drop in the first 1/4, 2% in the last 1/4 (9 points)" in c.ours
    linear = [(s, 278.4 * math.exp(-s / 20)) for s in range(0, 49, 6)]
    assert A.claim_fast_then_saturating(linear).holds is False
    assert A.claim_fast_then_saturating([(0, 1.0)]).holds is None


def test_ordering_rule():
    good = {"none": 278.4, "ln": 50.05, "linear-probing": 48.85, "perp": 29.27, "full": 31.95}
    assert A.claim_ordering(good).holds is True
    assert A.claim_ordering(good | {"linear-probing": 80.0}).holds is False  # LN and LP not alike
    assert A.claim_ordering(good | {"full": 20.0}).holds is False  # PERP far behind Full IMP
    assert A.claim_ordering({"none": 1.0}).holds is None


def test_calibrated_and_perp_helps_all_rules():
    assert A.claim_reaches_calibrated(29.27, 30.56, 25.15).holds is True
    assert A.claim_reaches_calibrated(40.0, 30.56, 25.15).holds is False
    without = {"magnitude": 278.4, "wanda": 30.56, "sparsegpt": 25.15}
    with_perp = {"magnitude": 29.27, "wanda": 19.9, "sparsegpt": 18.82}
    c = A.claim_perp_helps_all(without, with_perp)
    assert c.holds is True and c.ours == "Magnitude 278.40 -> 29.27, Wanda 30.56 -> 19.90, SparseGPT 25.15 -> 18.82"
    assert A.claim_perp_helps_all(without, with_perp | {"magnitude": 18.0}).holds is False
    assert A.claim_perp_helps_all(without, with_perp | {"wanda": 31.0}).holds is False


def test_efficiency_rule():
    perp = {"config": {"lora": "plain"}, "metrics": {"train_tokens_per_s": 158.4, "trainable_params": 5_677_056}}
    full = {"config": {"lora": "masked"}, "metrics": {"train_tokens_per_s": 124.0, "trainable_params": 134_515_008}}
    c = A.claim_efficiency(perp, full)
    assert c.holds is True and "(1.28x); gradient + AdamW state 65 vs 1,539 MiB" in c.ours
    perp["metrics"]["train_tokens_per_s"] = 123.5
    assert A.claim_efficiency(perp, full).holds is False


def test_rank_alpha_and_groups_rules():
    assert A.claim_rank_alpha({(8, 32.0): 12.91, (16, 64.0): 12.77, (128, 32.0): 13.10}).holds is True
    assert A.claim_rank_alpha({(8, 32.0): 38.19, (16, 64.0): 40.75}).holds is False
    groups = {"none": 278.4, "ln": 50.05, "biases+head": 215.6, "linear-probing": 48.85, "biases+lora": 29.0,
              "perp": 29.27}  # fmt: skip
    assert A.claim_groups(groups).holds is True
    assert A.claim_groups(groups | {"biases+lora": 60.0}).holds is False
    assert A.claim_groups(groups | {"ln": 200.0}).holds is False


def test_claims_of_a_notebook_make_one_frame():
    frame = claims_frame([A.claim_dense({"m": 13.6}, 16, 256, "wiki-vital"), A.claim_rank_alpha({})])
    assert list(frame.id) == ["D0", "C8"] and list(frame.holds) == ["✓", "–"]


def test_profile_reductions_are_rendered_from_the_profile():
    text = A.profile_reductions({"steps": 48, "batch_size": 1, "grad_accum": 1, "lr": {"perp": 4e-3, "default": 1e-3}},
                                {"seqlen": 256, "windows": 16, "eval": "wiki-vital"})  # fmt: skip
    assert text == ("48 steps of batch 1 x 1 at 256 tokens (paper: 1000 steps of 2 x 4 at the model's context); "
                    "evaluation on 16 windows of wiki-vital; learning rates chosen on the validation split: perp 0.004")  # fmt: skip


def test_table11_layout_is_exact():
    records = [
        {"config": {"model": "m", "prune": "wanda", "sparsity": "0.5", "retrain": "perp"},
         "metrics": {"zero_shot": {"t": 0.7}, "zero_shot_mean": 0.7}},
        {"config": {"model": "m", "prune": "none", "sparsity": "0.5", "retrain": "none"},
         "metrics": {"zero_shot": {"t": 0.825}, "zero_shot_mean": 0.825}},
        {"config": {"model": "m", "prune": "magnitude", "sparsity": "0.5", "retrain": "none"},
         "metrics": {"zero_shot": {"t": 0.6}, "zero_shot_mean": 0.6}},
        {"config": {"model": "m", "prune": "wanda", "sparsity": "0.5", "retrain": "none"}, "metrics": {}},
    ]  # fmt: skip
    expected = pd.DataFrame({"model": ["m"] * 3, "method": ["Baseline", "Magnitude", "Wanda"], "PERP": ["✗", "✗", "✓"],
                             "sparsity": ["0%", "0.5", "0.5"], "t": [82.5, 60.0, 70.0], "mean": [82.5, 60.0, 70.0]})  # fmt: skip
    pd.testing.assert_frame_equal(A.table11(records), expected)
    assert A.table11(records[3:]).empty


def test_zero_shot_rule():
    c = A.claim_zero_shot({"magnitude": 0.592, "wanda": 0.717}, {"magnitude": 0.667, "wanda": 0.70}, "next", 0.5)
    assert c.holds is False and c.ours == "Magnitude 59.2 -> 66.7, Wanda 71.7 -> 70.0 (next, chance 50%)"
    assert A.claim_zero_shot({"wanda": 0.6}, {"wanda": 0.7}, "next").holds is True
    assert A.claim_zero_shot({}, {}, "").holds is None


def test_table1_layout_is_exact():
    def r(retrain, ppl, sparsity="0.5", lora="masked", params=10, share=0.1):
        return {"config": {"model": "m", "sparsity": sparsity, "retrain": retrain, "lora": lora},
                "metrics": {"perplexity": ppl, "trainable_params": params, "trainable_share": share}}  # fmt: skip

    records = [r("none", 278.0, params=0, share=None), r("perp", 29.0), r("perp", 28.0, lora="plain"),
               r("full", 31.0, params=100, share=1.0), r("biases", 278.0, params=0, share=0.0),
               r("none", 9000.0, sparsity="0.7", params=0, share=None)]  # fmt: skip
    got = A.table1(records, {"m": 13.6}, ["none", "biases", "perp", "full"], ["masked", "plain"])
    expected = pd.DataFrame({
        "model": ["m"] * 4, "method": ["Full IMP", "PERP (masked LoRA)", "PERP (plain LoRA)", "No retraining"],
        "% trainable": [100.0, 10.0, 10.0, 0.0], "0.5": [31.0, 29.0, 28.0, 278.0],
        "0.7": [float("nan")] * 3 + [9000.0], "dense": [13.6] * 4})  # fmt: skip
    pd.testing.assert_frame_equal(got, expected)


def test_table13_and_table14_layouts_are_exact():
    methods = {(): "none", ("norms",): "ln", ("lora",): "biases+lora"}

    def r(retrain, ppl, seed=0, share=0.1, rank=16, alpha=32.0):
        return {"config": {"sparsity": "0.5", "retrain": retrain, "seed": seed, "lora_rank": rank, "lora_alpha": alpha},
                "metrics": {"perplexity": ppl, "trainable_share": share}}  # fmt: skip

    records = [r("biases+lora", 30.0), r("none", 278.0, share=None), r("ln", 50.0, share=0.01),
               r("biases+lora", 32.0, seed=1)]  # fmt: skip
    expected = pd.DataFrame({"sparsity": ["0.5"] * 3, "LN": ["✗", "✓", "✗"], "Head": ["✗"] * 3,
                             "LoRA": ["✗", "✗", "✓"], "% trainable": [0.0, 1.0, 10.0],
                             "perplexity": [278.0, 50.0, 31.0], "std": [float("nan"), float("nan"), 2 ** 0.5],
                             "seeds": [1, 1, 2]})  # fmt: skip
    pd.testing.assert_frame_equal(A.table13(records, methods, include_biases=False), expected)
    grid = [r("perp", 40.0, rank=8), r("perp", 38.0, rank=16), r("perp", 39.0, rank=8, alpha=64.0),
            r("perp", 37.0, rank=16, alpha=64.0)]  # fmt: skip
    expected14 = pd.DataFrame({"lora_alpha": [32.0, 64.0], 8: [40.0, 39.0], 16: [38.0, 37.0]})
    pd.testing.assert_frame_equal(A.table14(grid), expected14)


def test_table2_layout_is_exact():
    records = [rec(278.0), rec(30.0, prune="wanda"), rec(29.0, retrain="perp"), rec(19.9, prune="wanda", retrain="perp"),
               rec(9000.0, sparsity="0.7"), rec(50.0, retrain="ln")]  # fmt: skip
    expected = pd.DataFrame({"model": ["m"] * 4, "method": ["Magnitude", "Magnitude", "Wanda", "Wanda"],
                             "PERP": ["✗", "✓", "✗", "✓"], "dense": [13.6] * 4, "0.5": [278.0, 29.0, 30.0, 19.9]})  # fmt: skip
    pd.testing.assert_frame_equal(A.table2(records, {"m": 13.6}, ["0.5"]), expected)

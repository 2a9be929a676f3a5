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


# -- each notebook's claims (the functions its last cell calls) ---------------------------------


def test_claims_00_from_dense_records():
    records = [rec(13.6, prune="none"), rec(300.0), rec(9.5, prune="none", model="n")]
    (d0,) = A.claims_00(records, ["m", "n"], 16, 256, "wiki-vital")
    assert d0.id == "D0" and d0.holds is True and d0.ours == "m 13.60, n 9.50 (wiki-vital, 16 x 256 tokens)"
    (missing,) = A.claims_00(records, ["m", "absent"], 16, 256, "wiki-vital")
    assert missing.holds is False and "absent nan" in missing.ours  # no dense record: not finite


def _table1_records(perp=29.27, full=31.95):
    hist = [{"step": s, "perplexity": p} for s, p in ((0, 278.4), (6, 71.3), (12, 40.4), (18, 36.0), (24, 34.2),
                                                     (30, 32.2), (36, 30.5), (42, 29.7), (48, 29.27))]  # fmt: skip
    speed = {"train_tokens_per_s": 158.4, "trainable_params": 5_677_056}
    return [
        rec(278.4), rec(50.05, retrain="ln"), rec(48.85, retrain="linear-probing"),
        rec(perp, hist, retrain="perp", eval_every=6),
        {"config": rec(0, retrain="perp", lora="plain")["config"], "metrics": {"perplexity": 30.1, **speed}},
        {"config": rec(0, retrain="full")["config"],
         "metrics": {"perplexity": full, "train_tokens_per_s": 124.0, "trainable_params": 134_515_008}},
        rec(500.0, sparsity="0.7"),  # another sparsity: not read by C3
    ]  # fmt: skip


def test_claims_32_from_table1_and_figure3_records():
    records = _table1_records()
    records3 = [r for r in records if r["config"]["eval_every"]]
    c2, c3, c5 = A.claims_32(records, records3, ["m"], [0.5], ["masked", "plain"])
    assert [c.id for c in (c2, c3, c5)] == ["C2", "C3", "C5"]
    assert c2.holds is True and "(9 points)" in c2.ours
    assert c3.holds is True and c3.ours == ("No retraining 278.40, LN-Parameters 50.05, Linear Probing 48.85, "
                                            "PERP 29.27, Full IMP 31.95")  # fmt: skip
    assert c5.holds is True and c5.ours.startswith("PERP (plain LoRA) 158.40 vs Full IMP 124.00 tokens/s")
    # PERP far behind Full IMP: C3 fails; masked LoRA only: no plain run and no throughput, C5 not measured
    c2, c3, c5 = A.claims_32(_table1_records(full=20.0), records3, ["m"], ["0.5"], ["masked"])
    assert c3.holds is False and c5.holds is None and c5.ours.startswith("PERP (masked LoRA) nan")
    # no Full IMP run: no C5; no Figure-3 records: C2 not measured
    without_full = [r for r in records if r["config"]["retrain"] != "full"]
    claims = A.claims_32(without_full, [], ["m"], [0.5], ["masked", "plain"])
    assert [c.id for c in claims] == ["C2", "C3"] and claims[0].holds is None and claims[1].holds is None


def _table2_records(magnitude_perp=29.27):
    zs = lambda p, a: {"perplexity": p, "zero_shot_mean": a}  # noqa: E731
    return [
        rec(278.4), rec(69830.0, sparsity="0.7"), {"config": rec(0)["config"] | {"prune": "wanda"}, "metrics": zs(30.56, 0.55)},
        {"config": rec(0, prune="sparsegpt")["config"], "metrics": zs(25.15, 0.56)},
        rec(magnitude_perp, retrain="perp"), {"config": rec(0, prune="wanda", retrain="perp")["config"], "metrics": zs(19.9, 0.6)},
        {"config": rec(0, prune="sparsegpt", retrain="perp")["config"], "metrics": zs(18.82, 0.61)},
        rec(1.0, model="other"),  # another model: not read
    ]  # fmt: skip


def test_claims_33_from_table2_records():
    records = _table2_records()
    no_retraining = [r for r in records if r["config"]["retrain"] == "none"]
    perp = [r for r in records if r["config"]["retrain"] == "perp"]
    dense = [rec(13.6, prune="none")]
    zero_shot = {"tasks": "wiki_vital_next_sentence"}
    args = (["m"], ["magnitude", "wanda", "sparsegpt"], ["0.5"], ["0.7"], ["0.5"], zero_shot)
    c1, c2b, c4, c10 = A.claims_33(no_retraining, perp, dense, *args)
    assert [c.id for c in (c1, c2b, c4, c10)] == ["C1", "C2b", "C4", "C10"]
    assert c1.holds is True and c1.ours == "dense 13.60 -> 278.40 (50%), 69,830 (70%)"
    assert c2b.holds is True and c4.holds is True
    assert (
        c10.holds is True
        and c10.ours == "Wanda 55.0 -> 60.0, SparseGPT 56.0 -> 61.0 (wiki_vital_next_sentence, chance 50%)"
    )
    # magnitude + PERP above the calibrated criteria: C2b fails
    records = _table2_records(magnitude_perp=40.0)
    c1, c2b, c4, c10 = A.claims_33(
        no_retraining, [r for r in records if r["config"]["retrain"] == "perp"], dense, *args
    )
    assert c2b.holds is False and c4.holds is True
    # no zero-shot task in the profile
    assert A.claims_33(no_retraining, perp, dense, *args[:-1], None)[-1].ours.endswith(
        "(no zero-shot task in this profile)"
    )


def test_claims_C_from_table13_and_table14_records():
    groups = {"none": 278.4, "ln": 50.05, "linear-probing": 48.85, "lora": 30.0, "perp": 29.27}
    records = [rec(v, retrain=k, seed=seed) for k, v in groups.items() for seed in (0, 1)]
    records += [rec(1.0, retrain="lora", sparsity="0.7")]  # another sparsity: not read
    records14 = [rec(v, retrain="perp", lora_rank=r, lora_alpha=a, seed=seed)
                 for (r, a), v in {(8, 32.0): 12.91, (16, 64.0): 12.77}.items() for seed in (0, 1)]  # fmt: skip
    c9, c8 = A.claims_C(records, records14, [0.5])
    assert (c9.id, c9.holds, c8.id, c8.holds) == ("C9", True, "C8", True)
    assert c8.ours == "r8/α32 12.91, r16/α64 12.77 (max/min 1.011)"
    records14[0]["metrics"]["perplexity"] = records14[1]["metrics"]["perplexity"] = 14.0  # r8/α32 mean 14.0
    records[0]["metrics"]["perplexity"] = records[1]["metrics"]["perplexity"] = 60.0  # none < 2 x LN: C9 fails
    c9, c8 = A.claims_C(records, records14, ["0.5"])
    assert c9.holds is False and c8.holds is False and "r8/α32 14.00" in c8.ours

"""Vision tables, claims and Figure 1 measures on hand-made records (exact frames, both outcomes
of every claim rule) and the ResNet-50 reference shares (meta device)."""

from __future__ import annotations

import pytest
import torch

from perplib.vision import artefacts as art


def record(method, sparsity, acc, *, pruned=50.0, dense=90.0, epochs=1, rank=10, lora="masked", share=0.5,
           lost=0.0, time_s=1.0):  # fmt: skip
    return {
        "config": {"retrain": method, "sparsity": sparsity, "epochs": epochs, "lora_rank": rank, "lora": lora},
        "metrics": {
            "dense_accuracy": dense,
            "accuracy": acc,
            "pruned_accuracy": pruned,
            "trainable_share": share,
            "sparsity": sparsity,
            "sparsity_with_adapters": sparsity - lost,
        },  # fmt: skip
        "timings": {"epoch_time_s": time_s},
    }


def grid(perp_plain=(89.0, 85.0, 70.0), full=(88.0, 86.0, 80.0), bnp=(87.5, 80.0, 60.0), bnr=(85.0, 75.0, 40.0),
         pruned=(60.0, 30.0, 10.0), long_full=(88.0, 87.0, 84.0), long_perp=(88.5, 86.0, 82.0)):  # fmt: skip
    recs = []
    for i, s in enumerate((0.7, 0.8, 0.9)):
        kw = {"pruned": pruned[i]}
        recs += [
            record("full", s, full[i], share=1.0, time_s=2.0, **kw),
            record("perp", s, perp_plain[i], lora="plain", share=0.06, lost=0.064, time_s=2.5, **kw),
            record("perp", s, perp_plain[i] - 0.5, lora="masked", share=0.06, time_s=3.0, **kw),
            record("bn-parameters", s, bnp[i], share=0.002, **kw),
            record("bn-recalibrate", s, bnr[i], share=0.0, time_s=0.0, **kw),
        ]
        if s >= 0.8:
            recs += [record("full", s, long_full[i], epochs=5, share=1.0, time_s=2.0, **kw),
                     record("perp", s, long_perp[i], epochs=5, lora="plain", share=0.06, lost=0.064, **kw)]  # fmt: skip
    return art.accuracy_frame(recs)


def test_accuracy_table_exact():
    table = art.accuracy_table(grid(), 1)
    assert list(table.columns) == ["method", "% trainable", "Δ sparsity (pp)", "70%", "80%", "90%"]
    assert list(table["method"]) == ["Dense", "Full IMP", "PERP (r=10)", "PERP masked (r=10)", "BN-Parameters",
                                     "BN-Recalibrate", "No retraining"]  # fmt: skip
    row = table.set_index("method").loc["PERP (r=10)"]
    assert row["% trainable"] == 6.0 and row["Δ sparsity (pp)"] == pytest.approx(6.4) and row["90%"] == 70.0
    assert table.set_index("method").loc["Dense", "80%"] == 90.0
    assert table.set_index("method").loc["No retraining", "70%"] == 60.0
    long = art.accuracy_table(grid(), 5)
    assert list(long["method"]) == ["Dense", "Full IMP", "PERP (r=10)", "No retraining"]
    assert list(long.columns)[3:] == ["80%", "90%"]


def test_cost_table_ratios():
    costs = art.cost_table(grid()).set_index(["method", "epochs"])
    assert costs.loc[("PERP (r=10)", 1), "time_vs_full"] == 1.25
    assert costs.loc[("PERP masked (r=10)", 1), "time_vs_full"] == 1.5
    assert ("BN-Recalibrate", 1) not in costs.index


def claim(claims, cid):
    return next(c for c in claims if c.id == cid)


def test_claims_31_hold_on_the_paper_shape():
    sims = {"dense": 1.0, "pruned": 0.8, "retrained": 0.9}
    shares = dict(art.PAPER_SHARES)
    claims = art.claims_31(grid(), 1, 5, sims, shares)
    assert [c.id for c in claims] == ["C6a", "C6b", "C6c", "C6d", "C6e", "C6f", "F1"]
    assert all(c.holds for c in claims), [(c.id, c.ours) for c in claims if not c.holds]
    assert "70%: 30.0" in claim(claims, "C6a").ours


def test_claims_31_fail_when_the_numbers_differ():
    frame = grid(pruned=(85.0, 30.0, 10.0), bnr=(86.0, 31.0, 11.0), bnp=(85.0, 80.0, 60.0),
                 perp_plain=(87.0, 85.0, 85.0), long_perp=(88.5, 88.0, 82.0))  # fmt: skip
    sims = {"dense": 1.0, "pruned": 0.97, "retrained": 0.9}
    shares = {**art.PAPER_SHARES, "PERP (r=10)": 11.33}
    claims = {c.id: c.holds for c in art.claims_31(frame, 1, 5, sims, shares)}
    assert claims == {"C6a": False, "C6b": False, "C6c": False, "C6d": False, "C6e": False, "C6f": False,
                      "F1": False}  # fmt: skip


def test_claims_31_skip_what_the_profile_does_not_measure():
    ids = [c.id for c in art.claims_31(grid(), 1, 1, None, None)]
    assert ids == ["C6a", "C6b", "C6c", "C6d"]


def t12_records(diffs, cycles=2):
    full = {"config": {"freeze": "none", "reverse": False, "cycles": cycles},
            "metrics": {"accuracy": 80.0, "trainable_share": 1.0}}  # fmt: skip
    out = [full]
    for (freeze, reverse, share), d in zip([("unfreeze", True, 0.9), ("freeze", False, 0.7),
                                            ("unfreeze", False, 0.4), ("freeze", True, 0.2)], diffs, strict=True):  # fmt: skip
        out.append({"config": {"freeze": freeze, "reverse": reverse, "cycles": cycles},
                    "metrics": {"accuracy": 80.0 + d, "trainable_share": share}})  # fmt: skip
    return out


def test_table12_and_claims_34():
    table = art.table12(t12_records([-0.1, -0.3, -0.6, -2.0]))
    assert list(table.columns) == ["unfreeze", "reverse", "% agg. trainable", "Δ acc, 2 cycles"]
    assert list(zip(table["unfreeze"], table["reverse"], strict=True)) == [
        ("✓", "✓"),
        ("✗", "✗"),
        ("✓", "✗"),
        ("✗", "✓"),
    ]
    assert list(table["% agg. trainable"]) == [90.0, 70.0, 40.0, 20.0]
    assert list(table["Δ acc, 2 cycles"]) == [-0.1, -0.3, -0.6, -2.0]
    shares = dict(art.PAPER_TABLE12)
    claims = {c.id: c.holds for c in art.claims_34(table, shares)}
    assert claims == {"C7": True, "C7a": True}
    bad = art.table12(t12_records([-1.25, -0.05, -0.85, 0.25]))
    claims = {c.id: c.holds for c in art.claims_34(bad, {**shares, ("✓", "✓"): 88.0})}
    assert claims == {"C7": False, "C7a": False}
    with pytest.raises(ValueError, match="needs freezing runs"):
        art.table12(t12_records([0, 0, 0, 0])[:1])


def test_resnet50_method_shares():
    shares = art.resnet50_method_shares((1, 10))
    assert shares["BN-Parameters"] == pytest.approx(100 * (53_120 + 1_000) / 25_557_032)  # BN + head bias
    assert shares["Linear Probing"] == pytest.approx(8.2252, abs=1e-4)
    # LoRA of rank r on every conv adds r (c_out + c_in k k) parameters
    assert shares["PERP (r=1)"] == pytest.approx(8.5361, abs=1e-4)
    assert shares["PERP (r=10)"] == pytest.approx(11.3337, abs=1e-4)


def test_feature_similarity_and_filter_choice():
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dense[0, 1] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    dense[0, 2] = torch.tensor([[0.1, 0.0], [0.0, 0.0]])
    pruned = dense.clone()
    pruned[0, 1] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # cosine 1/sqrt(2) on filter 1
    pruned[0, 2] = torch.tensor([[0.0, 0.1], [0.0, 0.0]])  # weak filter: orthogonal, but not eligible
    maps = {"dense": dense, "pruned": pruned, "retrained": dense.clone()}
    sims = art.feature_similarity(maps)
    assert sims["dense"] == pytest.approx(1.0) and sims["retrained"] == pytest.approx(1.0)
    assert sims["pruned"] == pytest.approx(
        float(dense.flatten() @ pruned.flatten()) / float(dense.norm() * pruned.norm())
    )
    assert art.most_affected_filter(maps) == 1
    assert art.cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    with pytest.raises(ValueError, match="all-zero"):
        art.cosine_similarity(torch.zeros(2), torch.ones(2))


def test_grid_configs_and_feature_layer(capsys):
    from perplib.vision.experiments import VisionConfig, grid_configs
    from perplib.vision.models import build_model

    base = VisionConfig(model="resnet-tiny")
    configs = grid_configs(base, [0.7, 0.9], ["full", "perp"], epochs=5, perp_ranks=[1, 10], masked_ranks=[10])
    got = [(c.sparsity, c.retrain, c.lora, c.lora_rank, c.epochs) for c in configs]
    assert got == [(s, m, k, r, 5) for s in (0.7, 0.9) for m, k, r in
                   [("full", "masked", 10), ("perp", "plain", 1), ("perp", "plain", 10), ("perp", "masked", 10)]]  # fmt: skip
    model = build_model("resnet18-half", num_classes=10, in_channels=1, image_size=28)
    assert art.feature_layer_of(model, "layer1.1.conv2") == "layer1.1.conv2"
    tiny = build_model("resnet-tiny", num_classes=3, in_channels=1, image_size=8)
    assert art.feature_layer_of(tiny, "layer1.2.conv2") == "layer1.0.conv2"
    assert "Figure 1 uses 'layer1.0.conv2'" in capsys.readouterr().out

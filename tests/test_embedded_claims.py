"""The committed embedded claims are what the committed records say: for every notebook whose
``tables/embedded/claims_<notebook>.csv`` is committed, its records are read from
``results/embedded`` (the runs the notebook asks for, built from its embedded parameters as the
notebook builds them, read by key: nothing runs, no model loads), its claims are recomputed by the
library functions its last cell calls, and id, ours and holds must equal the committed CSV. A change
of code that would change a committed claim fails here.

Skipped cleanly where a notebook's claims CSV (or the records folder) is not there. A record the
notebook needs but that is missing fails: the committed claims could not be reproduced from the
committed records. ``PERPLIB_EMBEDDED_RESULTS`` / ``PERPLIB_EMBEDDED_TABLES`` point the test at
other folders (read only; ``PERPLIB_RESULTS``/``PERPLIB_TABLES`` are the tests' temporary outputs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from perplib import artefacts, paths, plan
from perplib.claims import claims_frame
from perplib.reproduce import declared_parameters, notebook_parameters, notebooks_dir
from perplib.results import config_key

PROFILE = "embedded"
RESULTS = Path(os.environ.get("PERPLIB_EMBEDDED_RESULTS", paths.repo_root() / "results" / PROFILE))
TABLES = Path(os.environ.get("PERPLIB_EMBEDDED_TABLES", paths.repo_root() / "tables" / PROFILE))
COMPARED = ["id", "ours", "holds"]


def committed(notebook: str) -> pd.DataFrame:
    path = TABLES / f"claims_{notebook}.csv"
    if not path.exists():
        pytest.skip(f"no committed {path.name} in {TABLES}")
    if not RESULTS.is_dir():
        pytest.skip(f"no committed records in {RESULTS}")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def params(stem: str) -> dict:
    """The notebook's parameters under the embedded profile, exactly as ``make reproduce`` passes them."""
    return notebook_parameters(PROFILE, stem, declared_parameters(notebooks_dir() / f"{stem}.ipynb"))


def missing(kind: str, configs) -> list:
    return [c for c in configs if not (RESULTS / kind / f"{config_key(c)}.json").exists()]


def stored(kind: str, configs) -> list[dict]:
    """The finished records of ``configs`` (the store's ``get``, read only), in order."""
    configs = list(configs)
    if gone := missing(kind, configs):
        pytest.fail(f"{len(gone)} of {len(configs)} records of the committed claims are missing in {RESULTS / kind}, "
                    f"e.g. {gone[0]}")  # fmt: skip
    return [json.loads((RESULTS / kind / f"{config_key(c)}.json").read_text()) for c in configs]


def assert_same(claims, frame: pd.DataFrame, notebook: str) -> None:
    ours = claims_frame(claims)[COMPARED].reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, frame[COMPARED].reset_index(drop=True), obj=f"claims of {notebook}")


def llm_common(p: dict) -> dict:
    return {k: p[k] for k in ("eval", "calib", "train", "seqlen", "windows", "nsamples")}


# -- LLM notebooks (the configurations as each notebook's cells build them) -----------------------


def test_claims_00_match_the_committed_csv():
    frame = committed("00_dense_baselines")
    p = params("00_dense_baselines")
    records = stored("llm", [plan.run_config(llm_common(p), p["retraining"], m) for m in p["models"]])
    assert_same(artefacts.claims_00(records, p["models"], p["windows"], p["seqlen"], p["eval"]), frame, "00")


def test_claims_32_match_the_committed_csv():
    frame = committed("32_efficient_retraining")
    p = params("32_efficient_retraining")
    common, retraining, prune, fig3 = llm_common(p), p["retraining"], p["prune"], p["retraining"].get("figure3", {})
    configs = [
        plan.run_config(common, retraining, m, prune, s, method, lora=kind)
        for m in p["models"] for s in p["sparsities"] for method in p["methods"]
        if method != "full" or m in p["full_models"]
        for kind in (p["lora_kinds"] if method == "perp" else p["lora_kinds"][:1])
    ]  # fmt: skip
    figure3 = [plan.run_config(common, retraining, p["figure3_model"], fig3.get("prune", prune), s, "perp",
                               lora=fig3.get("lora", "masked")) for s in fig3.get("sparsities", [])]  # fmt: skip
    claims = artefacts.claims_32(stored("llm", configs), stored("llm", figure3), p["models"], p["sparsities"],
                                 p["lora_kinds"])  # fmt: skip
    assert_same(claims, frame, "32")


def test_claims_33_match_the_committed_csv():
    frame = committed("33_magnitude_llms")
    p = params("33_magnitude_llms")
    common, retraining, scope, models = llm_common(p), p["retraining"], p["scope"], p["models"]
    dense = stored("llm", [plan.run_config(common, retraining, m) for m in models])
    records = stored("llm", [
        plan.run_config(common, retraining, m, q, s, scope=scope) for m in models for q in p["methods"]
        for s in p["sparsities"]
    ] + [
        plan.run_config(common, retraining, m, "magnitude", s, scope=scope) for m in models
        for s in p["collapse_sparsities"] if s not in p["sparsities"]
    ])  # fmt: skip
    perp = stored("llm", [plan.run_config(common, retraining, m, q, s, "perp", scope=scope)
                          for m in models for q in p["methods"] for s in p["perp_sparsities"]])  # fmt: skip
    claims = artefacts.claims_33(records, perp, dense, models, p["methods"], p["sparsities"],
                                 p["collapse_sparsities"], p["perp_sparsities"], retraining.get("zero_shot"))  # fmt: skip
    assert_same(claims, frame, "33")


def test_claims_C_match_the_committed_csv():
    from perplib.retrain import group_combinations

    frame = committed("C_parameter_groups")
    p = params("C_parameter_groups")
    common, retraining, model, prune, kind = llm_common(p), p["retraining"], p["model"], p["prune"], p["lora_kind"]
    methods13 = {c: plan.group_method(c, p["include_biases"]) for c in group_combinations(p["include_biases"])}
    records = stored("llm", [plan.run_config(common, retraining, model, prune, s, methods13[c], lora=kind, seed=seed)
                             for s in p["sparsities"] for c in methods13 for seed in p["seeds"]])  # fmt: skip
    records14 = stored("llm", [
        plan.run_config(common, retraining, model, prune, p["table14_sparsity"], "perp", lora=kind, seed=seed,
                        steps=p["table14_steps"], lora_rank=r, lora_alpha=float(a))
        for a in p["alphas"] for r in p["ranks"] for seed in p["seeds"]
    ])  # fmt: skip
    assert_same(artefacts.claims_C(records, records14, p["sparsities"]), frame, "C")


# -- vision notebooks ------------------------------------------------------------------------------


def vision_base(p: dict, **changes):
    """The notebook's base configuration, on the dataset whose records are stored (``available``
    picks Fashion-MNIST where it is installed, else the fallback: the records say which ran)."""
    from perplib.vision import VisionConfig

    fields = ("model", "data_root", "train_subset", "test_subset", "pretrain_epochs", "batch_size", "lr",
              "recal_batches")  # fmt: skip
    return [VisionConfig(data=d, **{k: p[k] for k in fields}, **changes)
            for d in dict.fromkeys([p["data"], p["data_fallback"]])]  # fmt: skip


def stored_vision(bases, build) -> list[dict]:
    """The records of ``build(base)`` for the first candidate base whose records are all stored."""
    for base in bases:
        if not missing("vision", build(base)):
            return stored("vision", build(base))
    return stored("vision", build(bases[0]))  # fails, naming a missing record


def test_claims_31_match_the_committed_csv_but_figure_1():
    """Claim F1 (Figure 1's cosine similarity of feature maps) is not recomputed: the similarity is
    measured on the dense, pruned and retrained models' feature maps, and no record stores it (it
    would need the models rebuilt: pretraining and a retraining run). Every other row is checked."""
    from perplib.vision import artefacts as art
    from perplib.vision.experiments import grid_configs

    frame = committed("31")
    p = params("31_feature_quality_vision")
    first, last = p["retrain_epochs"][0], p["long_epochs"]

    def configs(base):
        return grid_configs(base, p["sparsities"], p["methods"], epochs=first, perp_ranks=p["perp_ranks"],
                            masked_ranks=p["masked_ranks"]) + grid_configs(
            base, p["long_sparsities"], p["long_methods"], epochs=last, perp_ranks=[max(p["perp_ranks"])])  # fmt: skip

    records = stored_vision(vision_base(p), configs)
    claims = art.claims_31(art.accuracy_frame(records), first, last, None, art.resnet50_method_shares())
    assert "F1" in set(frame.id), "notebook 31 states F1 (Figure 1)"
    assert_same(claims, frame[frame.id != "F1"], "31")


def test_claims_34_match_the_committed_csv():
    from perplib.vision import artefacts as art

    frame = committed("34")
    p = params("34_magnitude_conservation")
    bases = vision_base(p, retrain="full", sparsity=p["final_sparsity"], epochs=p["epochs_per_cycle"])

    def configs(base):
        return [base.replace(cycles=c, freeze=f, reverse=r) for c in p["cycles"]
                for f, r in [["none", False], *p["modes"]]]  # fmt: skip

    table = art.table12(stored_vision(bases, configs))
    assert_same(art.claims_34(table, art.resnet50_table12_shares(5)), frame, "34")


# -- beyond the paper ------------------------------------------------------------------------------


def test_claims_40_match_the_committed_csv():
    from perplib import beyond
    from perplib.config import RunConfig

    frame = committed("40_beyond_perp")
    p = params("40_beyond_perp")
    base = RunConfig(eval=p["eval"], calib=p["calib"], train=p["train"], seqlen=p["seqlen"], windows=p["windows"],
                     nsamples=p["nsamples"], scope=p["scope"], retrain="none")  # fmt: skip
    owl = stored("llm", beyond.owl_grid(base, p["models"], p["methods"], p["sparsities"], p["owl_m"],
                                        p["owl_lambda"]))  # fmt: skip
    runs = beyond.recovery_configs(
        base, model=p["recovery_model"], prune=p["recovery_prune"], sparsity=p["recovery_sparsity"],
        owl_m=p["owl_m"], owl_lambda=p["owl_lambda"],
        perp=dict(lora=p["perp_lora"], lr=p["perp_lr"], batch_size=p["batch_size"], grad_accum=p["grad_accum"]),
        perp_steps=p["perp_steps"], perp_long_steps=p["perp_long_steps"], recon_groups=p["recon_groups"],
        recon_steps=p["recon_steps"], recon_lr=p["recon_lr"], recon_nsamples=p["recon_nsamples"],
    )  # fmt: skip
    recovery = beyond.recovery_table(dict(zip(runs, stored("llm", runs.values()), strict=True)))
    assert_same(beyond.claims(owl, recovery, p["models"][0]), frame, "40")


# -- the combined table ----------------------------------------------------------------------------


def test_claims_md_lists_exactly_the_notebooks_rows(tmp_path, monkeypatch):
    """``claims.md`` and ``claims.csv`` are what ``combine_claims`` makes of the ``claims_<notebook>.csv``
    (every notebook's rows, in name order): recombined from copies in a temporary folder, byte for byte."""
    import shutil

    from perplib.claims import combine_claims

    parts = sorted(TABLES.glob("claims_*.csv"))
    if not parts or not (TABLES / "claims.md").exists():
        pytest.skip(f"no committed claims tables in {TABLES}")
    (tmp_path / PROFILE).mkdir()
    for part in parts:
        shutil.copy(part, tmp_path / PROFILE / part.name)
    monkeypatch.setenv("PERPLIB_TABLES", str(tmp_path))
    made = combine_claims(PROFILE)
    assert made["md"].read_text() == (TABLES / "claims.md").read_text()
    if (TABLES / "claims.csv").exists():
        assert made["csv"].read_bytes() == (TABLES / "claims.csv").read_bytes()
    rows = sum(len(pd.read_csv(part, dtype=str, keep_default_na=False)) for part in parts)
    assert len(pd.read_csv(made["csv"], dtype=str, keep_default_na=False)) == rows


def test_a_changed_claim_would_fail():
    """The comparison itself: a committed CSV that differs in one claim's holds is caught."""
    claims = artefacts.claims_00([{"config": {"model": "m", "prune": "none", "retrain": "none"},
                                   "metrics": {"perplexity": 13.6}}], ["m"], 16, 256, "wiki-vital")  # fmt: skip
    frame = claims_frame(claims)
    assert_same(claims, frame, "00")
    with pytest.raises(AssertionError):
        assert_same(claims, frame.assign(holds="✗"), "00")

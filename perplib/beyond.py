"""Notebook 40 (beyond the paper): OWL's layer-wise sparsity for every criterion, and block-wise
reconstruction as a recovery method next to PERP. The run grids, tables, the Pareto figure and
the claims, built from records; the notebook only calls these.

Claims (rules fixed before any number was seen):

- B1-B3: OWL beats uniform at the highest unstructured sparsity of the grid (70% in every profile)
  for magnitude, Wanda and SparseGPT: OWL's perplexity < uniform's, first model.
- B4 (less data): reconstruction uses at most PERP's training tokens and reaches a perplexity
  within 10% of PERP's (``≤ 1.1 x``) at PERP's equal-token budget.
- B5 (equal time): reconstruction's perplexity ``≤ 1.1 x`` that of the PERP run whose recovery time
  is closest to reconstruction's (recorded wall times).
- B6: OWL + PERP beats uniform + PERP at the equal-token budget (perplexity lower).

Recovery time: PERP's ``retrain_s``; reconstruction's whole calibration walk (``prune.timings.total``:
capture, dense targets, training, propagation, and the magnitude masks, about 2 s of it). OWL's
outlier ratios are measured once per model and calibration set and listed on their own.
"""

from __future__ import annotations

from typing import Any

from .claims import Claim
from .config import RunConfig

LABELS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
# the OWL paper (Yin et al. 2024, Table 3): LLaMA-7B at 70%, WikiText-2 perplexity, uniform -> OWL
OWL_PAPER = {"wanda": "85.8 → 24.6 (LLaMA-7B)", "sparsegpt": "26.3 → 19.5 (LLaMA-7B)", "magnitude": "not in the issue"}
TOLERANCE = 1.1


def owl_grid(base: RunConfig, models: list[str], methods: list[str], sparsities: list[str],
             owl_m: float, owl_lambda: float) -> list[RunConfig]:  # fmt: skip
    """Uniform and OWL for every model, criterion and sparsity (uniform runs are the same records
    as notebook 33's when configured alike: the new fields stay out of the key at their defaults)."""
    out = []
    for model in models:
        for method in methods:
            for s in sparsities:
                uniform = base.replace(model=model, prune=method, sparsity=s)
                out += [uniform, uniform.replace(allocation="owl", owl_m=owl_m, owl_lambda=owl_lambda)]
    return out


def recovery_configs(base: RunConfig, *, model: str, prune: str, sparsity: str, owl_m: float, owl_lambda: float,
                     perp: dict[str, Any], perp_steps: int, perp_long_steps: int, recon_groups: str,
                     recon_steps: int, recon_lr: float, recon_nsamples: int) -> dict[str, RunConfig]:  # fmt: skip
    """The recovery runs, by label: none, OWL only, reconstruction, PERP at the equal-token and the
    longer budget, OWL + PERP at the equal-token budget. ``perp``: PERP's RunConfig fields
    (lora, lr, batch_size, grad_accum), as notebook 33's PERP rows so its record is reused."""
    pruned = base.replace(model=model, prune=prune, sparsity=sparsity)
    owl = dict(allocation="owl", owl_m=owl_m, owl_lambda=owl_lambda)
    trained = pruned.replace(retrain="perp", **perp)
    return {
        "none": pruned,
        "OWL only": pruned.replace(**owl),
        "reconstruction": pruned.replace(
            nsamples=recon_nsamples, reconstruct=recon_groups, reconstruct_steps=recon_steps, reconstruct_lr=recon_lr
        ),  # fmt: skip
        "PERP": trained.replace(steps=perp_steps),
        "PERP (longer)": trained.replace(steps=perp_long_steps),
        "OWL + PERP": trained.replace(steps=perp_steps, **owl),
    }


def owl_table(records: list[dict[str, Any]]):
    """Perplexity per model and criterion, one column per allocation and sparsity."""
    import pandas as pd

    rows = [{"model": r["config"]["model"], "criterion": LABELS.get(r["config"]["prune"], r["config"]["prune"]),
             "column": f"{r['config'].get('allocation', 'uniform')} {r['config']['sparsity']}",
             "perplexity": r["metrics"]["perplexity"]} for r in records]  # fmt: skip
    frame = pd.DataFrame(rows)
    wide = frame.pivot_table(index=["model", "criterion"], columns="column", values="perplexity", sort=False)
    order = sorted(wide.columns, key=lambda c: (float(c.split()[1]), c.split()[0] != "uniform"))
    return wide[order].reset_index()


def block_table(record: dict[str, Any]):
    """One OWL run's blocks: outlier ratio, target and achieved sparsity."""
    import pandas as pd

    info = record["prune"]["allocation"]
    return pd.DataFrame({"block": range(len(info["ratios"])), "outlier ratio": info["ratios"],
                         "target": info["targets"], "achieved": info["achieved"]})  # fmt: skip


def _tokens(config: dict[str, Any], label: str) -> int | None:
    if config.get("reconstruct"):
        # every calibration window, seen by every block (batches of 8 cycled over the steps)
        batches = -(-config["nsamples"] // 8)
        return min(config["reconstruct_steps"], batches) * min(8, config["nsamples"]) * config["seqlen"]
    if config["retrain"] != "none":
        return config["steps"] * config["batch_size"] * config["grad_accum"] * config["seqlen"]
    return None


def recovery_table(records: dict[str, dict[str, Any]]):
    """One row per recovery run: steps, training tokens, recovery seconds, perplexity."""
    import pandas as pd

    rows = []
    for label, r in records.items():
        c = r["config"]
        if c.get("reconstruct"):
            steps, seconds = c["reconstruct_steps"], r["prune"]["timings"]["total"]
        elif c["retrain"] != "none":
            steps, seconds = c["steps"], r["timings"]["retrain_s"]
        else:
            steps, seconds = 0, 0.0
        rows.append({"recovery": label, "allocation": c.get("allocation", "uniform"), "steps": steps,
                     "tokens": _tokens(c, label), "recovery_s": seconds,
                     "owl_ratios_s": r["timings"].get("owl_ratios_s"), "perplexity": r["metrics"]["perplexity"]})  # fmt: skip
    return pd.DataFrame(rows)


def pareto_figure(table, title: str):
    """Perplexity vs recovery seconds, one labelled point per recovery run (log perplexity)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for row in table.itertuples():
        marker = "s" if row.allocation == "owl" else "o"
        ax.scatter(row.recovery_s, row.perplexity, marker=marker, s=30)
        ax.annotate(row.recovery, (row.recovery_s, row.perplexity), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("recovery wall time (s)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def claims(owl_records: list[dict[str, Any]], recovery: Any, model: str) -> list[Claim]:
    """B1-B6 (rules in the module docstring)."""
    out = []
    ppl = {(r["config"]["prune"], r["config"]["sparsity"], r["config"].get("allocation", "uniform")):
           r["metrics"]["perplexity"] for r in owl_records if r["config"]["model"] == model}  # fmt: skip
    unstructured = sorted({s for (_, s, _) in ppl if ":" not in s}, key=float)
    top = unstructured[-1] if unstructured else None
    for i, method in enumerate(("magnitude", "wanda", "sparsegpt"), 1):
        u, o = ppl.get((method, top, "uniform")), ppl.get((method, top, "owl"))
        holds = None if u is None or o is None else o < u
        ours = "not measured" if holds is None else f"{u:.4g} → {o:.4g} ({model}, {float(top):.0%})"
        out.append(Claim(f"B{i}", f"OWL beats uniform sparsity for {LABELS[method]} at {float(top or 0.7):.0%}",
                         "OWL (Yin et al. 2024), Table 3", OWL_PAPER[method], ours, holds,
                         "OWL perplexity < uniform perplexity"))  # fmt: skip
    rec = recovery.set_index("recovery")
    r, p = rec.loc["reconstruction"], rec.loc["PERP"]
    out.append(Claim("B4", "block-wise reconstruction matches PERP with less data",
                     "Free Lunch (arXiv 2510.14444); EBFT (arXiv 2402.12419)", "matches post-pruning PEFT",
                     f"{r.perplexity:.4g} ({int(r.tokens)} tokens) vs PERP {p.perplexity:.4g} ({int(p.tokens)} tokens)",
                     bool(r.tokens <= p.tokens and r.perplexity <= TOLERANCE * p.perplexity),
                     f"tokens ≤ PERP's and perplexity ≤ {TOLERANCE} x PERP's"))  # fmt: skip
    perps = rec[rec.index.str.startswith("PERP")]
    near = perps.iloc[(perps.recovery_s - r.recovery_s).abs().argsort().iloc[0]]
    out.append(Claim("B5", "block-wise reconstruction matches PERP at equal wall time",
                     "Free Lunch (arXiv 2510.14444)", "far less compute than PEFT",
                     f"{r.perplexity:.4g} in {r.recovery_s:.0f} s vs PERP {near.perplexity:.4g} in {near.recovery_s:.0f} s",
                     bool(r.perplexity <= TOLERANCE * near.perplexity),
                     f"perplexity ≤ {TOLERANCE} x the PERP run closest in time"))  # fmt: skip
    o = rec.loc["OWL + PERP"]
    out.append(Claim("B6", "OWL's allocation still helps after PERP retraining", "issue 13 (composition)",
                     "–", f"{o.perplexity:.4g} vs {p.perplexity:.4g} (equal tokens)", bool(o.perplexity < p.perplexity),
                     "OWL + PERP perplexity < PERP perplexity"))  # fmt: skip
    return out

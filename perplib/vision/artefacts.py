"""Tables, figures and claims of the vision notebooks (31: Section 3.1, Figures 1, 2, 4;
34: Section 3.4, Table 12), as pure functions of records so they are unit-tested on hand-made
records. The claim rules are fixed here, before any number is seen; a failing claim is reported
as failing (see :mod:`perplib.claims`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..claims import Claim
from .retrain import METHOD_LABELS

# the paper's numbers behind the claims (ResNet-50 on ImageNet)
PAPER_SHARES = {"BN-Parameters": 0.21, "Linear Probing": 8.25, "PERP (r=1)": 8.6, "PERP (r=10)": 12.5}
PAPER_TABLE12 = {("✓", "✓"): 88.83, ("✗", "✗"): 70.95, ("✓", "✗"): 37.28, ("✗", "✓"): 19.40}
ORDER = ["Full IMP", "PERP", "Linear Probing", "BN-Parameters", "Biases", "BN-Recalibrate", "No retraining"]


def method_label(method: str, rank: int | None = None, lora: str | None = None) -> str:
    """``PERP (r=10)`` for the paper's (plain, unmerged) PERP, ``PERP masked (r=10)`` for perplib's."""
    if method != "perp":
        return METHOD_LABELS[method]
    return f"PERP{' masked' if lora == 'masked' else ''} (r={rank})"


def _rank(label: str) -> int:
    return int(label.split("=")[1].rstrip(")")) if "=" in label else 0


def _order_key(label: str) -> tuple[int, int, int]:
    group = next(i for i, prefix in enumerate(ORDER) if label.startswith(prefix))
    return group, int("masked" in label), _rank(label)


def accuracy_frame(records: Iterable[Mapping[str, Any]]):
    """Tidy frame of one-shot records (Figures 2 and 4): method, sparsity, epochs, accuracy,
    trainable share (%), sparsity lost to unmerged adapters (points), epoch time, peak memory;
    plus a 'No retraining' row per sparsity from the pruned accuracy."""
    import pandas as pd

    rows = []
    for r in records:
        c, m, t = r["config"], r["metrics"], r["timings"]
        base = {"sparsity": c["sparsity"], "epochs": c["epochs"], "dense": m["dense_accuracy"]}
        label = method_label(c["retrain"], c["lora_rank"], c.get("lora", "masked"))
        lost = 100 * (m["sparsity"] - m.get("sparsity_with_adapters", m["sparsity"]))
        rows.append({**base, "method": label, "accuracy": m["accuracy"], "share": 100 * m["trainable_share"],
                     "sparsity_lost": lost, "epoch_time_s": t.get("epoch_time_s", 0.0),
                     "peak_memory_mb": m.get("peak_memory_mb", 0.0)})  # fmt: skip
        rows.append({**base, "method": METHOD_LABELS["none"], "accuracy": m["pruned_accuracy"], "share": 0.0,
                     "sparsity_lost": 0.0, "epoch_time_s": 0.0, "peak_memory_mb": 0.0})  # fmt: skip
    if not rows:
        raise ValueError("accuracy_frame got no records")
    df = pd.DataFrame(rows).drop_duplicates(subset=["method", "sparsity", "epochs"])
    return df.sort_values(["epochs", "method", "sparsity"]).reset_index(drop=True)


def accuracy_table(frame, epochs: int):
    """Figure 2/4 as a table: a 'Dense' row, then one row per method (Full IMP, PERP by rank,
    ...), its % trainable and sparsity lost (points), one accuracy column per sparsity (in %)."""
    import pandas as pd

    part = frame[frame["epochs"] == epochs]
    if part.empty:
        raise ValueError(f"no records with {epochs} retraining epochs")
    table = part.pivot_table(index="method", columns="sparsity", values="accuracy").round(2)
    table = table.loc[sorted(table.index, key=_order_key)]
    dense = pd.DataFrame([[part["dense"].iloc[0]] * table.shape[1]], index=["Dense"], columns=table.columns)
    out = pd.concat([dense.round(2), table])
    out.columns = [f"{100 * s:.0f}%" for s in out.columns]
    share = part.groupby("method")["share"].mean()
    lost = part.groupby("method")["sparsity_lost"].mean()
    out.insert(0, "Δ sparsity (pp)", [float("nan")] + [round(float(lost[i]), 2) for i in table.index])
    out.insert(0, "% trainable", [float("nan")] + [round(float(share[i]), 2) for i in table.index])
    return out.reset_index(names="method")


def cost_table(frame):
    """Mean epoch time per trained method and retraining length, with its ratio to Full IMP.
    (Peak memory needs a fresh process per method: ``benchmarks/vision_epoch.py``.)"""
    part = frame[frame["epoch_time_s"] > 0]
    table = part.groupby(["method", "epochs"])[["epoch_time_s"]].mean()
    table = table.reset_index()
    full = table[table["method"] == METHOD_LABELS["full"]].set_index("epochs")
    if full.empty:
        raise ValueError("cost_table needs Full IMP records")
    table["time_vs_full"] = table["epoch_time_s"] / table["epochs"].map(full["epoch_time_s"])
    order = sorted(range(len(table)), key=lambda i: (table["epochs"].iloc[i], _order_key(table["method"].iloc[i])))
    table = table.iloc[order]
    return table.round(3).reset_index(drop=True)


def method_styles(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """One line style per method, the same in every panel: PERP ranks by marker (dotted: the
    paper's plain LoRA, dashed: masked), the other methods by colour with round markers."""
    markers = {1: "v", 2: "^", 5: "s", 10: "D"}
    styles = {}
    for i, method in enumerate(sorted(set(methods), key=_order_key)):
        style = {"marker": "o", "linestyle": "-", "color": f"C{i % 10}"}
        if method.startswith("PERP"):
            style.update(marker=markers.get(_rank(method), "P"), linestyle="--" if "masked" in method else ":")
        styles[method] = style
    return styles


def accuracy_figure(frame, panels: Iterable[tuple[str, int]]):
    """Figures 2/4: one panel per ``(title, epochs)``, accuracy vs sparsity (%), the dense level
    drawn and named in the legend with its accuracy, one shared legend."""
    import matplotlib.pyplot as plt

    panels = list(panels)
    styles = method_styles(frame["method"])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.2, 4.2), sharey=True, squeeze=False)
    for ax, (title, epochs) in zip(axes[0], panels, strict=True):
        part = frame[frame["epochs"] == epochs]
        for method in sorted(part["method"].unique(), key=_order_key):
            rows = part[part["method"] == method].sort_values("sparsity")
            ax.plot(100 * rows["sparsity"], rows["accuracy"], label=method, **styles[method])
        ax.axhline(part["dense"].iloc[0], color="black", linewidth=1, label=f"Dense ({part['dense'].iloc[0]:.2f}%)")
        ax.set_xlabel("sparsity (%)")
        ax.set_title(title)
    axes[0][0].set_ylabel("test accuracy (%)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    fig.subplots_adjust(right=1 - 2.0 / fig.get_figwidth())
    return fig


def table12(records: Iterable[Mapping[str, Any]]):
    """Table 12: aggregated trainable share (%) and accuracy difference to Full IMP (no freezing,
    same number of cycles), one row per (unfreeze, reverse), one difference column per cycle count."""
    import pandas as pd

    records = list(records)
    full = {r["config"]["cycles"]: r["metrics"]["accuracy"] for r in records if r["config"]["freeze"] == "none"}
    rows = []
    for r in records:
        c, m = r["config"], r["metrics"]
        if c["freeze"] == "none" or c["cycles"] not in full:
            continue
        rows.append({"unfreeze": "✓" if c["freeze"] == "unfreeze" else "✗", "reverse": "✓" if c["reverse"] else "✗",
                     "cycles": c["cycles"], "share": m["trainable_share"], "diff": m["accuracy"] - full[c["cycles"]]})  # fmt: skip
    if not rows:
        raise ValueError("table12 needs freezing runs and Full IMP runs with the same number of cycles")
    df = pd.DataFrame(rows)
    share = df.groupby(["unfreeze", "reverse"])["share"].mean().mul(100).round(2).rename("% agg. trainable")
    diff = df.pivot_table(index=["unfreeze", "reverse"], columns="cycles", values="diff").round(2)
    out = pd.concat([share, diff], axis=1).sort_values("% agg. trainable", ascending=False)
    out.columns = [c if c == "% agg. trainable" else f"Δ acc, {c} cycles" for c in out.columns]
    return out.reset_index()


# --- reference shares on ResNet-50 (meta device: no weights, no memory) ---


def _resnet50_meta() -> nn.Module:
    from torchvision.models import resnet50

    with torch.device("meta"):
        return resnet50()


def resnet50_table12_shares(epochs: int = 5) -> dict[tuple[str, str], float]:
    """Our aggregated trainable shares (%) of Table 12's four schedules on ResNet-50."""
    from .freezing import aggregated_share

    model = _resnet50_meta()
    out = {}
    for unfreeze in (True, False):
        for reverse in (True, False):
            share = aggregated_share(model, epochs, unfreeze=unfreeze, reverse=reverse)
            out[("✓" if unfreeze else "✗", "✓" if reverse else "✗")] = 100 * share
    return out


def resnet50_method_shares(ranks: Iterable[int] = (1, 2, 5, 10)) -> dict[str, float]:
    """Trainable shares (%) of Section 3.1's methods on ResNet-50, counted by the code that trains."""
    from ..lora import LoraSpec
    from .retrain import base_parameter_count, prepare_

    out = {}
    for method in ("bn-parameters", "linear-probing"):
        model = _resnet50_meta()
        out[METHOD_LABELS[method]] = 100 * prepare_(model, method) / base_parameter_count(model)
    for r in ranks:
        model = _resnet50_meta()
        trainable = prepare_(model, "perp", LoraSpec(kind="plain", rank=r, alpha=float(r)))
        out[method_label("perp", r)] = 100 * trainable / base_parameter_count(model)
    return out


# --- Figure 1 ---


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two feature maps (flattened)."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    den = float(a.norm() * b.norm())
    if den == 0:
        raise ValueError("cosine similarity of an all-zero feature map")
    return float(a @ b) / den


def feature_similarity(maps: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean over images of each map's cosine similarity to the dense map (``maps['dense']``,
    ``[N, C, H, W]``): 1 = the same features."""
    dense = maps["dense"]
    return {k: sum(cosine_similarity(dense[i], v[i]) for i in range(len(dense))) / len(dense) for k, v in maps.items()}


def feature_layer_of(model: nn.Module, requested: str) -> str:
    """``requested`` when the model has that convolution, else the last convolution of the
    requested stage (or of the first stage), with a line saying so (e.g. the dry run's small model)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if requested in convs:
        return requested
    stage = requested.split(".")[0] + "."
    same = [n for n in convs if n.startswith(stage)] or [n for n in convs if n.startswith("layer1.")] or convs
    print(f"{type(model).__name__} has no convolution '{requested}': Figure 1 uses '{same[-1]}'")
    return same[-1]


def most_affected_filter(maps: Mapping[str, torch.Tensor], image: int = 0) -> int:
    """Among the filters with above-median dense response on ``image``, the one pruning changes most."""
    dense, pruned = maps["dense"][image], maps["pruned"][image]
    norms = dense.flatten(1).norm(dim=1)
    live = torch.nonzero(norms >= norms.median()).flatten().tolist()
    return min(live, key=lambda c: cosine_similarity(dense[c], pruned[c]) if float(pruned[c].norm()) > 0 else -1.0)


# --- claims ---


def _fmt(values: Mapping[Any, float], digits: int = 2) -> str:
    return ", ".join(f"{k}: {v:.{digits}f}" for k, v in values.items())


def _row(table, label: str) -> dict[str, float] | None:
    rows = table[table["method"] == label]
    if rows.empty:
        return None
    cols = [c for c in table.columns if c.endswith("%") and not c.startswith("%")]
    return {c: float(rows.iloc[0][c]) for c in cols}


def claims_31(
    frame,
    first_epochs: int,
    last_epochs: int,
    similarity: Mapping[str, float] | None,
    method_shares: Mapping[str, float] | None = None,
) -> list[Claim]:
    """Claims C6a-f and F1 of notebook 31 from the accuracy frame, Figure 1's similarities and
    the ResNet-50 shares (rules fixed before the numbers)."""
    first, last = accuracy_table(frame, first_epochs), accuracy_table(frame, last_epochs)
    dense = _row(first, "Dense")
    none, full = _row(first, "No retraining"), _row(first, "Full IMP")
    level = {c: float(c.rstrip("%")) for c in dense}
    out = []
    # C6a
    if none:
        drops = {c: dense[c] - none[c] for c in none}
        out.append(Claim("C6a", "Without retraining, magnitude pruning collapses the accuracy", "Section 3.1, Figure 2",
                         "far below dense at 70-90%", "dense - pruned (points): " + _fmt(drops, 1),
                         all(d >= 10 for d in drops.values()), "≥ 10 points below dense at every sparsity"))  # fmt: skip
    # C6b
    bnr = _row(first, "BN-Recalibrate")
    if bnr and none:
        rec = {c: (bnr[c] - none[c]) / (dense[c] - none[c]) for c in none if dense[c] - none[c] > 0}
        mean = sum(rec.values()) / max(len(rec), 1)
        out.append(Claim("C6b", "BN-Recalibrate recovers much of the lost accuracy", "Section 3.1, Figure 2",
                         "large recovery", f"recovered share of the loss: {_fmt(rec)} (mean {mean:.2f})",
                         bool(rec) and mean >= 0.5, "mean recovered share ≥ 0.5 (1 epoch)"))  # fmt: skip
    # C6c
    bnp = _row(first, "BN-Parameters")
    if bnp and full:
        low = [c for c in bnp if level[c] <= 70]
        gaps = {c: full[c] - bnp[c] for c in low}
        out.append(Claim("C6c", "BN-Parameters nearly matches Full IMP up to 70% sparsity", "Section 3.1, Figure 2",
                         "0.21% of the parameters", "Full IMP - BN-Parameters (points): " + _fmt(gaps),
                         bool(low) and all(g <= 1 for g in gaps.values()), "within 1 point at every sparsity ≤ 70%"))  # fmt: skip
    # C6d: the paper's PERP = plain LoRA at the largest rank
    perps = sorted((m for m in first["method"] if m.startswith("PERP (")), key=_rank)
    if perps and full:
        perp = _row(first, perps[-1])
        gaps = {c: perp[c] - full[c] for c in perp}
        low = [c for c in perp if level[c] <= 75]
        top = max(perp, key=lambda c: level[c])
        holds = bool(low) and all(gaps[c] >= 0 for c in low) and gaps[top] < 0
        out.append(Claim("C6d", "PERP matches or exceeds Full IMP up to ~75% after one epoch, not at the highest "
                         "sparsity", "Section 3.1, Figure 2", "PERP ≥ Full IMP up to 70-75%",
                         f"{perps[-1]} - Full IMP (points): " + _fmt(gaps), holds,
                         "≥ 0 at every sparsity ≤ 75%, < 0 at the highest"))  # fmt: skip
    # C6e
    full_last = _row(last, "Full IMP")
    others = [m for m in last["method"] if m not in ("Dense", "Full IMP", "No retraining")]
    if full_last and others and last_epochs != first_epochs:
        high = [c for c in full_last if level[c] >= 80]
        leads = {c: full_last[c] - max(_row(last, m)[c] for m in others if c in _row(last, m)) for c in high}
        out.append(Claim("C6e", f"With more retraining ({last_epochs} epochs) Full IMP leads at high sparsity",
                         "Section 3.1, Figure 4", "Full IMP best at high sparsity",
                         "Full IMP - best other (points): " + _fmt(leads),
                         bool(high) and all(v >= 0 for v in leads.values()), "≥ 0 at every sparsity ≥ 80%"))  # fmt: skip
    # C6f
    if method_shares is not None:
        ours = {k: method_shares[k] for k in PAPER_SHARES if k in method_shares}
        out.append(Claim("C6f", "Trainable shares on ResNet-50", "Section 3.1, Figure 2",
                         _fmt(PAPER_SHARES), _fmt(ours),
                         len(ours) == len(PAPER_SHARES) and all(abs(ours[k] - PAPER_SHARES[k]) <= 0.05 for k in ours),
                         "each within ±0.05 points (meta-device ResNet-50, our accounting)"))  # fmt: skip
    if similarity is not None:
        p, r = similarity["pruned"], similarity["retrained"]
        out.append(Claim("F1", "Pruning diminishes feature quality without eradicating it; retraining restores it",
                         "Section 3.1, Figure 1", "qualitative (feature maps)",
                         f"cosine to dense: pruned {p:.3f}, retrained {r:.3f}", 0.25 < p < 0.95 and r > p,
                         "0.25 < pruned < 0.95 and retrained > pruned"))  # fmt: skip
    return out


def _spearman(x: list[float], y: list[float]) -> float:
    import pandas as pd

    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


def claims_34(table, resnet50_shares: Mapping[tuple[str, str], float] | None = None) -> list[Claim]:
    """Claims C7 (accuracy tracks the trainable share, ✗✓ clearly worst) and C7a (our schedule
    gives the paper's ResNet-50 shares) from :func:`table12`'s frame."""
    out = []
    diff_cols = [c for c in table.columns if c.startswith("Δ acc")]
    if diff_cols:
        diff = table[diff_cols].mean(axis=1).tolist()
        share = table["% agg. trainable"].tolist()
        labels = [f"{u}{r}" for u, r in zip(table["unfreeze"], table["reverse"], strict=True)]
        rho = _spearman(share, diff)
        worst = labels[diff.index(min(diff))]
        gap = sorted(diff)[1] - min(diff)
        ours = ", ".join(f"{lbl} {s:.2f}% → {d:+.2f}" for lbl, s, d in zip(labels, share, diff, strict=True))
        out.append(Claim("C7", "Accuracy tracks the aggregated trainable share; ✗✓ (fewest) clearly worst",
                         "Section 3.4, Table 12", "✓✓ best, ✗✓ worst", f"{ours}; Spearman {rho:.2f}",
                         rho >= 0.8 and worst == "✗✓" and gap >= 0.5,
                         "Spearman(share, Δ acc) ≥ 0.8 and ✗✓ lowest by ≥ 0.5 points"))  # fmt: skip
    if resnet50_shares is not None:
        out.append(Claim("C7a", "Aggregated trainable shares of the four schedules (ResNet-50, 5 epochs/phase)",
                         "Section 3.4, Table 12", _fmt({f"{u}{r}": v for (u, r), v in PAPER_TABLE12.items()}),
                         _fmt({f"{u}{r}": resnet50_shares[(u, r)] for (u, r) in PAPER_TABLE12}),
                         all(abs(resnet50_shares[k] - v) <= 0.01 for k, v in PAPER_TABLE12.items()),
                         "each within ±0.01 points"))  # fmt: skip
    return out

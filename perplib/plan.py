"""The LLM run plan of a profile: one place that turns a profile's ``retraining`` mapping into run
configurations, so that every notebook builds the *same* configuration for the same run and the
results store holds it once (Table 1 and Figure 3 are the same runs; the magnitude rows of
Tables 2/9/10/15 and Table 13's rows reuse Table 1's records).

A profile's ``common`` section carries::

    retraining:
      steps: 48            # optimizer steps of every claim-carrying run
      batch_size: 1
      grad_accum: 1
      lora_rank: 16
      lora_alpha: 32.0
      dtype: float32
      grad_checkpointing: false
      eval_every: 6        # Figure 3's evaluation interval (only on Figure 3's runs)
      figure3: {prune: magnitude, sparsities: ["0.5"], lora: masked}
      lr: {perp: 4.0e-3, full: 5.0e-4, ln: 5.0e-3, linear-probing: 5.0e-3, default: 4.0e-3}
      selection: {steps: 16, prune: magnitude, sparsity: "0.5", grid: {perp: [...], ...}}

Learning rates are chosen on the *validation* split (``eval_split='val'``: wiki-vital articles of
a hash bucket disjoint from training and evaluation; WikiText-2's validation split) by
``python -m perplib.plan select-lr --profile P``, never on the evaluation text; the chosen rates
are written into the profile's ``lr`` mapping by hand, with the validation perplexities beside them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from .config import RunConfig, retrain_groups
from .retrain import canonical_retrain, method_config

RETRAINING_KEYS = {"steps", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "dtype", "grad_checkpointing",
                   "eval_every", "figure3", "lr", "selection", "zero_shot", "lora_targets"}  # fmt: skip
# run_config overrides that keep a run one of Table 2's rows (zero-shot accuracy is measured on those)
_PLAIN_CHANGES = {"scope", "seed"}
LR_KEYS = ("perp", "full", "ln", "linear-probing")


def check_retraining(retraining: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a profile's ``retraining`` mapping; returns it as a plain dict."""
    if not isinstance(retraining, Mapping):
        raise ValueError(f"retraining must be a mapping, got {type(retraining).__name__}")
    if unknown := sorted(set(retraining) - RETRAINING_KEYS):
        raise ValueError(f"retraining has unknown key(s) {unknown}; allowed: {sorted(RETRAINING_KEYS)}")
    if missing := sorted({"steps", "lr"} - set(retraining)):
        raise ValueError(f"retraining needs {missing}")
    lr = retraining["lr"]
    if not isinstance(lr, Mapping) or "default" not in lr:
        raise ValueError(f"retraining.lr must map methods to rates and have a 'default', got {lr!r}")
    for k, v in lr.items():
        if k != "default":
            canonical_retrain(retrain_groups(k))  # a preset or groups, checked
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"retraining.lr[{k!r}] must be a positive number, got {v!r}")
    zs = retraining.get("zero_shot")
    if zs is not None and (not isinstance(zs, Mapping) or not zs.get("tasks") or "sparsities" not in zs):
        raise ValueError(f"retraining.zero_shot must be {{tasks: ..., sparsities: [...]}}, got {zs!r}")
    return dict(retraining)


def _canonical_sparsities(values) -> set[str]:
    """Sparsities as a run's config spells them (0.5, "0.5" and "50%" are one)."""
    return {str(RunConfig(prune="magnitude", sparsity=str(s)).sparsity) for s in values}


def wants_zero_shot(retraining: Mapping[str, Any], config: RunConfig, plain: bool) -> bool:
    """Table 11's rows: the dense model and, at the zero-shot sparsities, each criterion without
    retraining and with PERP (Figure 3's LoRA kind), for runs of the plan without special overrides."""
    zs = retraining.get("zero_shot")
    if not zs or not plain:
        return False
    if config.prune == "none":
        return config.retrain == "none"
    sparsities = _canonical_sparsities(zs["sparsities"])
    lora = (retraining.get("figure3") or {}).get("lora", "masked")
    return config.sparsity in sparsities and (
        config.retrain == "none" or (config.retrain == "perp" and config.lora == lora)
    )


def learning_rate(retraining: Mapping[str, Any], method: str) -> float:
    """The profile's rate for a method (a preset or '+'-joined groups): its own, else 'default'."""
    lr = retraining["lr"]
    key = canonical_retrain(retrain_groups(method))
    for name, value in lr.items():
        if name != "default" and canonical_retrain(retrain_groups(name)) == key:
            return float(value)
    return float(lr["default"])


def is_figure3_run(retraining: Mapping[str, Any], prune: str, sparsity: str, method: str, lora: str) -> bool:
    """Figure 3's runs are PERP runs of its criterion, sparsities and LoRA kind: they alone evaluate
    every ``eval_every`` steps (evaluations cost as much as many steps on a laptop)."""
    fig = retraining.get("figure3") or {}
    sparsities = _canonical_sparsities(fig.get("sparsities", []))
    return (
        bool(retraining.get("eval_every"))
        and canonical_retrain(retrain_groups(method)) == "perp"
        and prune == fig.get("prune", "magnitude")
        and str(sparsity) in sparsities
        and lora == fig.get("lora", "masked")
    )


def base_config(common: Mapping[str, Any], model: str, **changes: Any) -> RunConfig:
    """``model`` under the profile's common text and window settings, with ``changes``."""
    keys = ("eval", "calib", "train", "seqlen", "windows", "nsamples")
    return RunConfig(model=model, **{k: common[k] for k in keys if k in common}).replace(**changes)


def run_config(
    common: Mapping[str, Any],
    retraining: Mapping[str, Any],
    model: str,
    prune: str = "none",
    sparsity: str | float = "0.5",
    method: str | tuple[str, ...] = "none",
    *,
    lora: str = "masked",
    **changes: Any,
) -> RunConfig:
    """One run of the plan (the defaults: the dense baseline of ``model``, shared by every table):
    ``model`` pruned by ``prune`` to ``sparsity`` and retrained by ``method``
    with the profile's retraining settings and the method's rate (``changes`` override, e.g. a
    LoRA rank for Table 14 or ``steps``). Fields that cannot change the result are normalised (no
    calibration for magnitude/none; see ``method_config``), so equal runs get equal keys."""
    check_retraining(retraining)
    method = method if isinstance(method, str) else canonical_retrain(method)
    # lora_targets: RunConfig's LoRA target set (issue 15), passed through when the profile sets it
    loop = {k: retraining[k] for k in ("batch_size", "grad_accum", "lora_rank", "lora_alpha", "dtype",
                                        "grad_checkpointing", "lora_targets") if k in retraining}  # fmt: skip
    config = base_config(common, model, prune=prune, sparsity=str(sparsity), **loop)
    if prune == "none":
        config = config.replace(sparsity=RunConfig().sparsity)
    if prune in ("none", "magnitude"):  # no calibration data: these fields cannot change the run
        defaults = RunConfig()
        config = config.replace(calib=defaults.calib, nsamples=defaults.nsamples)
    plain = set(changes) <= _PLAIN_CHANGES  # a run of Tables 1/2/13 itself, not a variant (Table 14, selection)
    figure3 = plain and is_figure3_run(retraining, prune, config.sparsity, method, lora)
    eval_every = retraining.get("eval_every", 0) if figure3 else 0
    settings = {"steps": retraining["steps"], "lr": learning_rate(retraining, method), "lora": lora,
                "eval_every": eval_every, **changes}  # fmt: skip
    config = method_config(config, method, **settings)
    if wants_zero_shot(retraining, config, plain=plain):
        config = config.replace(zero_shot=retraining["zero_shot"]["tasks"])
    return config


def group_method(groups: tuple[str, ...], include_biases: bool = True) -> str:
    """Table 13's method for a combination of groups. For a model without biases (``include_biases``
    False) the empty *Biases* group is added to every non-empty combination, so that LN, LN + Head
    and all four groups are the presets ``ln``, ``linear-probing`` and ``perp`` and share Table 1's
    records (the same training: there is no bias to train)."""
    groups = tuple(groups)
    if groups and not include_biases and "biases" not in groups:
        groups = ("biases", *groups)
    return canonical_retrain(groups)


# -- learning-rate selection on the validation split --------------------------------------------


def selection_configs(common: Mapping[str, Any], retraining: Mapping[str, Any], model: str) -> list[RunConfig]:
    """Every candidate of the profile's ``selection`` grid: short runs evaluated on the validation split."""
    sel = retraining.get("selection") or {}
    if not sel.get("grid"):
        raise ValueError("retraining.selection.grid is empty: nothing to choose from")
    out = []
    for method, rates in sel["grid"].items():
        for lr in rates:
            out.append(run_config(common, retraining, model, sel.get("prune", "magnitude"), sel.get("sparsity", "0.5"),
                                  method, steps=sel.get("steps", retraining["steps"]), lr=float(lr), eval_every=0,
                                  eval_split="val"))  # fmt: skip
    return out


def choose_rates(records: list[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per method, the rate with the lowest validation perplexity: {method: (lr, perplexity)}.
    A diverged candidate (no record, or a non-finite perplexity) is never chosen."""
    best: dict[str, tuple[float, float]] = {}
    for r in records:
        c, ppl = r["config"], r["metrics"]["perplexity"]
        if c.get("eval_split") != "val":
            raise ValueError("learning rates are chosen on the validation split only, got a record evaluated on "
                             f"{c.get('eval_split')!r}")  # fmt: skip
        if not math.isfinite(ppl):
            continue
        if c["retrain"] not in best or ppl < best[c["retrain"]][1]:
            best[c["retrain"]] = (c["lr"], ppl)
    return best


def select_lr(profile: str, model: str | None = None) -> list[dict[str, Any]]:
    """Run the selection grid of a profile (reusing finished runs); returns one row per candidate."""
    from .experiments import run_llm
    from .reproduce import load_profile
    from .results import ResultStore
    from .retrain import Diverged

    data = load_profile(profile)
    common = data.get("common") or {}
    retraining = check_retraining(common.get("retraining") or {})
    model = model or (data.get("00_dense_baselines") or {}).get("models", ["smollm2-135m"])[0]
    store = ResultStore.for_profile(profile)
    rows = []
    for config in selection_configs(common, retraining, model):
        try:
            ppl = run_llm(config, store)["metrics"]["perplexity"]
        except Diverged:
            ppl = math.inf
        rows.append({"method": config.retrain, "lr": config.lr, "steps": config.steps, "val_perplexity": ppl})
        print(f"{config.retrain:>16} lr={config.lr:.1e} steps={config.steps}: validation perplexity {ppl:.2f}",
              flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perplib.plan", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("select-lr", help="run the profile's learning-rate grid on the validation split")
    p.add_argument("--profile", default="embedded")
    p.add_argument("--model", default=None, help="default: the profile's first dense-baseline model")
    args = parser.parse_args(argv)
    rows = select_lr(args.profile, args.model)
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if math.isfinite(r["val_perplexity"]) and (
            r["method"] not in best or r["val_perplexity"] < best[r["method"]][1]
        ):
            best[r["method"]] = (r["lr"], r["val_perplexity"])
    print("chosen (write these into the profile's retraining.lr):")
    for method, (lr, ppl) in best.items():
        print(f"  {method}: {lr:.1e}   # validation perplexity {ppl:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

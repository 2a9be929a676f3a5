"""Learning-rate schedules for pretraining and retraining (paper Appendix A.1-A.2).

Pretraining (Table 3): linear from ``lr_max`` to 0 over ``T`` epochs. Retraining for ``T_rt``
epochs after a pruning step, with the schedules Appendix A.2 compares:

- ``ft``   (Han et al. 2015): constant, the rate of the last pretraining epoch, ``eta(T-1)``;
- ``lrw``  (Renda et al. 2020): the last ``T_rt`` epochs of the pretraining schedule, replayed;
- ``slr``  (Le & Hua 2021): the whole pretraining schedule compressed into ``T_rt``, after a warmup;
- ``clr``  (Le & Hua 2021): cosine from ``lr_max`` to 0, after a warmup;
- ``llr``  (Zimmer et al. 2023): linear from ``lr_max`` to 0, after a warmup;
- ``allr`` (Zimmer et al. 2023, the paper's default): linear from ``d * lr_max`` to 0 after a
  warmup, ``d = min(1, max(d_1, d_2))`` with ``d_1 = ||W - W_p|| / (||W|| sqrt(s))`` the relative
  L2 change of pruning normalised by the fraction ``s`` of remaining weights it removed (random
  pruning of a fraction s gives ``d_1 ~ 1``) and ``d_2 = T_rt / T`` the relative retraining length.

All schedules are pure functions of the (fractional) retraining epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("allr", "ft", "lrw", "slr", "clr", "llr")
WARMUP_SCHEDULES = ("allr", "slr", "clr", "llr")


def pretrain_lr(epoch: float, lr_max: float, epochs: int) -> float:
    """Table 3: linear from ``lr_max`` at epoch 0 to 0 at ``epochs``."""
    return lr_max * max(0.0, 1.0 - epoch / epochs)


def allr_factor(relative_change: float, pruned_fraction: float, retrain_epochs: float, pretrain_epochs: float) -> float:
    """ALLR's discount ``d = min(1, max(d_1, d_2))`` (Zimmer et al. 2023, Section 4).

    ``relative_change`` = ``||W - W_p|| / ||W||``; ``pruned_fraction`` = share of the weights that
    were still non-zero before this pruning step and are removed by it.
    """
    if not 0.0 < pruned_fraction <= 1.0:
        return min(1.0, retrain_epochs / pretrain_epochs)
    d1 = relative_change / math.sqrt(pruned_fraction)
    d2 = retrain_epochs / pretrain_epochs
    return min(1.0, max(d1, d2))


def retrain_lr(
    schedule: str,
    *,
    lr_max: float,
    pretrain_epochs: int,
    retrain_epochs: int,
    allr_d: float = 1.0,
    warmup: float = 0.05,
) -> Callable[[float], float]:
    """The learning rate as a function of the fractional retraining epoch ``t`` in ``[0, T_rt)``.

    ``warmup``: fraction of the retraining run with a linear warmup (ALLR, SLR, CLR, LLR).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if retrain_epochs < 1 or pretrain_epochs < 1:
        raise ValueError(f"epochs must be >= 1, got retrain {retrain_epochs}, pretrain {pretrain_epochs}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
    T, T_rt = pretrain_epochs, retrain_epochs

    def base(t: float) -> float:
        if schedule == "ft":
            return pretrain_lr(T - 1, lr_max, T)
        if schedule == "lrw":
            return pretrain_lr(max(T - T_rt, 0) + t * min(T_rt, T) / T_rt, lr_max, T)
        if schedule == "slr":
            return pretrain_lr(t * T / T_rt, lr_max, T)
        if schedule == "clr":
            return 0.5 * lr_max * (1.0 + math.cos(math.pi * t / T_rt))
        peak = lr_max * (allr_d if schedule == "allr" else 1.0)
        return peak * max(0.0, 1.0 - t / T_rt)

    def lr(t: float) -> float:
        value = base(t)
        if schedule in WARMUP_SCHEDULES and warmup > 0 and t < warmup * T_rt:
            # ramp up to the schedule's value at the end of the warmup
            value = base(warmup * T_rt) * (t + 1e-12) / (warmup * T_rt)
        return value

    return lr

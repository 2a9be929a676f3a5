"""Learning-rate schedules for pretraining and retraining (paper Appendix A.1-A.2).

Pretraining (Table 3): linear from ``lr_max`` to 0 over ``T`` epochs. Retraining for ``T_rt``
epochs after a pruning step, with the schedules Appendix A.2 compares:

- ``ft``   (Han et al. 2015): constant, the final rate of pretraining (its last step's rate);
- ``lrw``  (Renda et al. 2020): the last ``T_rt`` epochs of the pretraining schedule, replayed;
- ``slr``  (Le & Hua 2021): the whole pretraining schedule compressed into ``T_rt``, after a warmup;
- ``clr``  (Le & Hua 2021): cosine from ``lr_max`` to 0, after a warmup;
- ``llr``  (Zimmer et al. 2023): linear from ``lr_max`` to 0, after a warmup;
- ``allr`` (Zimmer et al. 2023, the paper's default): linear from ``d * lr_max`` to 0 after a
  warmup, ``d = min(1, max(d_1, d_2))`` with ``d_1 = ||W - W_p|| / (||W|| sqrt(s))`` the relative
  L2 change of pruning over *all* parameters of the model (as the official code of Zimmer et al.:
  BatchNorm and biases count in ``||W||``) normalised by the fraction ``s`` of remaining weights
  it removed, and ``d_2 = T_rt / T`` the relative retraining length.

Warmup: a half-cosine ramp over the first 10% of a retraining cycle (ALLR, SLR, CLR, LLR), as the official code. All
schedules are pure functions of the (fractional) retraining epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("allr", "ft", "lrw", "slr", "clr", "llr")
WARMUP_SCHEDULES = ("allr", "slr", "clr", "llr")
WARMUP = 0.1  # fraction of a retraining cycle (official code)


def pretrain_lr(epoch: float, lr_max: float, epochs: int) -> float:
    """Table 3: linear from ``lr_max`` at epoch 0 to 0 at ``epochs``."""
    return lr_max * max(0.0, 1.0 - epoch / epochs)


def final_pretrain_lr(lr_max: float, epochs: int, steps_per_epoch: int) -> float:
    """The rate of pretraining's last step (steps sit at fractional epochs ``epoch + (i + 0.5) / steps``)."""
    return pretrain_lr(epochs - 0.5 / steps_per_epoch, lr_max, epochs)


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
    warmup: float = WARMUP,
    ft_lr: float | None = None,
) -> Callable[[float], float]:
    """The learning rate as a function of the fractional retraining epoch ``t`` in ``[0, T_rt)``.

    ``warmup``: fraction of the retraining run with a linear warmup (ALLR, SLR, CLR, LLR).
    ``ft_lr``: FT's constant rate (the final pretraining rate; default: that of one step per epoch).
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
            return ft_lr if ft_lr is not None else final_pretrain_lr(lr_max, T, 1)
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
            # half-cosine ramp up to the schedule's value at the end of the warmup (official code)
            value = base(warmup * T_rt) * 0.5 * (1.0 - math.cos(math.pi * t / (warmup * T_rt)))
        return value

    return lr

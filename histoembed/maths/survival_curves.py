"""Kaplan–Meier curves, the log-rank test, the Breslow baseline and a calibration table (issue 29).

Inputs everywhere: ``time`` (positive, any unit), ``event`` (1 = the event was observed at ``time``,
0 = censored then: the patient was event-free until ``time`` and not followed further) and, where a model
is involved, ``risk``: a Cox linear predictor, higher = earlier event.

- :func:`kaplan_meier` equals scikit-survival's ``kaplan_meier_estimator`` (tests check it);
- :func:`logrank` equals ``sksurv.compare.compare_survival`` (the chi-square with groups - 1 degrees of
  freedom; two groups here, so its p-value is ``erfc(sqrt(chi2 / 2))``);
- :func:`breslow` equals ``sksurv.linear_model.coxph.BreslowEstimator``: the baseline cumulative hazard
  H0(t) = sum over event times s <= t of d(s) / sum_{j at risk at s} exp(risk_j), so that a patient's
  survival is S(t) = exp(-H0(t) exp(risk)). Fit it on the rows that trained the risk model (for
  out-of-fold risks: per fold, on that fold's training rows, since folds' risks are on different scales).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


def check_survival(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``time`` as float (positive, finite) and ``event`` as bool (0/1 only), else ``ValueError`` naming the row."""
    time = np.asarray(time, dtype=np.float64)
    event_raw = np.asarray(event)
    if time.shape != event_raw.shape or time.ndim != 1:
        raise ValueError(f"time {time.shape} and event {event_raw.shape} must be 1-D of the same length")
    bad = np.flatnonzero(~np.isfinite(time) | (time <= 0))
    if len(bad):
        raise ValueError(f"time must be positive and finite; row {bad[0]} has {time[bad[0]]}")
    bad = np.flatnonzero(~np.isin(event_raw, (0, 1)))
    if len(bad):
        raise ValueError(f"event must be 0 (censored) or 1 (observed); row {bad[0]} has {event_raw[bad[0]]}")
    return time, event_raw.astype(bool)


class Curve(NamedTuple):
    """A Kaplan–Meier curve: at each distinct time, the survival just after it, those at risk just before
    it and the events at it (the curve is a step function, right-continuous)."""

    time: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    def at(self, t: float) -> float:
        """Survival at time ``t`` (1 before the first time)."""
        k = np.searchsorted(self.time, t, side="right") - 1
        return 1.0 if k < 0 else float(self.survival[k])

    def as_dict(self) -> dict:
        return {"time": self.time.tolist(), "survival": self.survival.tolist(),
                "at_risk": self.at_risk.astype(int).tolist(), "events": self.events.astype(int).tolist()}


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> Curve:
    """The Kaplan–Meier estimate of the survival function (product over times of 1 - events / at risk)."""
    time, event = check_survival(time, event)
    times, inverse = np.unique(time, return_inverse=True)
    removed = np.bincount(inverse, minlength=len(times))
    events = np.bincount(inverse, weights=event, minlength=len(times))
    at_risk = len(time) - np.concatenate([[0], np.cumsum(removed)[:-1]])
    return Curve(times, np.cumprod(1.0 - events / at_risk), at_risk, events)


def greenwood_interval(curve: Curve, t: float, z: float = 1.959964) -> tuple[float, float]:
    """95 % interval of the Kaplan–Meier survival at ``t`` (Greenwood variance, log(-log) transform)."""
    s = curve.at(t)
    k = np.searchsorted(curve.time, t, side="right")
    d, r = curve.events[:k], curve.at_risk[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        var = float(np.sum(d / (r * (r - d))))
    if not 0 < s < 1 or not math.isfinite(var):
        return (float("nan"), float("nan")) if not 0 < s <= 1 else (s, s)
    se = math.sqrt(var) / abs(math.log(s))
    return s ** math.exp(z * se), s ** math.exp(-z * se)


def logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """(chi-square, p-value) of the log-rank test that two groups (``group`` True/False) share one survival
    function. Each event time contributes observed minus expected events of the True group under the null
    and the hypergeometric variance. NaN when a group is empty or there is no event."""
    time, event = check_survival(time, event)
    group = np.asarray(group, dtype=bool)
    if group.all() or not group.any() or not event.any():
        return float("nan"), float("nan")
    times, inverse = np.unique(time, return_inverse=True)
    k = len(times)

    def at_risk(mask: np.ndarray) -> np.ndarray:
        removed = np.bincount(inverse[mask], minlength=k)
        return mask.sum() - np.concatenate([[0], np.cumsum(removed)[:-1]])

    n_all, n_one = at_risk(np.ones_like(group)), at_risk(group)
    d_all = np.bincount(inverse, weights=event, minlength=k)
    d_one = np.bincount(inverse, weights=event & group, minlength=k)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = d_all * n_one / n_all
        var = np.where(n_all > 1, d_all * (n_one / n_all) * (1 - n_one / n_all) * (n_all - d_all) / (n_all - 1), 0.0)
    chi2 = float((d_one.sum() - expected.sum()) ** 2 / var.sum()) if var.sum() > 0 else float("nan")
    return chi2, (math.erfc(math.sqrt(chi2 / 2)) if math.isfinite(chi2) else float("nan"))


def risk_halves(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict:
    """Kaplan–Meier curves of the low- and high-risk halves (split at the median risk; a risk equal to the
    median counts as low) and the log-rank p-value between them: the report's survival plot.

    Returns ``{"threshold": median, "low": curve dict, "high": curve dict, "logrank_chi2", "logrank_p",
    "n_low", "n_high"}`` (curve dicts as :meth:`Curve.as_dict`; an empty half gives None).
    """
    time, event = check_survival(time, event)
    risk = np.asarray(risk, dtype=np.float64)
    threshold = float(np.median(risk))
    high = risk > threshold
    chi2, p = logrank(time, event, high)
    return {"threshold": threshold,
            "low": kaplan_meier(time[~high], event[~high]).as_dict() if (~high).any() else None,
            "high": kaplan_meier(time[high], event[high]).as_dict() if high.any() else None,
            "n_low": int((~high).sum()), "n_high": int(high.sum()),
            "logrank_chi2": None if not math.isfinite(chi2) else chi2, "logrank_p": None if not math.isfinite(p) else p}


class Baseline(NamedTuple):
    """Breslow's baseline cumulative hazard: ``cum_hazard[k]`` from time 0 up to and including ``time[k]``."""

    time: np.ndarray
    cum_hazard: np.ndarray

    def survival(self, risk: np.ndarray, horizon: float) -> np.ndarray:
        """Each risk's survival probability at ``horizon``: exp(-H0(horizon) exp(risk))."""
        k = np.searchsorted(self.time, horizon, side="right") - 1
        h0 = 0.0 if k < 0 else float(self.cum_hazard[k])
        return np.exp(-h0 * np.exp(np.asarray(risk, dtype=np.float64)))


def breslow(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> Baseline:
    """Breslow's estimate of the baseline cumulative hazard for a Cox linear predictor ``risk``.

    At each distinct time: events there over the sum of exp(risk) of those still at risk (ties: Breslow).
    ``risk`` must be the linear predictor itself (log hazard ratio), not a rank or a probability.
    """
    time, event = check_survival(time, event)
    risk = np.asarray(risk, dtype=np.float64)
    times, inverse = np.unique(time, return_inverse=True)
    events = np.bincount(inverse, weights=event, minlength=len(times))
    weight = np.exp(risk - risk.max())             # shift for overflow; undone below
    at_risk = np.cumsum(np.bincount(inverse, weights=weight, minlength=len(times))[::-1])[::-1]
    hazard = events / at_risk * np.exp(-risk.max())
    return Baseline(times, np.cumsum(hazard))


def calibration_table(time: np.ndarray, event: np.ndarray, predicted: np.ndarray, horizon: float,
                      bins: int = 3) -> list[dict]:
    """Predicted against observed survival at ``horizon`` in groups of predicted survival.

    ``predicted`` is each row's survival probability at ``horizon`` (e.g. :meth:`Baseline.survival` of
    its out-of-fold risk with its fold's baseline). Rows are cut into ``bins`` equal-count groups from
    the lowest predicted survival up; each group reports the mean prediction and the Kaplan–Meier survival
    of its rows at ``horizon`` with a 95 % interval: a calibrated model's points lie on the diagonal.
    """
    time, event = check_survival(time, event)
    predicted = np.asarray(predicted, dtype=np.float64)
    rows = []
    for b, idx in enumerate(np.array_split(np.argsort(predicted, kind="stable"), bins)):
        if not len(idx):
            continue
        curve = kaplan_meier(time[idx], event[idx])
        lo, hi = greenwood_interval(curve, horizon)
        rows.append({"group": b, "rows": int(len(idx)), "events": int(event[idx].sum()),
                     "predicted": float(predicted[idx].mean()), "observed": curve.at(horizon),
                     "observed_lo": None if not math.isfinite(lo) else lo,
                     "observed_hi": None if not math.isfinite(hi) else hi})
    return rows

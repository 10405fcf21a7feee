"""How well risks order patients by time to event: Harrell's C, Uno's C, time-dependent AUC (issue 29).

``risk`` is higher for an earlier event (a Cox linear predictor, or any score with that direction; only
its order matters here). ``time`` > 0, ``event`` 1 = observed, 0 = censored (checked by
:func:`histoembed.maths.survival_curves.check_survival`).

- :func:`harrell_c`: of the pairs whose order is known (the earlier time is an event; a patient censored at
  the very time of another's event counts as surviving longer, two events at one time are not compared),
  the share the risks order correctly, risk ties counting half. Numpy, equal to scikit-survival's
  ``concordance_index_censored`` and to ``lifelines.utils.concordance_index(time, -risk, event)``. It depends
  on the censoring of the cohort: with heavy censoring it weights early events more.
- :func:`uno_c`: Uno's C, the same pairs weighted by the inverse square of the censoring survival at the
  earlier time, up to ``tau``; it estimates a quantity that does not depend on the censoring
  (equal to scikit-survival's ``concordance_index_ipcw(y, y, risk, tau)``: censoring estimated from the
  same rows).
- :func:`time_auc`: at a time t, the chance that a patient with an event by t has a higher risk than one
  still event-free at t (cumulative/dynamic AUC, IPCW; equal to scikit-survival's
  ``cumulative_dynamic_auc(y, y, risk, times)``), read at the quartiles of the event times.

All three are numpy (O(n^2) pairs, in blocks), no scikit-survival at run time: a thousand resamples of
a few hundred patients take seconds; tests/test_survival_metrics.py checks each against scikit-survival.

:func:`survival_numbers` gives all three with bootstrap intervals over patients and the low/high-risk
Kaplan–Meier halves, as one JSON-ready dict.
"""

from __future__ import annotations

import numpy as np

from histoembed.maths.resample import BOOTSTRAP_RESAMPLES, LEVEL, bootstrap_many
from histoembed.maths.survival_curves import check_survival, risk_halves

TIED_RISK = 1e-8   # risks closer than this tie (scikit-survival's tied_tol)
PAIR_BLOCK = 1 << 22  # compare at most this many pairs at once (memory)


def _case_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each event row i (returned as indices): the correctly ordered comparable pairs it heads (risk ties
    counting half) and all comparable pairs it heads. A pair (i, j) is comparable when t_j > t_i, or
    t_j == t_i and j is censored."""
    cases = np.flatnonzero(event)
    hits, pairs = np.zeros(len(cases)), np.zeros(len(cases))
    step = max(1, PAIR_BLOCK // max(len(time), 1))
    for start in range(0, len(cases), step):
        i = cases[start:start + step]
        ti = time[i][:, None]
        comparable = (time[None, :] > ti) | ((time[None, :] == ti) & ~event[None, :])
        diff = risk[i][:, None] - risk[None, :]
        sign = (diff > TIED_RISK).astype(np.int8) - (diff < -TIED_RISK).astype(np.int8)   # 1, 0 (tie), -1
        n = comparable.sum(axis=1)
        hits[start:start + step] = 0.5 * (n + np.where(comparable, sign, 0).sum(axis=1))
        pairs[start:start + step] = n
    return cases, hits, pairs


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; NaN when no pair is comparable (e.g. no event)."""
    time, event = check_survival(time, event)
    _, hits, pairs = _case_counts(time, event, np.asarray(risk, dtype=np.float64))
    return _ratio(hits.sum(), pairs.sum())


def censoring_survival(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """G(t_i): the Kaplan–Meier probability of still being uncensored at each row's own time, censoring
    being the "event" and an event at the same time leaving the risk set first (scikit-survival's
    ``CensoringDistributionEstimator``). 1 everywhere when nobody is censored."""
    time, event = check_survival(time, event)
    if event.all():
        return np.ones(len(time))
    times, inverse = np.unique(time, return_inverse=True)
    k = len(times)
    removed = np.bincount(inverse, minlength=k)
    events = np.bincount(inverse, weights=event, minlength=k)
    censored = removed - events
    at_risk = len(time) - np.concatenate([[0], np.cumsum(removed)[:-1]]) - events
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(censored > 0, censored / at_risk, 0.0)
    return np.cumprod(1.0 - ratio)[inverse]


def _ipcw(time: np.ndarray, event: np.ndarray) -> np.ndarray | None:
    """1 / G(t_i) for events, 0 for censored rows; None when G is 0 at an event (weights undefined)."""
    g = censoring_survival(time, event)
    if np.any(g[event] <= 0):
        return None
    w = np.zeros(len(time))
    w[event] = 1.0 / g[event]
    return w


def uno_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray, tau: float | None = None) -> float:
    """Uno's IPCW concordance: pairs weighted by 1 / G(t_i)^2 of the earlier time, events at or after ``tau``
    left out (none when None); NaN where it cannot be estimated (no comparable pair, or G reaches 0 at an
    event that needs its weight)."""
    time, event = check_survival(time, event)
    w = _ipcw(time, event)
    if w is None:
        return float("nan")
    cases, hits, pairs = _case_counts(time, event, np.asarray(risk, dtype=np.float64))
    weight = w[cases] ** 2 if tau is None else np.where(time[cases] < tau, w[cases] ** 2, 0.0)
    return _ratio(np.sum(weight * hits), np.sum(weight * pairs))


def event_quartiles(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """The 25th, 50th and 75th percentiles of the observed event times: where :func:`time_auc` is read."""
    time, event = check_survival(time, event)
    if not event.any():
        raise ValueError("no observed event: the event times have no quartiles")
    return np.percentile(time[event], [25, 50, 75])


def time_auc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, times) -> np.ndarray:
    """Cumulative/dynamic AUC at each of ``times``: cases are events by t (weighted 1 / G(t_i)), controls
    the rows still event-free after t; the weighted chance a case's risk exceeds a control's (ties half).
    NaN at a time without a case or a control, or where G reaches 0."""
    time, event = check_survival(time, event)
    risk = np.asarray(risk, dtype=np.float64)
    w = _ipcw(time, event)
    out = np.full(len(np.atleast_1d(times)), np.nan)
    if w is None:
        return out
    for k, t in enumerate(np.atleast_1d(np.asarray(times, dtype=np.float64))):
        case, control = event & (time <= t), time > t
        if not case.any() or not control.any():
            continue
        diff = risk[case][:, None] - risk[control][None, :]
        tied = np.abs(diff) <= TIED_RISK
        hits = ((diff > 0) & ~tied).sum(axis=1) + 0.5 * tied.sum(axis=1)
        out[k] = float(np.sum(w[case] * hits) / (w[case].sum() * control.sum()))
    return out


def concordances(time: np.ndarray, event: np.ndarray, risk: np.ndarray, times=(), tau: float | None = None) -> np.ndarray:
    """[Harrell's C, Uno's C, time AUC at each of ``times``...] sharing one pass over the pairs (what a
    bootstrap resample computes)."""
    time, event = check_survival(time, event)
    risk = np.asarray(risk, dtype=np.float64)
    cases, hits, pairs = _case_counts(time, event, risk)
    w = _ipcw(time, event)
    if w is None:
        return np.concatenate([[_ratio(hits.sum(), pairs.sum())], np.full(1 + len(times), np.nan)])
    weight = w[cases] ** 2 if tau is None else np.where(time[cases] < tau, w[cases] ** 2, 0.0)
    return np.concatenate([[_ratio(hits.sum(), pairs.sum()), _ratio(np.sum(weight * hits), np.sum(weight * pairs))],
                           time_auc(time, event, risk, times) if len(times) else []])


def survival_numbers(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, groups=None,
                     n: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL,
                     tau: float | None = None) -> dict:
    """Every survival number of one head's (or the fusion's) out-of-fold risks, JSON-ready::

        {"unit": "patients", "resamples": 1000, "level": 0.95, "rows": 412, "events": 160,
         "harrell_c": {"value", "lo", "hi", "unit", "resamples", "skipped"},
         "uno_c": {...}, "tau": None,
         "time_auc": {"times": [t25, t50, t75], "at": [{...}, {...}, {...}]},
         "risk_halves": {...}}          # :func:`risk_halves`: the KM plot and its log-rank p

    ``groups`` (patient of each row) makes the intervals resample patients; pass one row per patient
    (e.g. a slide-level risk averaged per patient) when the survival outcome is the patient's. The
    time-dependent AUC is read at the quartiles of all rows' event times in every resample (so each
    interval is of the same quantity); a resample without a case or a control at a quartile is skipped
    for that number. ``ValueError`` when there is no event.
    """
    time, event = check_survival(time, event)
    risk = np.asarray(risk, dtype=np.float64)
    quartiles = event_quartiles(time, event)
    numbers = bootstrap_many(lambda t, e, r: concordances(t, e, r, quartiles, tau), time, event, risk,
                             size=2 + len(quartiles), groups=groups, n=n, seed=seed, level=level)
    harrell, uno, *aucs = (iv.as_dict() for iv in numbers)
    return {"unit": numbers[0].unit, "resamples": n, "level": level, "rows": int(len(time)),
            "events": int(event.sum()), "harrell_c": harrell, "uno_c": uno, "tau": tau,
            "time_auc": {"times": quartiles.tolist(), "at": aucs},
            "risk_halves": risk_halves(time, event, risk)}

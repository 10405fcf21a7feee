"""Bootstrap 95 % intervals of any metric, resampling patients when there are patients.

Two slides (or crops) of one patient are not two independent draws: their predictions and labels move
together, so resampling rows makes an interval too narrow. :func:`bootstrap` therefore draws whole
**groups** (the manifest's ``group``, a patient) with replacement when ``groups`` is given and keeps all of
each drawn group's rows, and draws rows only when there are no groups. The returned :class:`Interval` says
which in ``unit`` ("patients" or "images"), so ``metrics.json`` can say it too.

A resample can make a metric undefined: one class only (AUROC), no event (C-index), a constant
prediction (Pearson r). The metric then raises ``ValueError``/``ZeroDivisionError`` or returns a
non-finite number; that resample is skipped and counted in ``skipped``, not replaced, so the interval
describes the resamples where the number exists. When fewer than half of the resamples are usable the
interval is reported as NaN: it would describe a different population than the estimate.

:func:`paired_bootstrap` scores two predictions of the same rows on the same resamples each time (what
``compare`` needs): the interval of the difference is much narrower than two separate intervals suggest,
because both predictions meet the same hard and easy patients.

Usage (the metric takes the resampled arrays, in the order given)::

    iv = bootstrap(metrics.auroc, y, probs, groups=patient, n=1000, seed=0)
    iv.value, iv.lo, iv.hi, iv.unit          # estimate on all rows, percentile interval, "patients"
    d = paired_bootstrap(metrics.auroc, (y, probs_a), (y, probs_b), groups=patient)  # b minus a
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 1000  # default number of resamples of every reported interval
LEVEL = 0.95                # default coverage of every reported interval


class Interval(NamedTuple):
    """An estimate and its bootstrap percentile interval.

    ``value`` is the metric on all rows; ``lo``/``hi`` the percentile interval over the usable resamples;
    ``unit`` what was resampled ("patients" or "images"); ``resamples`` how many were usable and
    ``skipped`` how many were degenerate (metric undefined) and left out.
    """

    value: float
    lo: float
    hi: float
    unit: str
    resamples: int = 0
    skipped: int = 0

    def as_dict(self) -> dict:
        """JSON-ready (NaN becomes None, as JSON has no NaN)."""
        def clean(x: float) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)
        return {"value": clean(self.value), "lo": clean(self.lo), "hi": clean(self.hi), "unit": self.unit,
                "resamples": int(self.resamples), "skipped": int(self.skipped)}


class Resampler:
    """Seeded index draws: whole groups with replacement when ``groups`` is given, rows otherwise."""

    def __init__(self, n_rows: int, groups: Sequence | np.ndarray | None = None, seed: int = 0):
        self.n_rows = int(n_rows)
        self.rng = np.random.default_rng(seed)
        if groups is None:
            self.unit, self._starts = "images", None
            return
        groups = np.asarray(groups)
        if len(groups) != self.n_rows:
            raise ValueError(f"groups has {len(groups)} entries for {self.n_rows} rows")
        _, inverse = np.unique(groups, return_inverse=True)
        inverse = inverse.ravel()
        self.unit = "patients"
        self._order = np.argsort(inverse, kind="stable")           # rows grouped together
        self._counts = np.bincount(inverse)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])

    @property
    def n_units(self) -> int:
        return self.n_rows if self._starts is None else len(self._counts)

    def draw(self) -> np.ndarray:
        """Row indices of one resample (a group drawn twice contributes its rows twice)."""
        if self._starts is None:
            return self.rng.integers(0, self.n_rows, self.n_rows)
        chosen = self.rng.integers(0, len(self._counts), len(self._counts))
        counts = self._counts[chosen]
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return self._order[np.repeat(self._starts[chosen], counts) + offsets]


def _score(metric: Callable, arrays: Sequence[np.ndarray], idx: np.ndarray | None, size: int = 1) -> np.ndarray:
    """The metric (``size`` numbers) on the rows ``idx`` (all rows when None); NaN where it is undefined."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            value = np.asarray(metric(*(a if idx is None else a[idx] for a in arrays)), dtype=np.float64).ravel()
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return np.full(size, np.nan)
    if len(value) != size:
        raise ValueError(f"the metric gave {len(value)} numbers, expected {size}")
    return np.where(np.isfinite(value), value, np.nan)


def _interval(value: float, draws: np.ndarray, unit: str, n: int, level: float) -> Interval:
    ok = draws[np.isfinite(draws)]
    skipped = n - len(ok)
    if len(ok) == 0 or len(ok) < n / 2:
        return Interval(value, float("nan"), float("nan"), unit, len(ok), skipped)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(ok, [tail, 100 - tail])
    return Interval(value, float(lo), float(hi), unit, len(ok), skipped)


def _check(arrays: Sequence[np.ndarray]) -> int:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"arrays of different lengths {sorted(lengths)}")
    return lengths.pop()


def bootstrap(metric: Callable[..., float], *arrays, groups=None, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
              level: float = LEVEL) -> Interval:
    """``metric(*arrays)`` and its percentile interval over ``n`` seeded resamples (groups if given, else rows).

    ``arrays`` are row-aligned (first axis); the metric receives each one indexed by the resample. ``n=0``
    gives the estimate with a NaN interval. Same seed, same data, same interval.
    """
    return bootstrap_many(metric, *arrays, size=1, groups=groups, n=n, seed=seed, level=level)[0]


def bootstrap_many(metric: Callable[..., Sequence[float]], *arrays, size: int, groups=None,
                   n: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL) -> list[Interval]:
    """Like :func:`bootstrap` for a metric returning ``size`` numbers at once (e.g. Harrell's and Uno's C,
    which share their pairs): one interval per number, all from the same resamples, each number's
    degenerate resamples skipped on their own."""
    arrays = [np.asarray(a) for a in arrays]
    rows = _check(arrays)
    sampler = Resampler(rows, groups, seed)
    value = _score(metric, arrays, None, size)
    if n <= 0 or rows == 0:
        return [Interval(float(v), float("nan"), float("nan"), sampler.unit, 0, 0) for v in value]
    draws = np.stack([_score(metric, arrays, sampler.draw(), size) for _ in range(n)])
    return [_interval(float(value[k]), draws[:, k], sampler.unit, n, level) for k in range(size)]


def paired_bootstrap(metric: Callable[..., float], arrays_a: Sequence, arrays_b: Sequence, groups=None,
                     n: int = 2000, seed: int = 0, level: float = LEVEL) -> Interval:
    """``metric(*arrays_b) - metric(*arrays_a)`` and its interval, both scored on the same resample each time.

    ``arrays_a`` and ``arrays_b`` describe the same rows (e.g. ``(y, probs_a)`` and ``(y, probs_b)``; the
    same patients in the same order). A resample where either metric is undefined is skipped. The
    difference is "b better than a" when positive for a higher-is-better metric (AUROC, C, R²).
    """
    arrays_a = [np.asarray(a) for a in arrays_a]
    arrays_b = [np.asarray(b) for b in arrays_b]
    rows = _check(arrays_a + arrays_b)
    sampler = Resampler(rows, groups, seed)
    value = float((_score(metric, arrays_b, None) - _score(metric, arrays_a, None))[0])
    if n <= 0 or rows == 0:
        return Interval(value, float("nan"), float("nan"), sampler.unit, 0, 0)
    draws = np.empty(n)
    for b in range(n):
        idx = sampler.draw()
        draws[b] = (_score(metric, arrays_b, idx) - _score(metric, arrays_a, idx))[0]
    return _interval(value, draws, sampler.unit, n, level)


def spread_over_repeats(values: Sequence[float]) -> dict:
    """Mean and spread of one metric over repeated cross-validations (``fit --repeats-cv N``, eva's practice):
    ``{"repeats", "mean", "std" (sample, ddof=1), "min", "max"}``, undefined repeats (NaN/None) left out.

    The spread says how much the number moves with the fold assignment alone; the bootstrap interval says
    how much it moves with the cohort. Both are worth reporting; they answer different questions.
    """
    ok = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(ok):
        return {"repeats": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"repeats": int(len(ok)), "mean": float(ok.mean()), "std": float(ok.std(ddof=1)) if len(ok) > 1 else None,
            "min": float(ok.min()), "max": float(ok.max())}

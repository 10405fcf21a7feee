"""The numbers ``metrics.json`` reports beside macro-F1 (issue 34), with intervals over patients.

AUROC, average precision, balanced accuracy and the quadratic weighted kappa of one head's (or the
fusion's) out-of-fold rows. The **reported values** are scikit-learn's own functions
(:func:`sklearn_values`: ``roc_auc_score``, ``average_precision_score``, ``balanced_accuracy_score``,
``cohen_kappa_score(weights="quadratic")``); the bootstrap **resamples** use the numpy twins of
:mod:`histoembed.maths.metrics`, equal to them (tests/test_metrics.py) and some hundred times faster,
because every interval calls them a thousand times per head and class.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from histoembed.maths.metrics import (auroc_per_class, average_precision_per_class, balanced_accuracy,
                                      binary_auroc, binary_average_precision, class_ranks, quadratic_kappa)
from histoembed.maths.resample import BOOTSTRAP_RESAMPLES, LEVEL, Interval, bootstrap_many


def ranking_numbers(y: np.ndarray, probs: np.ndarray, classes: list[str], *, pred: np.ndarray | None = None,
                    groups: np.ndarray | None = None, order: list[str] | None = None,
                    n: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL,
                    per_class_intervals: bool = True) -> dict:
    """AUROC, average precision, balanced accuracy and (with ``order``) quadratic kappa, each with its interval.

    Inputs are one head's (or the fusion's) out-of-fold rows: ``y`` class indices into ``classes``,
    ``probs`` [n, C] probabilities, ``pred`` the decided class (argmax of ``probs`` when None; pass the
    decisions after class offsets to score what ``submit`` writes), ``groups`` the patient of each row
    (intervals then resample patients, else images), ``order`` the classes from lowest to highest grade.
    Every interval uses the same ``seed``, so the numbers of one run resample the same patients.

    Returns a JSON-ready dict, e.g. for three classes::

        {"unit": "patients", "resamples": 1000, "level": 0.95, "positive_class": None,
         "auroc": {"value": .91, "lo": .86, "hi": .95, "unit": "patients", "resamples": 1000, "skipped": 0},
         "average_precision": {...}, "balanced_accuracy": {...},
         "auroc_per_class": {"a": {...}, ...}, "average_precision_per_class": {...},
         "quadratic_kappa": {...}}      # only with ``order``

    Binary runs (two classes) report AUROC and AP of ``classes[1]`` (named in ``positive_class``) and no
    per-class entries. ``per_class_intervals=False`` keeps the per-class values but skips their
    bootstraps (C times fewer resamples for many classes).
    """
    y, probs = np.asarray(y, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1) if pred is None else np.asarray(pred, dtype=np.int64)
    C = len(classes)
    if probs.ndim != 2 or probs.shape[1] != C:
        raise ValueError(f"probabilities of shape {probs.shape} for {C} classes")
    ranks = class_ranks(classes, order) if order is not None else None
    head = ["auroc", "average_precision", "balanced_accuracy"] + (["quadratic_kappa"] if order is not None else [])

    def numbers(yy, pp, dd, with_classes: bool) -> np.ndarray:
        """One resample's numbers: the head ones, then (with_classes) AUROC and AP of each class."""
        if C == 2:
            au, ap = [binary_auroc(yy == 1, pp[:, 1])], [binary_average_precision(yy == 1, pp[:, 1])]
        else:
            au, ap = auroc_per_class(yy, pp), average_precision_per_class(yy, pp)
        first = [np.mean(au), np.mean(ap), balanced_accuracy(yy, dd)]
        first += [quadratic_kappa(yy, dd, ranks)] if ranks is not None else []
        return np.concatenate([first, au, ap] if with_classes else [first])

    per_class = C > 2 and per_class_intervals
    intervals = bootstrap_many(lambda a, b, c: numbers(a, b, c, per_class), y, probs, pred,
                               size=len(head) + (2 * C if per_class else 0), groups=groups, n=n, seed=seed,
                               level=level)
    if C > 2 and not per_class:  # the per-class values without their intervals
        unit = intervals[0].unit
        intervals += [Interval(float(v), float("nan"), float("nan"), unit) for v in numbers(y, probs, pred, True)[len(head):]]
    exact = sklearn_values(y, probs, pred, ranks)   # the reported values are scikit-learn's own
    names = head + ([f"auroc:{k}" for k in range(C)] + [f"average_precision:{k}" for k in range(C)] if C > 2 else [])
    intervals = [iv._replace(value=exact[name]) for name, iv in zip(names, intervals)]
    out = {"unit": intervals[0].unit, "resamples": n, "level": level, "positive_class": classes[1] if C == 2 else None,
           "computed_by": "scikit-learn (values); numpy twins equal to it (the bootstrap resamples)"}
    out.update({name: iv.as_dict() for name, iv in zip(head, intervals)})
    if C > 2:
        rest = intervals[len(head):]
        out["auroc_per_class"] = {c: rest[k].as_dict() for k, c in enumerate(classes)}
        out["average_precision_per_class"] = {c: rest[C + k].as_dict() for k, c in enumerate(classes)}
    if order is not None:
        out["class_order"] = list(order)
    return out


def _sklearn(fn, *args, **kwargs) -> float:
    """A scikit-learn metric, NaN where it raises or warns of an undefined value (one class only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(fn(*args, **kwargs))
    except ValueError:
        return float("nan")
    return value if math.isfinite(value) else float("nan")


def sklearn_values(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, ranks: np.ndarray | None = None) -> dict:
    """The numbers of :func:`ranking_numbers` from scikit-learn's own functions: the values ``metrics.json``
    reports. Keys: ``auroc``, ``average_precision``, ``balanced_accuracy``, ``quadratic_kappa`` (with
    ``ranks``) and, for more than two classes, ``auroc:<k>`` and ``average_precision:<k>`` by class index k.

    A class without a positive row has no AUROC and no average precision (scikit-learn raises for the
    first and gives 0 for the second; both are NaN here, and so is their macro mean, as in the twins).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p = np.asarray(y, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    C = p.shape[1]

    def ap(positive, score) -> float:
        return _sklearn(average_precision_score, positive, score) if positive.any() else float("nan")

    out = sklearn_decision_values(y, pred, ranks)
    if C == 2:
        out["auroc"] = _sklearn(roc_auc_score, y == 1, p[:, 1])
        out["average_precision"] = ap(y == 1, p[:, 1])
        return out
    per_auc = [_sklearn(roc_auc_score, y == k, p[:, k]) for k in range(C)]
    per_ap = [ap(y == k, p[:, k]) for k in range(C)]
    everyone = len(np.unique(y)) == C
    out["auroc"] = _sklearn(roc_auc_score, y, p, multi_class="ovr", average="macro",
                            labels=list(range(C))) if everyone else float("nan")
    out["average_precision"] = float(np.mean(per_ap))
    out.update({f"auroc:{k}": v for k, v in enumerate(per_auc)})
    out.update({f"average_precision:{k}": v for k, v in enumerate(per_ap)})
    return out


def sklearn_decision_values(y: np.ndarray, pred: np.ndarray, ranks: np.ndarray | None = None) -> dict:
    """``balanced_accuracy_score`` and (with ``ranks``, class index -> grade) ``cohen_kappa_score`` with
    quadratic weights over every grade (``labels`` given, so a grade nobody has still counts in the weights)."""
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    out = {"balanced_accuracy": _sklearn(balanced_accuracy_score, y, pred) if len(y) else float("nan")}
    if ranks is not None:
        ranks = np.asarray(ranks)
        out["quadratic_kappa"] = _sklearn(cohen_kappa_score, ranks[y], ranks[pred], weights="quadratic",
                                          labels=list(range(len(ranks))))
    return out


def decision_numbers(y: np.ndarray, pred: np.ndarray, *, groups: np.ndarray | None = None,
                     ranks: np.ndarray | None = None, n: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict:
    """Balanced accuracy and (with ``ranks``) quadratic kappa of decided classes ``pred`` (e.g. after the class
    offsets), each with its interval; values from scikit-learn, resamples as :func:`ranking_numbers` draws them."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    names = ["balanced_accuracy"] + (["quadratic_kappa"] if ranks is not None else [])

    def numbers(yy, dd):
        return [balanced_accuracy(yy, dd)] + ([quadratic_kappa(yy, dd, ranks)] if ranks is not None else [])

    intervals = bootstrap_many(numbers, y, pred, size=len(names), groups=groups, n=n, seed=seed, level=level)
    exact = sklearn_decision_values(y, pred, ranks)
    return {name: iv._replace(value=exact[name]).as_dict() for name, iv in zip(names, intervals)}

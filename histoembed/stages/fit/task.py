"""Classification, the task the fold loop fits today: one logit per class, cross-fitted decisions
(temperatures, fusion weights, class offsets, conformal thresholds; ``heads.decisions``) and the
numbers of metrics.json.

By cross-fitting, the parameters applied to fold k are chosen on the other folds' OOF logits only,
so no reported prediction helped choose its own parameters; the final parameters (for the test set)
are chosen on all OOF logits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.maths.metrics import DECISION_METRICS, accuracy_by_quantile, class_ranks, summary, view_spread
from histoembed.maths.reported import decision_numbers, ranking_numbers
from histoembed.models.heads import conformal, decisions
from histoembed.stages.fit.cv import CVResult
from histoembed.stages.fit.training import TrainingSet


def decision_settings(settings: FitSettings, order: list[str] | None = None,
                      classes: list[str] | None = None) -> decisions.DecisionSettings:
    """The decisions' settings; ``order`` (with ``classes``) gives kappa its grades for ``--select-by kappa``."""
    ranks = tuple(int(r) for r in class_ranks(classes, order)) if order is not None and classes else None
    return decisions.DecisionSettings(settings.weight_grid, settings.alpha, settings.class_conditional,
                                      select_by=settings.select_by, ranks=ranks)


def _natural(label: str) -> tuple:
    """Sort key that puts 2 before 10 and G2 before G10: digits compared as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label) if part)


def class_order(classes: list[str], settings: FitSettings) -> list[str] | None:
    """The classes as ordered grades (``class_order``, else label order under ``ordinal``), or None: unordered."""
    if settings.class_order is not None:
        given = list(settings.class_order)
        if sorted(given) != sorted(classes) or len(set(given)) != len(given):
            missing, unknown = sorted(set(classes) - set(given)), sorted(set(given) - set(classes))
            raise UserError(f"[fit] class_order {','.join(given)} must list each training class once: "
                            f"the classes are {', '.join(classes)}"
                            + (f" (missing {', '.join(missing)})" if missing else "")
                            + (f" (not a class: {', '.join(unknown)})" if unknown else ""),
                            hint=f"set class_order to the classes from the lowest grade up, e.g. "
                                 f"{','.join(sorted(classes, key=_natural))}")
        return given
    if settings.ordinal:
        return sorted(classes, key=_natural)
    if settings.select_by == "kappa":
        raise UserError("--select-by kappa needs the order of the classes",
                        hint="set class_order in [fit] of histoembed.toml (lowest grade first), or pass --ordinal "
                             "for label order")
    return None


@dataclass(frozen=True)
class Classification:
    """A head outputs one logit per class; decisions and numbers as ``heads.decisions`` and ``cv_metrics`` say."""

    classes: list[str]
    decision: decisions.DecisionSettings
    units: np.ndarray | None = None      # patient of each image for the intervals (None: images)
    order: list[str] | None = None       # ordered grades, lowest first (kappa), or None

    @property
    def width(self) -> int:
        return len(self.classes)

    def decide(self, z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray) -> tuple[list[dict], dict]:
        return decisions.cross_fit(z, y, fold, self.decision)

    def measure(self, cv: CVResult, y: np.ndarray, settings: FitSettings) -> dict:
        return cv_metrics(cv, y, self.classes, settings, self.units, self.order)


def classification(ts: TrainingSet, settings: FitSettings, **decision_changes) -> Classification:
    """The classification task of this training set: its grades (if ordered) and its patients."""
    order = class_order(ts.classes, settings)
    decision = dataclasses.replace(decision_settings(settings, order, ts.classes), **decision_changes)
    return Classification(ts.classes, decision, ts.bootstrap_units(), order)


def oof_probabilities(cv: CVResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head and fused: (OOF probabilities at T = 1, calibrated), each row with its own fold's T and w."""
    return decisions.calibrated_probabilities(cv.z, cv.fold, cv.fold_params)


def oof_view_spread(cv: CVResult) -> np.ndarray:
    """Per image: the spread of its views' fused probabilities (each view with its fold's parameters)."""
    per_view = decisions.apply_cross_fitted(cv.fold_params, cv.fold[cv.bag_image], cv.z_bags).probs
    return view_spread(per_view, cv.bag_image, len(cv.fold))


def cv_metrics(cv: CVResult, y: np.ndarray, classes: list[str], settings: FitSettings,
               units: np.ndarray | None = None, order: list[str] | None = None) -> dict:
    """Every head's and the fusion's OOF numbers, the decisions beside the plain argmax, sets and spread.

    ``units``: the patient of each image (intervals resample patients; None: images); ``order``: the classes
    as grades (kappa). Only the first seed's numbers get intervals (the repeats report their spread).
    """
    probs = oof_probabilities(cv)
    n = settings.bootstrap if cv.seed == settings.seed else 0
    heads = {head: summary(y, after, classes, probs_before=before, folds=cv.fold,
                           bootstrap=n, seed=cv.seed, groups=units)
             for head, (before, after) in probs.items()}
    intervals = {}
    for head, (_, after) in probs.items():
        numbers = ranking_numbers(y, after, classes, groups=units, order=order, n=n, seed=cv.seed)
        intervals = {k: numbers.pop(k) for k in COMMON if k in numbers}
        heads[head].update(numbers)
    applied = decisions.apply_cross_fitted(cv.fold_params, cv.fold, cv.z)
    C = len(classes)
    with_offsets = summary(y, np.eye(C)[applied.pred_offsets], classes, folds=cv.fold,
                           bootstrap=n, seed=cv.seed, groups=units)
    with_offsets.update(decision_numbers(y, applied.pred_offsets, groups=units, n=n, seed=cv.seed,
                                         ranks=None if order is None else class_ranks(classes, order)))
    plain, shifted = _decision_score(heads["fused"], settings), _decision_score(with_offsets, settings)
    use = settings.offsets == "on" or (settings.offsets == "auto" and shifted > plain)
    spread = oof_view_spread(cv)
    notes = [f"fold {p['fold']}, {h}: T = 1 because {p['T_note'][h]}"
             for p in cv.fold_params for h in cv.heads if p["T_note"][h]]
    notes += [f"final, {h}: T = 1 because {cv.final['T_note'][h]}" for h in cv.heads if cv.final["T_note"][h]]
    return {
        "heads": heads,
        "intervals": interval_record(intervals, units, len(y), n),
        "class_order": order,
        "select_by": settings.select_by,
        "decision": {
            "argmax": {k: heads["fused"][k] for k in ("macro_f1", "macro_f1_ci", "balanced_accuracy",
                                                      "quadratic_kappa") if k in heads["fused"]},
            "offsets": {k: with_offsets[k] for k in ("macro_f1", "macro_f1_ci", "accuracy", "per_class",
                                                    "confusion", "fold_macro_f1", "balanced_accuracy",
                                                    "quadratic_kappa") if k in with_offsets},
            "offsets_setting": settings.offsets,
            "submission_uses": "offsets" if use else "argmax",
            "offsets_compared_by": _offsets_metric(settings),
            "rule": "offsets: argmax of the fused log-probabilities plus per-class offsets, the offsets of each "
                    "fold chosen on the other folds; the plain argmax is always reported beside it",
        },
        "calibration_notes": notes,
        "temperatures": temperature_decisions(cv),
        "conformal": {**conformal.coverage_summary(applied.sets, y, classes, settings.alpha),
                      "class_conditional": settings.class_conditional,
                      "rule": "split-conformal on 1 - p(class); each fold's thresholds from the other folds"},
        "view_spread": {"definition": "mean total-variation distance of each view's fused probabilities "
                                      "from the image's mean", "median": float(np.median(spread)),
                        "accuracy_by_quantile": accuracy_by_quantile(spread, applied.pred == y)},
    }


COMMON = ("unit", "resamples", "level", "positive_class", "computed_by", "class_order")  # the same for every head


def interval_record(common: dict, units: np.ndarray | None, images: int, n: int) -> dict:
    """metrics.json's ``intervals``: what every interval resampled (patients or images), how often, and how."""
    return {"unit": "patients" if units is not None else "images",
            "patients": len(set(units.tolist())) if units is not None else None, "images": images,
            "resamples": n, "level": common.get("level", 0.95), "positive_class": common.get("positive_class"),
            "values": "scikit-learn's roc_auc_score, average_precision_score, balanced_accuracy_score, "
                      "cohen_kappa_score(weights='quadratic') on the out-of-fold rows (oof.parquet)",
            "rule": "percentile bootstrap: each resample draws "
                    + ("patients (the manifest's group) with replacement, each with all their images"
                       if units is not None else "images with replacement (the data has no patients)")
                    + "; a resample where a number is undefined is skipped and counted; the same resamples for "
                      "every number of a head"}


def _offsets_metric(settings: FitSettings) -> str:
    """What the class offsets maximise and ``offsets auto`` compares: the --select-by metric when it reads decisions."""
    return settings.select_by if settings.select_by in DECISION_METRICS else "macro_f1"


def _decision_score(numbers: dict, settings: FitSettings) -> float:
    """The fused decisions' score by :func:`_offsets_metric` (NaN, an undefined kappa, never wins)."""
    name = {"kappa": "quadratic_kappa"}.get(_offsets_metric(settings), _offsets_metric(settings))
    value = numbers[name]["value"] if isinstance(numbers[name], dict) else numbers[name]
    return -math.inf if value is None or not math.isfinite(value) else float(value)


def temperature_decisions(cv: CVResult) -> dict:
    """Per head: the final T, its estimate, whether it is applied and why, and in how many folds one was applied;
    and whether the fused decision uses the heads' temperatures."""
    out = {h: {"T": cv.final["T"][h], "fitted": cv.final.get("T_fitted", cv.final["T"])[h],
               "applied": cv.final.get("T_applied", {}).get(h, cv.final["T_note"][h] is None),
               "why": cv.final.get("T_why", {}).get(h, cv.final["T_note"][h]),
               "folds_applied": sum(p["T_note"][h] is None for p in cv.fold_params), "folds": len(cv.fold_params)}
           for h in cv.heads}
    out["fused"] = cv.final.get("fused_calibration")
    return out

"""Classification, the task the fold loop fits today: one logit per class, cross-fitted decisions
(temperatures, fusion weights, class offsets, conformal thresholds; ``heads.decisions``) and the
numbers of metrics.json.

By cross-fitting, the parameters applied to fold k are chosen on the other folds' OOF logits only,
so no reported prediction helped choose its own parameters; the final parameters (for the test set)
are chosen on all OOF logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histoembed.core.config import FitSettings
from histoembed.maths.metrics import accuracy_by_quantile, summary, view_spread
from histoembed.models.heads import conformal, decisions
from histoembed.stages.fit.cv import CVResult


def decision_settings(settings: FitSettings) -> decisions.DecisionSettings:
    return decisions.DecisionSettings(settings.weight_grid, settings.alpha, settings.class_conditional)


@dataclass(frozen=True)
class Classification:
    """A head outputs one logit per class; decisions and numbers as ``heads.decisions`` and ``cv_metrics`` say."""

    classes: list[str]
    decision: decisions.DecisionSettings
    objective = None   # the heads' default: one logit per class

    def strata(self, y: np.ndarray) -> np.ndarray:
        return y

    @property
    def width(self) -> int:
        return len(self.classes)

    def decide(self, z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray) -> tuple[list[dict], dict]:
        return decisions.cross_fit(z, y, fold, self.decision)

    def measure(self, cv: CVResult, y: np.ndarray, settings: FitSettings) -> dict:
        return cv_metrics(cv, y, self.classes, settings)


def oof_probabilities(cv: CVResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head and fused: (OOF probabilities at T = 1, calibrated), each row with its own fold's T and w."""
    return decisions.calibrated_probabilities(cv.z, cv.fold, cv.fold_params)


def oof_view_spread(cv: CVResult) -> np.ndarray:
    """Per image: the spread of its views' fused probabilities (each view with its fold's parameters)."""
    per_view = decisions.apply_cross_fitted(cv.fold_params, cv.fold[cv.bag_image], cv.z_bags).probs
    return view_spread(per_view, cv.bag_image, len(cv.fold))


def cv_metrics(cv: CVResult, y: np.ndarray, classes: list[str], settings: FitSettings) -> dict:
    """Every head's and the fusion's OOF numbers, the decisions beside the plain argmax, sets and spread."""
    probs = oof_probabilities(cv)
    heads = {head: summary(y, after, classes, probs_before=before, folds=cv.fold,
                           bootstrap=settings.bootstrap, seed=cv.seed)
             for head, (before, after) in probs.items()}
    applied = decisions.apply_cross_fitted(cv.fold_params, cv.fold, cv.z)
    C = len(classes)
    with_offsets = summary(y, np.eye(C)[applied.pred_offsets], classes, folds=cv.fold,
                           bootstrap=settings.bootstrap, seed=cv.seed)
    plain, shifted = heads["fused"]["macro_f1"], with_offsets["macro_f1"]
    use = settings.offsets == "on" or (settings.offsets == "auto" and shifted > plain)
    spread = oof_view_spread(cv)
    notes = [f"fold {p['fold']}, {h}: T = 1 because {p['T_note'][h]}"
             for p in cv.fold_params for h in cv.heads if p["T_note"][h]]
    notes += [f"final, {h}: T = 1 because {cv.final['T_note'][h]}" for h in cv.heads if cv.final["T_note"][h]]
    return {
        "heads": heads,
        "decision": {
            "argmax": {"macro_f1": plain, "macro_f1_ci": heads["fused"]["macro_f1_ci"]},
            "offsets": {k: with_offsets[k] for k in ("macro_f1", "macro_f1_ci", "accuracy", "per_class",
                                                    "confusion", "fold_macro_f1")},
            "offsets_setting": settings.offsets,
            "submission_uses": "offsets" if use else "argmax",
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

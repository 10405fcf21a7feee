"""Survival and regression, plugged into the fold loop as classification is (``cv.Task``): one output per
image (a risk, higher = earlier event; or the predicted target), the cross-fitted fusion of
``heads.outcome_fusion``, and the numbers of metrics.json and the columns of oof.parquet.

Survival numbers (``maths.survival``): Harrell's C, Uno's C and the time-dependent AUC at the quartiles of the
event times, each with a bootstrap interval over patients; the Kaplan–Meier curves of the low- and high-risk
halves with the log-rank p; and the fused risk turned into a survival probability at the median event time
(Breslow's baseline from the *other* folds' rows) against Kaplan–Meier in three risk groups. Regression
(``maths.regression``): R², Pearson and Spearman r and MAE with intervals, and conformal intervals from the
other folds' residuals with their measured coverage. Temperatures, class offsets and conformal *sets* are
classification's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from histoembed.core.config import FitSettings
from histoembed.maths.regression import conformal_summary, regression_numbers
from histoembed.maths.survival import survival_numbers
from histoembed.maths.survival_curves import breslow, calibration_table
from histoembed.models.heads import outcome_fusion
from histoembed.models.heads.objectives import OUTPUT, Objective
from histoembed.stages.fit.cv import CVResult

SCORE = {"survival": "c_index", "regression": "r2"}   # what each head's "score" is (and the seeds' spread)
FUSION_RULES = {
    "survival": "sum over heads of w_h * (risk_h - mean_h) / std_h, each fold model's risks standardised on the "
                "rows it scores; weights on the simplex by the out-of-fold Harrell C of the other folds",
    "regression": "sum over heads of w_h * prediction_h; weights on the simplex by the out-of-fold squared error "
                  "of the other folds",
}


@dataclass
class OutcomeTask:
    """Survival or regression: ``y`` is [n, 2] (time, event) or [n] (target) per image."""

    task: str
    strata_: np.ndarray                 # per image: event / target quantile (the folds' balance)
    groups: np.ndarray | None           # per image: patient (the bootstrap resamples patients; None: images)
    objective: Objective = field(default_factory=Objective)
    alpha: float = 0.1                  # regression: conformal intervals cover 1 - alpha
    points: int = 21                    # fusion weights tried on [0, 1]
    width: int = 1

    def strata(self, y: np.ndarray) -> np.ndarray:
        return self.strata_

    def decide(self, z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray) -> tuple[list[dict], dict]:
        y = np.asarray(y, dtype=np.float64)
        per_fold, final = outcome_fusion.cross_fit(self.task, {h: v[:, 0] for h, v in z.items()}, y, fold,
                                                   self.points)
        if self.task == "regression":   # the test set's interval: prediction ± this
            fused = outcome_fusion.oof_fused(self.task, {h: v[:, 0] for h, v in z.items()}, fold, per_fold)
            final["conformal_half_width"] = conformal_summary(y, fused, fold, self.alpha)["half_width"]
            final["alpha"] = self.alpha
        return per_fold, final

    def measure(self, cv: CVResult, y: np.ndarray, settings: FitSettings) -> dict:
        outputs = oof_outputs(cv)
        numbers = survival_numbers if self.task == "survival" else regression_numbers
        y = np.asarray(y, dtype=np.float64)
        args = (y[:, 0], y[:, 1]) if self.task == "survival" else (y,)
        heads = {}
        for h, out in outputs.items():
            got = numbers(*args, out, groups=self.groups, n=settings.bootstrap, seed=cv.seed)
            heads[h] = {**got, "score": got["harrell_c" if self.task == "survival" else "r2"]["value"]}
        out = {"task": self.task, "score": SCORE[self.task], "heads": heads,
               "fusion": {"weights": cv.final["weights"], "rule": FUSION_RULES[self.task],
                          "fold_weights": [p["weights"] for p in cv.fold_params]}}
        if self.task == "survival":
            out["survival_at_horizon"] = horizon_calibration(y, outputs["fused"], cv.fold)
        else:
            conformal = conformal_summary(y, outputs["fused"], cv.fold, settings.alpha)
            conformal.pop("row_half_width")
            out["conformal"] = {**conformal, "rule": "prediction ± the (1 - alpha) quantile of the absolute "
                                                     "residuals of the other folds (split-conformal)"}
        return out


def oof_outputs(cv: CVResult) -> dict[str, np.ndarray]:
    """Per head (survival risks standardised per fold) and fused: each image's out-of-fold output."""
    task = cv.final["task"]
    z = {h: cv.z[h][:, 0] for h in cv.heads}
    return {**outcome_fusion.oof_standardised(task, z, cv.fold, cv.fold_params),
            "fused": outcome_fusion.oof_fused(task, z, cv.fold, cv.fold_params)}


def horizon_calibration(y: np.ndarray, risk: np.ndarray, fold: np.ndarray, bins: int = 3) -> dict:
    """The fused risk as a survival probability at the median event time, each fold's rows with Breslow's
    baseline of the other folds' rows, against Kaplan–Meier in ``bins`` groups of predicted survival."""
    time, event = y[:, 0], y[:, 1]
    horizon = float(np.median(time[event > 0]))
    predicted = np.full(len(time), np.nan)
    for k in np.unique(fold):
        other = fold != k
        if (event[other] > 0).any():
            predicted[fold == k] = breslow(time[other], event[other], risk[other]).survival(risk[fold == k], horizon)
    ok = np.isfinite(predicted)
    return {"horizon": horizon, "rule": "Breslow baseline of the other folds; groups of predicted survival",
            "groups": calibration_table(time[ok], event[ok], predicted[ok], horizon, bins) if ok.sum() >= bins
            else []}


def oof_columns(task: str, y: np.ndarray, cv: CVResult, alpha: float) -> dict[str, pa.Array]:
    """oof.parquet's outcome columns: the outcome, every head's output and the fused one (``risk`` or
    ``prediction``); regression also the conformal interval of each row (its half-width from the other folds)."""
    outputs = oof_outputs(cv)
    name = OUTPUT[task]
    y = np.asarray(y, dtype=np.float64)
    cols = ({"time": pa.array(y[:, 0]), "event": pa.array(y[:, 1].astype(np.int8))} if task == "survival"
            else {"target": pa.array(y)})
    cols.update({f"{name}_{h}": pa.array(outputs[h]) for h in cv.heads})
    cols[name] = pa.array(outputs["fused"])
    if task == "regression":
        half = conformal_summary(y, outputs["fused"], cv.fold, alpha)["row_half_width"]
        half = np.array([np.inf if q is None else q for q in half])
        cols["interval_low"] = pa.array(outputs["fused"] - half)
        cols["interval_high"] = pa.array(outputs["fused"] + half)
    return cols

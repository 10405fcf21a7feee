"""Everything chosen on held-out logits, chosen together and cross-fitted.

From the members' out-of-fold logits (one [images, classes] array per head), ``choose``
picks, on the given rows only: a regularised temperature per member, simplex fusion weights
(macro-F1, or the ``select_by`` metric), per-class offsets on the fused log-probabilities (the same) and split-conformal
thresholds. ``cross_fit`` does that once per fold on the *other* folds' rows, and once on all
rows (the parameters for the test set); ``apply`` turns parameters and logits into calibrated
fused probabilities, offset predictions and prediction sets.

Parameters are plain JSON-able dicts, the same in ``calibration.json``, the models manifest
and the inference ensemble:

``{"heads": [...], "T": {head: T}, "T_note": {head: why T = 1 or None}, "weights": {head: w},
"macro_f1_by_w": [...] (two heads) or None, "offsets": [C], "conformal_threshold": [C] (None:
every class), "images": n}``; cross-fitted parameters add ``"T_fitted"``, ``"T_applied"`` and
``"T_why"`` per head (the estimate, whether the check let it through, and why), and the final ones
``"fused_calibration"``.

A temperature is applied only where it lowers the NLL of images that did not choose it
(``calibration.cross_fitted_temperatures``). The fused decision follows the same rule: when the
heads' temperatures, so decided, still raise the fused out-of-fold NLL above the fusion of the same
heads at T = 1, every head keeps T = 1 and the weights are chosen again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from histoembed.maths import metrics
from histoembed.maths.metrics import log_softmax, nll, softmax
from histoembed.models.heads import calibration, conformal, fusion, offsets


@dataclass(frozen=True)
class DecisionSettings:
    weight_points: int = 21
    alpha: float = 0.1
    class_conditional: bool = False
    # Several encoders: the fusion weights with the lowest NLL whose macro-F1 is within this many images'
    # worth (this number / images) of the best (``fusion.choose_weights``'s ``nll_within``); None: off.
    nll_images: float | None = None
    # ``fit --select-by``: the metric the fusion weights and class offsets maximise (``metrics.SELECTABLE``);
    # offsets follow it when it reads decisions (macro-F1, balanced accuracy, kappa), else macro-F1.
    select_by: str = "macro_f1"
    ranks: tuple[int, ...] | None = None   # class index -> grade, for kappa (``metrics.class_ranks``)


def choose(z: dict[str, np.ndarray], y: np.ndarray, rows: np.ndarray, s: DecisionSettings,
           temps: dict[str, calibration.Checked] | None = None) -> dict:
    """Every decision parameter, chosen on ``rows`` of the members' logits ``z`` (with ``temps``, when given,
    the temperatures decided by ``cross_fit``; else each fitted on the rows and applied unchecked)."""
    heads = list(z)
    y_rows = np.asarray(y)[rows]
    checked = temps is not None
    if temps is None:
        temps = {h: calibration.choose_temperature(z[h][rows], y_rows) for h in heads}
    t = [temps[h].value for h in heads]
    extra = {} if s.nll_images is None else {"nll_within": s.nll_images / max(len(rows), 1)}
    weight_score, offset_score = selection(s, z[heads[0]].shape[1])
    if weight_score is not None:
        extra["score"] = weight_score
    choice = fusion.choose_weights([z[h][rows] for h in heads], y_rows, t, s.weight_points, **extra)
    params = {"heads": heads, "T": {h: temps[h].value for h in heads}, "T_note": {h: temps[h].note for h in heads},
              "weights": dict(zip(heads, choice.weights)), "macro_f1_by_w": choice.scores,
              "images": int(len(rows))}
    if s.select_by != "macro_f1":   # the curve above is of this metric then
        params["selected_by"] = s.select_by
    if checked:
        params.update(T_fitted={h: temps[h].fitted for h in heads}, T_applied={h: temps[h].applied for h in heads},
                      T_why={h: temps[h].why for h in heads})
    logp = log_softmax(fused_logits(params, {h: z[h][rows] for h in heads}))
    params["offsets"] = (offsets.choose_offsets(logp, y_rows) if offset_score is None else
                         offsets.choose_offsets(logp, y_rows, score=offset_score)).tolist()
    q = conformal.thresholds(np.exp(logp), y_rows, s.alpha, s.class_conditional)
    params["conformal_threshold"] = [None if math.isinf(v) else float(v) for v in q]
    return params


def selection(s: DecisionSettings, n_classes: int):
    """(score of the fusion weights, score of the offsets) for ``s.select_by``; None: macro-F1 (the default)."""
    if s.select_by == "macro_f1":
        return None, None
    ranks = None if s.ranks is None else np.asarray(s.ranks)
    return (metrics.selection_score(s.select_by, n_classes, ranks),
            metrics.decision_score(s.select_by, n_classes, ranks))


def fused_logits(params: dict, z: dict[str, np.ndarray]) -> np.ndarray:
    """``sum_h w_h * z_h / T_h`` with the parameters' weights and temperatures (arrays broadcast per row)."""
    heads = params["heads"]
    return fusion.fuse_members([z[h] for h in heads], [params["weights"][h] for h in heads],
                               [params["T"][h] for h in heads])


def thresholds(params: dict) -> np.ndarray:
    return np.array([math.inf if v is None else float(v) for v in params["conformal_threshold"]])


@dataclass
class Applied:
    probs: np.ndarray        # [n, C] calibrated fused probabilities
    pred: np.ndarray         # argmax
    pred_offsets: np.ndarray  # argmax of log-probabilities + offsets
    sets: np.ndarray         # [n, C] bool conformal sets


def apply(params: dict, z: dict[str, np.ndarray]) -> Applied:
    return decide(softmax(fused_logits(params, z)), params)


def decide(probs: np.ndarray, params: dict) -> Applied:
    """Argmax, offset argmax and conformal sets of calibrated fused ``probs`` with one set of parameters."""
    return _decide(probs, np.asarray(params["offsets"], dtype=np.float64)[None, :], thresholds(params)[None, :])


def _decide(probs: np.ndarray, offs: np.ndarray, q: np.ndarray) -> Applied:
    logp = np.log(np.clip(probs, 1e-300, None))
    sets = (1.0 - probs) <= q + 1e-12
    return Applied(probs, probs.argmax(axis=1), (logp + offs).argmax(axis=1), sets)


def cross_fit(z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray,
              s: DecisionSettings) -> tuple[list[dict], dict]:
    """Per fold: parameters chosen on the other folds' rows; and the final ones, chosen on all rows.

    Temperatures are applied only where they lower the NLL on images that did not choose them, for each
    head and for the fused decision (see the module docstring).
    """
    temps = {h: calibration.cross_fitted_temperatures(z[h], y, fold) for h in z}
    per_fold, final = _cross_fit(z, y, fold, s, temps)
    before, after = (nll(p, y) for p in calibrated_probabilities(z, fold, per_fold)["fused"])
    if after > before:
        why = (f"the heads' temperatures raised the fused out-of-fold NLL ({before:.4f} at T = 1, {after:.4f} with "
               "them), so every head keeps T = 1")
        temps = {h: ([c.kept(why) for c in per], last.kept(why)) for h, (per, last) in temps.items()}
        per_fold, final = _cross_fit(z, y, fold, s, temps)
        final["fused_calibration"] = {"applied": False, "why": why}
    elif any(p["T_applied"][h] for p in per_fold for h in p["heads"]):
        final["fused_calibration"] = {"applied": True, "why": f"the heads' temperatures keep or lower the fused "
                                                             f"out-of-fold NLL ({before:.4f} at T = 1, {after:.4f} "
                                                             "with them)"}
    elif any(final["T_applied"].values()):
        final["fused_calibration"] = {"applied": True, "why": "no fold applies a temperature, so the fused out-of-fold "
                                                             "NLL is T = 1's; the test set gets the heads' final ones"}
    else:
        final["fused_calibration"] = {"applied": False, "why": "every head keeps T = 1"}
    return per_fold, final


def _cross_fit(z: dict[str, np.ndarray], y: np.ndarray, fold: np.ndarray, s: DecisionSettings,
               temps: dict[str, tuple[list[calibration.Checked], calibration.Checked]]) -> tuple[list[dict], dict]:
    per_fold = [{"fold": int(k), **choose(z, y, np.flatnonzero(fold != k), s, {h: temps[h][0][i] for h in z})}
                for i, k in enumerate(np.unique(fold))]
    return per_fold, choose(z, y, np.arange(len(y)), s, {h: temps[h][1] for h in z})


def per_row(per_fold: list[dict], fold: np.ndarray, name: str, head: str | None = None) -> np.ndarray:
    """Each row's value of parameter ``name`` (of ``head``) from its own fold's parameters."""
    by_fold = {p["fold"]: p for p in per_fold}
    values = [by_fold[int(k)][name] if head is None else by_fold[int(k)][name][head] for k in fold]
    return np.asarray([[math.inf if v is None else v for v in row] if isinstance(row, list) else row
                       for row in values], dtype=np.float64)


def apply_cross_fitted(per_fold: list[dict], fold: np.ndarray, z: dict[str, np.ndarray]) -> Applied:
    """Each row decided with its own fold's parameters (never chosen on that row)."""
    heads = per_fold[0]["heads"]
    params = {"heads": heads,
              "T": {h: per_row(per_fold, fold, "T", h)[:, None] for h in heads},
              "weights": {h: per_row(per_fold, fold, "weights", h)[:, None] for h in heads}}
    probs = softmax(fused_logits(params, z))
    return _decide(probs, per_row(per_fold, fold, "offsets"), per_row(per_fold, fold, "conformal_threshold"))


def calibrated_probabilities(z: dict[str, np.ndarray], fold: np.ndarray,
                             fold_params: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head and fused: (probabilities at T = 1, calibrated), each row with its own fold's T and w.

    ``z`` are the heads' out-of-fold logits, ``fold_params`` calibration.json's ``folds``: the report
    draws the very probabilities that ``fit`` scored.
    """
    heads = fold_params[0]["heads"]
    out = {}
    for h in heads:
        t = per_row(fold_params, fold, "T", h)[:, None]
        logits = np.asarray(z[h], dtype=np.float64)
        out[h] = (softmax(logits), softmax(logits / t))
    weights = {h: per_row(fold_params, fold, "weights", h)[:, None] for h in heads}
    uncalibrated = {"heads": heads, "weights": weights, "T": dict.fromkeys(heads, 1.0)}
    out["fused"] = (softmax(fused_logits(uncalibrated, z)),
                    apply_cross_fitted(fold_params, fold, z).probs)
    return out

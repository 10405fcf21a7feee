"""Classification metrics as small pure functions on class indices and probabilities.

Everything is computed from a confusion matrix or from the probability of the true class,
so the numbers equal scikit-learn's (``f1_score(average="macro")``, ``log_loss``,
``confusion_matrix``) and the bootstrap stays fast (no estimator calls per resample).
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (scikit-learn's convention)."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where undefined (zero_division=0)."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = 2 * tp + (predicted - tp) + (support - tp)
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return precision, recall, f1, support


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``y`` or ``pred``."""
    cm = confusion(y, pred, n_classes)
    _, _, f1, support = per_class_scores(cm)
    present = (support > 0) | (cm.sum(axis=0) > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def bootstrap_macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int, n: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of macro-F1 over ``n`` resamples of the images (with replacement)."""
    y, pred = np.asarray(y), np.asarray(pred)
    if n <= 0 or len(y) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    scores = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, len(y), len(y))
        scores[b] = macro_f1(y[idx], pred[idx], n_classes)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(scores, tail)), float(np.percentile(scores, 100 - tail))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped like scikit-learn)."""
    p = np.asarray(probs, dtype=np.float64)
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(y)), np.asarray(y)])))


ECE_BINS = 15  # confidence bins of every reported ECE and reliability curve


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-class confidence in ``bins`` equal-width bins: (mean confidence, accuracy, count) per bin (NaN if empty)."""
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == np.asarray(y)).astype(np.float64) if len(p) else np.zeros(0)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=correct, minlength=bins) / count
    return mean_conf, accuracy, count


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top class: the count-weighted gap of :func:`reliability`'s bins."""
    mean_conf, accuracy, count = reliability(probs, y, bins)
    ok = count > 0
    return float(np.sum(count[ok] * np.abs(accuracy[ok] - mean_conf[ok])) / count.sum()) if ok.any() else 0.0


def summary(y: np.ndarray, probs: np.ndarray, classes: list[str], *, probs_before: np.ndarray | None = None,
            folds: np.ndarray | None = None, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Every reported number of one head from its out-of-fold (calibrated) probabilities.

    ``probs_before`` are the same predictions before temperature scaling (for NLL and ECE
    before/after); ``folds`` gives each row's fold for the per-fold mean and spread.
    """
    y = np.asarray(y)
    C = len(classes)
    pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(y, pred, C)
    precision, recall, f1, support = per_class_scores(cm)
    out = {
        "macro_f1": macro_f1(y, pred, C),
        "macro_f1_ci": list(bootstrap_macro_f1(y, pred, C, n=bootstrap, seed=seed)) if bootstrap > 0 else None,
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "nll": nll(probs, y),
        "ece": ece(probs, y),
        "nll_before_calibration": nll(probs_before, y) if probs_before is not None else None,
        "ece_before_calibration": ece(probs_before, y) if probs_before is not None else None,
        "per_class": {c: {"precision": float(precision[k]), "recall": float(recall[k]),
                          "f1": float(f1[k]), "support": int(support[k])} for k, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }
    if folds is not None:
        per_fold = [macro_f1(y[folds == k], pred[folds == k], C) for k in np.unique(folds)]
        out["fold_macro_f1"] = per_fold
        out["fold_mean"] = float(np.mean(per_fold))
        out["fold_std"] = float(np.std(per_fold))
    return out


def view_spread(view_probs: np.ndarray, view_image: np.ndarray, n_images: int) -> np.ndarray:
    """Per image: the mean total-variation distance of its views' probabilities from their mean.

    0 when every view gives the same probabilities, 1 when views put all their mass on different
    classes: how much the call moves when the crops are flipped, rotated or re-stained.
    """
    p = np.asarray(view_probs, dtype=np.float64)
    image = np.asarray(view_image, dtype=np.int64)
    counts = np.bincount(image, minlength=n_images).astype(np.float64)
    mean = np.zeros((n_images, p.shape[1]))
    np.add.at(mean, image, p)
    mean /= np.maximum(counts, 1)[:, None]
    tv = 0.5 * np.abs(p - mean[image]).sum(axis=1)
    out = np.bincount(image, weights=tv, minlength=n_images)
    return out / np.maximum(counts, 1)


def accuracy_by_quantile(values: np.ndarray, correct: np.ndarray, bins: int = 4) -> list[dict]:
    """Accuracy in equal-count bins of ``values`` (e.g. view spread), lowest first."""
    values, correct = np.asarray(values, dtype=np.float64), np.asarray(correct, dtype=bool)
    if len(values) == 0:
        return []
    order = np.argsort(values, kind="stable")
    out = []
    for b, idx in enumerate(np.array_split(order, bins)):
        if len(idx):
            out.append({"bin": b, "low": float(values[idx].min()), "high": float(values[idx].max()),
                        "images": int(len(idx)), "accuracy": float(correct[idx].mean())})
    return out


def paired_bootstrap_difference(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
                                n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(macro-F1 of b minus a, interval low, high): both scored on the same resampled images each time."""
    y, pred_a, pred_b = np.asarray(y), np.asarray(pred_a), np.asarray(pred_b)
    diff = macro_f1(y, pred_b, n_classes) - macro_f1(y, pred_a, n_classes)
    if n <= 0 or len(y) == 0:
        return diff, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    d = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, len(y), len(y))
        d[b] = macro_f1(y[idx], pred_b[idx], n_classes) - macro_f1(y[idx], pred_a[idx], n_classes)
    tail = 100 * (1 - level) / 2
    return float(diff), float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))

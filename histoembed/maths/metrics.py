"""Classification metrics as small pure functions on class indices and probabilities.

Everything is computed from a confusion matrix or from the probability of the true class,
so the numbers equal scikit-learn's (``f1_score(average="macro")``, ``log_loss``,
``confusion_matrix``) and the bootstrap stays fast (no estimator calls per resample).
"""

from __future__ import annotations

import numpy as np

from histoembed.maths.resample import bootstrap


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
            folds: np.ndarray | None = None, bootstrap: int = 1000, seed: int = 0, groups=None) -> dict:
    """Every reported number of one head from its out-of-fold (calibrated) probabilities.

    ``probs_before`` are the same predictions before temperature scaling (for NLL and ECE
    before/after); ``folds`` gives each row's fold for the per-fold mean and spread; ``groups``
    the patient of each row, when the macro-F1 interval should resample patients (else images).
    """
    y = np.asarray(y)
    C = len(classes)
    pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(y, pred, C)
    precision, recall, f1, support = per_class_scores(cm)
    out = {
        "macro_f1": macro_f1(y, pred, C),
        "macro_f1_ci": _macro_f1_interval(y, pred, C, bootstrap, seed, groups) if bootstrap > 0 else None,
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


def _macro_f1_interval(y: np.ndarray, pred: np.ndarray, C: int, n: int, seed: int, groups) -> list[float]:
    """[low, high] of macro-F1: over images as before groups existed, over patients when ``groups`` is given."""
    if groups is None:
        return list(bootstrap_macro_f1(y, pred, C, n=n, seed=seed))
    iv = bootstrap(lambda yy, pp: macro_f1(yy, pp, C), y, pred, groups=groups, n=n, seed=seed)
    return [iv.lo, iv.hi]


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


# ----- Ranking and agreement numbers (issue 34): AUROC, average precision, balanced accuracy, weighted kappa.
# Each is a numpy twin of scikit-learn's function (``roc_auc_score``, ``average_precision_score``,
# ``balanced_accuracy_score``, ``cohen_kappa_score(weights="quadratic")``), equal to it on the same input,
# ties included (tests/test_metrics.py checks each against scikit-learn), and some hundred times faster,
# which matters because every interval calls it a thousand times per head and class. Where scikit-learn
# raises (one class only) the twin returns NaN, which the bootstrap counts as a skipped resample.

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_block = np.concatenate([[True], xs[1:] != xs[:-1]])
    block = np.cumsum(new_block) - 1
    starts = np.flatnonzero(new_block)
    ends = np.concatenate([starts[1:], [len(x)]])
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2.0)[block]
    return ranks


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties: half)."""
    positive = np.asarray(positive, dtype=bool)
    n1 = int(positive.sum())
    n0 = len(positive) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = average_ranks(score)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def resampled_auroc(score_pos: np.ndarray, score_neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """``binary_auroc`` of many resamples at once, each given by how often it draws every positive (``w_pos``
    [B, m]) and negative (``w_neg`` [B, n]): the weighted chance a drawn positive beats a drawn negative (ties:
    half). The scores are sorted once, so a bootstrap costs O(B (m + n)), not B sorts."""
    score_neg = np.asarray(score_neg, np.float64)
    order = np.argsort(score_neg, kind="mergesort")
    cum = np.zeros((len(w_neg), len(order) + 1))
    np.cumsum(np.asarray(w_neg, np.float64)[:, order], axis=1, out=cum[:, 1:])   # weight of negatives below
    below = np.searchsorted(score_neg[order], score_pos, "left")
    upto = np.searchsorted(score_neg[order], score_pos, "right")
    wins = cum[:, below] + 0.5 * (cum[:, upto] - cum[:, below])                # [B, m]
    w_pos = np.asarray(w_pos, np.float64)
    return (w_pos * wins).sum(1) / (w_pos.sum(1) * cum[:, -1])


def binary_average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    """Average precision: precision at each distinct threshold weighted by the recall it adds (no interpolation)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, t = np.asarray(score, dtype=np.float64)[order], positive[order]
    last = np.concatenate([np.flatnonzero(s[1:] != s[:-1]), [len(s) - 1]])  # end of each tie block
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _one_vs_rest(fn, y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    y, p = np.asarray(y), np.asarray(probs, dtype=np.float64)
    return np.array([fn(y == c, p[:, c]) for c in range(p.shape[1])])


def auroc_per_class(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC of each class from its probability column (NaN for a class absent from ``y``)."""
    return _one_vs_rest(binary_auroc, y, probs)


def auroc(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: AUROC of class 1's probability. More classes: the unweighted mean of the one-vs-rest AUROCs
    (``roc_auc_score(multi_class="ovr", average="macro")``); NaN when some class is absent from ``y``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        return binary_auroc(np.asarray(y) == 1, p[:, 1])
    return float(np.mean(auroc_per_class(y, p)))


def average_precision_per_class(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest average precision of each class (NaN for a class absent from ``y``)."""
    return _one_vs_rest(binary_average_precision, y, probs)


def average_precision(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary: average precision of class 1. More classes: the macro mean of the one-vs-rest values
    (``average_precision_score(label_binarize(y), probs, average="macro")``)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        return binary_average_precision(np.asarray(y) == 1, p[:, 1])
    return float(np.mean(average_precision_per_class(y, p)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (a class only predicted adds nothing)."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    C = int(max(y.max(), pred.max())) + 1
    cm = confusion(y, pred, C)
    support = cm.sum(axis=1)
    return float(np.mean(np.diag(cm)[support > 0] / support[support > 0]))


def class_ranks(classes: list[str], order: list[str]) -> np.ndarray:
    """Position of each class (by index in ``classes``) in the given order, lowest grade first."""
    if sorted(order) != sorted(classes) or len(set(order)) != len(order):
        raise ValueError(f"the class order {order} must list each class of {classes} exactly once")
    return np.array([order.index(c) for c in classes])


def quadratic_kappa(y: np.ndarray, pred: np.ndarray, ranks: np.ndarray | None = None) -> float:
    """Cohen's kappa with quadratic weights on the ordered grades: 1 = perfect, 0 = chance agreement.

    ``ranks`` maps class index to its grade (:func:`class_ranks`); identity when None. A miss by two grades
    costs four times a miss by one. NaN when agreement by chance is total (one grade only).
    """
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    if ranks is not None:
        y, pred = np.asarray(ranks)[y], np.asarray(ranks)[pred]
    if len(y) == 0:
        return float("nan")
    K = int(max(y.max(), pred.max())) + 1 if ranks is None else len(ranks)
    observed = confusion(y, pred, K).astype(np.float64)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    grade = np.arange(K)
    weight = (grade[:, None] - grade[None, :]) ** 2
    denom = float((weight * expected).sum())
    return 1.0 - float((weight * observed).sum()) / denom if denom > 0 else float("nan")


SELECTABLE = ("auroc", "average_precision", "balanced_accuracy", "kappa", "macro_f1", "nll")
LOWER_IS_BETTER = frozenset({"nll"})


def scorer(name: str, n_classes: int, ranks: np.ndarray | None = None):
    """The metric ``name`` as a function of (class indices, probabilities [n, C]): what ``compare --metric``
    feeds to :func:`histoembed.maths.resample.paired_bootstrap` and ``--select-by`` maximises.

    Decisions are the argmax of the probabilities; ``kappa`` needs ``ranks`` (:func:`class_ranks`).
    ``nll`` is in :data:`LOWER_IS_BETTER`: a positive paired difference there means b is worse.
    """
    argmax = lambda p: np.asarray(p).argmax(axis=1)  # noqa: E731
    table = {
        "auroc": auroc,
        "average_precision": average_precision,
        "balanced_accuracy": lambda y, p: balanced_accuracy(y, argmax(p)),
        "macro_f1": lambda y, p: macro_f1(y, argmax(p), n_classes),
        "nll": lambda y, p: nll(p, y),
    }
    if name == "kappa":
        if ranks is None:
            raise ValueError("kappa needs the order of the classes (e.g. [fit] class_order)")
        return lambda y, p: quadratic_kappa(y, argmax(p), ranks)
    if name not in table:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(SELECTABLE)}")
    return table[name]


DECISION_METRICS = frozenset({"balanced_accuracy", "kappa", "macro_f1"})  # read the decided class, not the probabilities


def selection_score(name: str, n_classes: int, ranks: np.ndarray | None = None):
    """``fit --select-by NAME`` as a score of (class indices, probabilities), higher always better (NLL negated):
    what the fusion weights maximise on held-out rows."""
    score = scorer(name, n_classes, ranks)
    if name in LOWER_IS_BETTER:
        return lambda y, p: -score(y, p)
    return score


def decision_score(name: str, n_classes: int, ranks: np.ndarray | None = None):
    """The metric ``name`` of (class indices, decided classes), higher better, for choosing class offsets;
    None for a metric of the probabilities (AUROC, AP, NLL), which offsets cannot move."""
    if name not in DECISION_METRICS:
        return None
    if name == "macro_f1":
        return lambda y, pred: macro_f1(y, pred, n_classes)
    if name == "balanced_accuracy":
        return balanced_accuracy
    if ranks is None:
        raise ValueError("kappa needs the order of the classes (e.g. [fit] class_order)")
    return lambda y, pred: quadratic_kappa(y, pred, ranks)

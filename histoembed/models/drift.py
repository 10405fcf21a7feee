"""The train-versus-test check's maths and its file: can a classifier tell test from training images by their
embeddings, and do the stains differ? ``stages/drift.py`` runs it; the report reads ``run/drift.json`` through
:func:`read_drift`, which refuses a file computed on other features or crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoembed.core import feature_store, store
from histoembed.core.config import DriftSettings
from histoembed.core.errors import UserError
from histoembed.inputs.pixels import HED_FROM_RGB, OD_EPS
from histoembed.maths.metrics import resampled_auroc


DRIFT_FILE = "drift.json"
BOOTSTRAP_CHUNK = 100   # resamples whose draw counts are held at once


TISSUE_OD = 0.15        # a pixel is tissue when its optical densities sum above this (Macenko's threshold)


STAIN_SHIFT_SD = 0.5    # a standardised difference of stain density worth a sentence


STAINS = ("haematoxylin", "eosin")


def image_means(features: feature_store.Features) -> tuple[np.ndarray, np.ndarray]:
    """(image keys ``split/image_id``, [N, D] mean clean-view embedding per image), keys sorted."""
    clean = features.subset(features.view == 0)
    keys, row_image = np.unique(clean.keys(), return_inverse=True)
    sums = np.zeros((len(keys), clean.embedding.shape[1]))
    np.add.at(sums, row_image, clean.embedding)
    return keys, sums / np.bincount(row_image, minlength=len(keys))[:, None]


def pca_dims(n_fit: int, dim: int, cap: int) -> int:
    """About one PCA dimension per ten training images (at least 2, at most ``cap``): with fewer images
    than dimensions the classifier would tell any two samples apart by chance."""
    return max(1, min(cap, dim, n_fit - 1, max(2, n_fit // 10)))


def two_sample_auc(x: np.ndarray, is_test: np.ndarray, settings: DriftSettings) -> tuple[float, float, float]:
    """(out-of-fold AUC of test-vs-train, interval low, high) from a fixed linear classifier.

    Each image's score is its mean out-of-fold score over ``settings.repeats`` shuffles of the
    folds, which steadies the AUC against one unlucky split. The interval resamples images
    within each split (the bootstrap keeps both splits' sizes).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    is_test = np.asarray(is_test, dtype=int)
    folds = min(settings.folds, int(np.bincount(is_test, minlength=2).min()))
    scores = np.zeros(len(x))
    for repeat in range(settings.repeats):
        split = StratifiedKFold(folds, shuffle=True, random_state=settings.seed + repeat).split(x, is_test)
        for fit_rows, eval_rows in split:
            dims = pca_dims(len(fit_rows), x.shape[1], settings.pca_dims)
            model = make_pipeline(StandardScaler(), PCA(dims, random_state=settings.seed),
                                  LogisticRegression(C=settings.c, max_iter=2000))
            model.fit(x[fit_rows], is_test[fit_rows])
            scores[eval_rows] += model.decision_function(x[eval_rows])
    auc = float(roc_auc_score(is_test, scores))
    if settings.bootstrap <= 0:
        return auc, float("nan"), float("nan")
    rng = np.random.default_rng(settings.seed)
    test, train = np.flatnonzero(is_test == 1), np.flatnonzero(is_test == 0)
    boot = []
    for start in range(0, settings.bootstrap, BOOTSTRAP_CHUNK):   # each resample as counts of every image drawn
        draws = [(rng.choice(len(test), len(test)), rng.choice(len(train), len(train)))
                 for _ in range(min(BOOTSTRAP_CHUNK, settings.bootstrap - start))]
        boot.append(resampled_auroc(scores[test], scores[train],
                                    np.array([np.bincount(a, minlength=len(test)) for a, _ in draws]),
                                    np.array([np.bincount(b, minlength=len(train)) for _, b in draws])))
    lo, hi = np.percentile(np.concatenate(boot), [2.5, 97.5])
    return auc, float(lo), float(hi)


def stain_densities(rgb: np.ndarray, fill: tuple[int, int, int] | None = None) -> np.ndarray | None:
    """Mean (haematoxylin, eosin) density of a crop's tissue pixels, or None when it shows no tissue.

    Padding (pixels of exactly the ``fill`` colour) and background (optical density summing
    below ``TISSUE_OD``) are left out.
    """
    pixels = rgb.reshape(-1, 3)
    od = -np.log(np.maximum(pixels / 255.0, OD_EPS))
    tissue = od.sum(axis=1) > TISSUE_OD
    if fill is not None:
        tissue &= ~(pixels == np.asarray(fill)).all(axis=1)
    if not tissue.any():
        return None
    return (od[tissue] @ HED_FROM_RGB)[:, :2].mean(axis=0)


def standardised_difference(train: np.ndarray, test: np.ndarray) -> float:
    """(mean of test - mean of train) / pooled standard deviation (Cohen's d)."""
    pooled = np.sqrt(((len(train) - 1) * train.var(ddof=1) + (len(test) - 1) * test.var(ddof=1))
                     / max(len(train) + len(test) - 2, 1))
    return float((test.mean() - train.mean()) / pooled) if pooled > 0 else 0.0


def verdict(auc: float, lo: float, hi: float, stain_difference: dict[str, float],
            items: str = "images") -> tuple[bool, str]:
    """(shifted, the finding in words): shifted when the AUC interval lies above 0.5. ``items``: what the splits
    hold, in the console's words ("images", "slides", "images or slides")."""
    shifted = bool(lo > 0.5)
    if not shifted:
        return False, (f"No detectable difference between the training and test {items}' embeddings "
                       f"(AUC {auc:.2f}, 95% interval {lo:.2f}-{hi:.2f} includes 0.5, which means indistinguishable).")
    strength = "strongly " if lo > 0.75 else ""
    words = (f"The test {items} differ {strength}from the training {items}: a classifier tells them apart by their "
             f"embeddings with AUC {auc:.2f} (95% interval {lo:.2f}-{hi:.2f}; 0.5 means indistinguishable). "
             "The cross-validated score may promise more than the test set gives.")
    stained = {s: d for s, d in stain_difference.items() if abs(d) >= STAIN_SHIFT_SD}
    if stained:
        parts = ", ".join(f"{s} {'stronger' if d > 0 else 'weaker'} by {abs(d):.1f} SD" for s, d in stained.items())
        words += (f" The stain differs too (test vs training: {parts}); stain normalisation "
                  "(`histoembed embed --stain-norm macenko`) may help.")
    return True, words


def drift_inputs(run: Path, store_dir: Path) -> dict:
    """The keys of what the check reads: the feature store and crops.parquet."""
    parts = feature_store.feature_parts(store_dir)
    return {"features": store.read_meta(parts[0]).get("key") if parts else None,
            "store": store_dir.name, "crops": store.read_meta(run / store.CROPS_FILE).get("key")}


def read_drift(run: Path) -> tuple[dict | None, str | None]:
    """(drift.json, None) when it matches the run's current features and crops, else (None, why not)."""
    run = Path(run)
    path = run / DRIFT_FILE
    if not path.exists():
        return None, f"no {DRIFT_FILE} in the run (run `histoembed fit` or `histoembed drift`)"
    try:
        report = store.read_json(path, "drift report")
    except UserError as e:
        return None, str(e)
    inputs = report.get("inputs") or {}
    store_dir = run / store.FEATURES_DIR / str(inputs.get("store"))
    if not store_dir.is_dir() or drift_inputs(run, store_dir) != inputs:
        return None, f"{DRIFT_FILE} was computed on other features or crops (re-run `histoembed drift`)"
    return report, None

"""The fit stage: cross-validated MLP and XGBoost heads, temperature scaling and fusion.

For each fold k (stratified by label, seeded, no QC duplicate group straddling folds):

1. the training folds are split again into a *fit* part and an inner *stopping* part
   (stratified, group-aware); both heads train on the fit part and stop early on the
   stopping part, so the evaluation fold never chooses an epoch or a number of trees;
2. both heads predict the evaluation fold: out-of-fold (OOF) image logits.

Then, by cross-fitting, the temperatures and the fusion weight applied to fold k are chosen
on the other folds' OOF logits only, so no reported prediction helped choose its own
parameters. The final temperatures and weight (for the test set) are chosen on all OOF logits.

Outputs under the run folder: ``models/`` (manifest + one folder per fold), ``calibration.json``,
``oof.parquet`` and ``metrics.json``, each written atomically and keyed, so a re-run with the
same features, labels, QC and settings does nothing.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from histoembed import __version__, store
from histoembed.config import FitSettings
from histoembed.console import console, progress
from histoembed.errors import UserError
from histoembed.heads import calibration, fusion
from histoembed.heads.mlp import MLPHead
from histoembed.heads.shared import first_seen_index, image_mean, view_means
from histoembed.heads.xgb import XGBHead
from histoembed.metrics import softmax, summary

HEADS = ("mlp", "xgb", "fused")


# ---------------------------------------------------------------- the training set

@dataclass
class TrainingSet:
    """The training split's features with one label per image, after QC."""

    features: store.Features
    store_dir: Path
    image_ids: list[str]          # first-seen order in the features
    row_image: np.ndarray         # image index of each feature row
    y: np.ndarray                 # class index per image
    groups: np.ndarray            # fold group per image (QC duplicate group or the image alone)
    classes: list[str]
    excluded_flagged: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)

    def fingerprint(self) -> dict:
        """What the fit depends on besides the features' own key and the settings."""
        return {"images": self.image_ids, "labels": self.y.tolist(), "groups": self.groups.tolist(),
                "classes": self.classes, "excluded_flagged": self.excluded_flagged}


def read_labels(run: Path) -> dict[str, str]:
    """Training labels by image id, from ``run/crops.parquet``."""
    path = Path(run) / store.CROPS_FILE
    table = store.read_table(path, "crops table (the labels)", columns=["image_id", "split", "label"],
                             hint="run `histoembed crops` first")
    labels = {}
    for image_id, split, label in zip(*(table[c].to_pylist() for c in ("image_id", "split", "label"))):
        if split == "train" and label is not None and label != "":
            labels[image_id] = label
    if not labels:
        raise UserError("no labelled training images", path=path,
                        hint="the crops stage reads labels from train_labels.csv (or the manifest's label column)")
    return labels


def qc_flags(run: Path) -> tuple[set[str], dict[str, int]]:
    """(flagged training image ids, duplicate group by image id) from ``run/qc.parquet`` if present."""
    table = store.read_qc(run)
    if table is None:
        return set(), {}
    flagged, groups = set(), {}
    for image_id, split, flag, group in zip(*(table[c].to_pylist()
                                                for c in ("image_id", "split", "flagged", "duplicate_group"))):
        if split == "train" and flag:
            flagged.add(image_id)
        if group is not None:
            groups[image_id] = int(group)
    return flagged, groups


def load_training_set(run: Path, encoder: str | None, include_flagged: bool) -> TrainingSet:
    run = Path(run)
    store_dir = store.find_feature_store(run, encoder)
    labels = read_labels(run)
    flagged, dup_groups = qc_flags(run)
    features = store.read_features(store_dir, split="train")
    if len(features) == 0:
        raise UserError("the feature store has no training rows", path=store_dir,
                        hint="run `histoembed embed` on a run whose crops include the train split")
    present = np.unique(features.image_id)
    unlabelled = sorted(i for i in present if i not in labels)
    excluded = sorted(i for i in present if i in flagged and i in labels) if not include_flagged else []
    drop = set(unlabelled) | set(excluded)
    if drop:
        features = features.subset(~np.isin(features.image_id, list(drop)))
    if len(features) == 0:
        raise UserError("no training image is left to fit on (all are unlabelled or QC-flagged)", path=store_dir,
                        hint="check the labels in crops.parquet, or pass --include-flagged")
    image_ids, row_image = first_seen_index(features.image_id)
    classes = sorted({labels[i] for i in image_ids})
    if len(classes) < 2:
        raise UserError(f"only one class among the training images ({classes[0]!r})", path=run / store.CROPS_FILE,
                        hint="fitting a classifier needs at least two labels")
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[labels[i]] for i in image_ids], dtype=np.int64)
    # Images of one duplicate group share a fold group; others are their own group.
    groups = np.array([dup_groups[i] if i in dup_groups else -1 - n for n, i in enumerate(image_ids)],
                      dtype=np.int64)
    return TrainingSet(features, store_dir, image_ids, row_image, y, groups, classes, excluded, unlabelled)


# ---------------------------------------------------------------- folds

def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends only on ``parts`` (e.g. the run seed and a fold)."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def _group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    from sklearn.model_selection import StratifiedGroupKFold

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members"
        return list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
            np.zeros(len(y)), y, groups))


def make_folds(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per image: stratified by label, no group in two folds, seeded."""
    fold = np.full(len(y), -1, dtype=np.int64)
    for k, (_, test) in enumerate(_group_kfold(y, groups, n_folds, seed)):
        fold[test] = k
    return fold


def inner_split(images: np.ndarray, y: np.ndarray, groups: np.ndarray, fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split training ``images`` (indices) into (fit, stopping), stratified and group-aware."""
    n_splits = max(2, round(1 / fraction))
    # Tiny sets: fewer splits (a larger stopping share) rather than none.
    n_splits = min(n_splits, int(np.unique(y[images], return_counts=True)[1].max(initial=0)))
    if n_splits < 2 or len(np.unique(groups[images])) < n_splits:
        return images, images[:0]
    _, stop = _group_kfold(y[images], groups[images], n_splits, seed)[0]
    mask = np.zeros(len(images), dtype=bool)
    mask[stop] = True
    return images[~mask], images[mask]


# ---------------------------------------------------------------- head inputs

@dataclass
class _HeadInputs:
    """Everything the fold loop indexes, computed once."""

    X_rows: np.ndarray      # crop-view embeddings [rows, D]
    row_image: np.ndarray
    X_pairs: np.ndarray     # image-view mean embeddings [pairs, D]
    pair_image: np.ndarray
    y: np.ndarray           # per image
    groups: np.ndarray


def _rows_of(image_index: np.ndarray, images: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(image_index, images))


# ---------------------------------------------------------------- one cross-validation

@dataclass
class CVResult:
    seed: int
    fold: np.ndarray              # per image
    z_mlp: np.ndarray             # [N, C] float32 OOF image logits
    z_xgb: np.ndarray
    fold_params: list[dict]       # per fold: T_mlp, T_xgb, w (chosen on the other folds)
    final: dict                   # T_mlp, T_xgb, w chosen on all OOF
    heads: list[tuple[MLPHead, XGBHead]]
    fold_info: list[dict]         # per fold: images, inner split sizes, best epoch / iteration


def cross_fit(z_mlp: np.ndarray, z_xgb: np.ndarray, y: np.ndarray, fold: np.ndarray,
              weight_points: int) -> tuple[list[dict], dict]:
    """Per-fold T_mlp, T_xgb and w, each chosen on the other folds' OOF logits; and the final ones on all."""

    def choose(rows: np.ndarray) -> dict:
        t_mlp = calibration.fit_temperature(z_mlp[rows], y[rows])
        t_xgb = calibration.fit_temperature(z_xgb[rows], y[rows])
        w, scores = fusion.choose_weight(z_mlp[rows], z_xgb[rows], y[rows], t_mlp, t_xgb, weight_points)
        return {"T_mlp": t_mlp, "T_xgb": t_xgb, "w": w, "macro_f1_by_w": scores, "images": int(len(rows))}

    per_fold = [{"fold": int(k), **choose(np.flatnonzero(fold != k))} for k in np.unique(fold)]
    final = choose(np.arange(len(y)))
    return per_fold, final


def run_cv(inputs: _HeadInputs, settings: FitSettings, seed: int, n_classes: int,
           on_fold=lambda k: None) -> CVResult:
    """One full cross-validation with ``seed``: folds, heads, OOF logits, cross-fitted T and w."""
    y, groups = inputs.y, inputs.groups
    fold = make_folds(y, groups, settings.folds, seed)
    N = len(y)
    z_mlp = np.zeros((N, n_classes), dtype=np.float32)
    z_xgb = np.zeros((N, n_classes), dtype=np.float32)
    heads, info = [], []
    for k in range(settings.folds):
        evaluated = np.flatnonzero(fold == k)
        training = np.flatnonzero(fold != k)
        fit_imgs, stop_imgs = inner_split(training, y, groups, settings.inner_val_fraction, derived_seed(seed, k, 1))
        head_seed = derived_seed(seed, k, 2)

        fit_rows, stop_rows = _rows_of(inputs.row_image, fit_imgs), _rows_of(inputs.row_image, stop_imgs)
        mlp = MLPHead(settings.mlp, n_classes, head_seed).fit(
            inputs.X_rows[fit_rows], y[inputs.row_image[fit_rows]],
            inputs.X_rows[stop_rows], y[inputs.row_image[stop_rows]], inputs.row_image[stop_rows])
        eval_rows = _rows_of(inputs.row_image, evaluated)
        z = image_mean(mlp.row_logits(inputs.X_rows[eval_rows]), inputs.row_image[eval_rows], N)
        z_mlp[evaluated] = z[evaluated]

        fit_pairs, stop_pairs = _rows_of(inputs.pair_image, fit_imgs), _rows_of(inputs.pair_image, stop_imgs)
        xgb = XGBHead(settings.xgb, n_classes, head_seed).fit(
            inputs.X_pairs[fit_pairs], y[inputs.pair_image[fit_pairs]],
            inputs.X_pairs[stop_pairs], y[inputs.pair_image[stop_pairs]])
        eval_pairs = _rows_of(inputs.pair_image, evaluated)
        z = image_mean(xgb.logits(inputs.X_pairs[eval_pairs]), inputs.pair_image[eval_pairs], N)
        z_xgb[evaluated] = z[evaluated]

        heads.append((mlp, xgb))
        info.append({"fold": k, "evaluated_images": int(len(evaluated)), "fit_images": int(len(fit_imgs)),
                     "stopping_images": int(len(stop_imgs)), "mlp_best_epoch": mlp.best_epoch_,
                     "mlp_epochs_run": mlp.epochs_run_, "xgb_best_iteration": xgb.best_iteration_})
        on_fold(k)
    per_fold, final = cross_fit(z_mlp, z_xgb, y, fold, settings.weight_grid)
    return CVResult(seed, fold, z_mlp, z_xgb, per_fold, final, heads, info)


def oof_probabilities(cv: CVResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head: (OOF probabilities before, after calibration), each row with its fold's T and w."""
    params = {p["fold"]: p for p in cv.fold_params}
    t_mlp = np.array([params[k]["T_mlp"] for k in cv.fold])[:, None]
    t_xgb = np.array([params[k]["T_xgb"] for k in cv.fold])[:, None]
    w = np.array([params[k]["w"] for k in cv.fold])[:, None]
    zm, zx = cv.z_mlp.astype(np.float64), cv.z_xgb.astype(np.float64)
    return {
        "mlp": (softmax(zm), softmax(zm / t_mlp)),
        "xgb": (softmax(zx), softmax(zx / t_xgb)),
        "fused": (softmax(fusion.fuse(zm, zx, w)), softmax(fusion.fuse(zm, zx, w, t_mlp, t_xgb))),
    }


def cv_metrics(cv: CVResult, y: np.ndarray, classes: list[str], settings: FitSettings) -> dict:
    probs = oof_probabilities(cv)
    return {head: summary(y, after, classes, probs_before=before, folds=cv.fold,
                          bootstrap=settings.bootstrap, seed=cv.seed)
            for head, (before, after) in probs.items()}


# ---------------------------------------------------------------- the stage

@dataclass
class FitResult:
    run: Path
    skipped: bool                 # True when the outputs were already up to date
    metrics: dict                 # the content of metrics.json
    classes: list[str]
    n_images: int
    excluded_flagged: list[str]
    unlabelled: list[str]
    seconds: float


def fit_key(ts: TrainingSet, settings: FitSettings) -> str:
    return store.config_key("fit", ts.features.meta.get("key"), ts.fingerprint(), settings.model_dump(), __version__)


def _up_to_date(run: Path, key: str) -> dict | None:
    """metrics.json's content when every output of the fit stage carries ``key``, else None."""
    try:
        manifest = store.read_json(run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE)
        metrics = store.read_json(run / store.METRICS_FILE)
        calib = store.read_json(run / store.CALIBRATION_FILE)
    except UserError:
        return None
    oof_key = store.read_meta(run / store.OOF_FILE).get("key")
    if {manifest.get("key"), metrics.get("key"), calib.get("key"), oof_key} != {key}:
        return None
    folds = manifest.get("folds", 0)
    if not all((store.fold_dir(run / store.MODELS_DIR, k)).is_dir() for k in range(folds)):
        return None
    return metrics


def run_fit(run: Path, settings: FitSettings, encoder: str | None = None) -> FitResult:
    """Fit, evaluate and save both heads with ``settings.folds``-fold cross-validation."""
    started = time.perf_counter()
    run = Path(run)
    ts = load_training_set(run, encoder, settings.include_flagged)
    if ts.unlabelled:
        console.print(f"[yellow]note:[/] {len(ts.unlabelled)} training image(s) in the features have no label "
                      f"in {store.CROPS_FILE} and were left out (e.g. {ts.unlabelled[0]})")
    if ts.excluded_flagged:
        console.print(f"QC: {len(ts.excluded_flagged)} flagged training image(s) left out "
                      "(--include-flagged keeps them)")
    counts = np.bincount(ts.y, minlength=len(ts.classes))
    smallest = int(counts.argmin())
    if counts[smallest] < settings.folds:
        raise UserError(f"class {ts.classes[smallest]!r} has {counts[smallest]} training image(s), fewer than "
                        f"the {settings.folds} folds", path=run / store.CROPS_FILE,
                        hint=f"use --folds {int(counts[smallest])} or fewer" if counts[smallest] >= 2
                        else "every class needs at least 2 training images")
    key = fit_key(ts, settings)
    done = _up_to_date(run, key)
    if done is not None:
        return FitResult(run, True, done, ts.classes, len(ts.image_ids), ts.excluded_flagged, ts.unlabelled,
                         time.perf_counter() - started)

    X_pairs, pair_image = view_means(ts.features, ts.row_image)
    inputs = _HeadInputs(ts.features.embedding, ts.row_image, X_pairs, pair_image, ts.y, ts.groups)
    C = len(ts.classes)
    seeds = [settings.seed + i for i in range(settings.seeds)]
    results: list[tuple[CVResult, dict]] = []
    with progress("folds") as bar:
        for s in seeds:
            task = bar.add_task(f"fit, seed {s}", total=settings.folds)
            cv = run_cv(inputs, settings, s, C, on_fold=lambda k, t=task: bar.advance(t))
            results.append((cv, cv_metrics(cv, ts.y, ts.classes, settings)))
            if len(results) > 1:   # only the first seed's models are kept
                results[-1] = (_drop_heads(cv), results[-1][1])

    cv, head_metrics = results[0]
    metrics = {
        "key": key, "version": __version__, "encoder": encoder_name(ts),
        "classes": ts.classes, "images": len(ts.image_ids), "folds": settings.folds, "seed": settings.seed,
        "excluded_flagged": len(ts.excluded_flagged), "unlabelled": len(ts.unlabelled),
        "calibration": "per fold: T and w chosen on the other folds' OOF predictions (cross-fitting); "
                       "'before' is T = 1 with the same w",
        "heads": head_metrics,
        "final": {k: cv.final[k] for k in ("T_mlp", "T_xgb", "w")},
    }
    if len(seeds) > 1:
        metrics["seeds"] = seed_spread(seeds, [m for _, m in results])
    _write_outputs(run, ts, settings, cv, metrics, key)
    return FitResult(run, False, metrics, ts.classes, len(ts.image_ids), ts.excluded_flagged, ts.unlabelled,
                     time.perf_counter() - started)


def encoder_name(ts: TrainingSet) -> str:
    """The encoder as the feature store names it, in a form ``find_feature_store`` finds again."""
    named = ts.features.meta.get("encoder")
    return named if named and store.encoder_slug(named) == ts.store_dir.name else ts.store_dir.name


def _drop_heads(cv: CVResult) -> CVResult:
    cv.heads = []
    return cv


def seed_spread(seeds: list[int], per_seed: list[dict]) -> dict:
    """Each head's OOF macro-F1 per seed and its spread (how much of a difference is noise)."""
    out = {"seeds": seeds, "macro_f1": {}, "spread": {}}
    for head in HEADS:
        scores = [m[head]["macro_f1"] for m in per_seed]
        out["macro_f1"][head] = scores
        out["spread"][head] = {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)),
                               "min": float(np.min(scores)), "max": float(np.max(scores))}
    return out


def _write_outputs(run: Path, ts: TrainingSet, settings: FitSettings, cv: CVResult, metrics: dict,
                   key: str) -> None:
    dim = int(ts.features.embedding.shape[1])
    models = run / store.MODELS_DIR
    tmp = run / f".{store.MODELS_DIR}.tmp-{os.getpid()}"
    old = run / f".{store.MODELS_DIR}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for k, (mlp, xgb) in enumerate(cv.heads):
            folder = store.fold_dir(tmp, k)
            folder.mkdir(parents=True)
            mlp.save(folder, ts.classes)
            xgb.save(folder, ts.classes, dim)
        store.write_json({
            "key": key, "version": __version__, "encoder": metrics["encoder"], "encoder_slug": ts.store_dir.name,
            "feature_encoder": ts.features.meta.get("encoder"),
            "dim": dim, "classes": ts.classes, "folds": settings.folds, "seed": settings.seed,
            "feature_key": ts.features.meta.get("key"), "settings": settings.model_dump(),
            "final": {k: cv.final[k] for k in ("T_mlp", "T_xgb", "w")},
            "fusion": "w * z_mlp / T_mlp + (1 - w) * z_xgb / T_xgb; probabilities averaged over folds",
        }, tmp / store.MODELS_MANIFEST_FILE)
        if models.exists():
            os.replace(models, old)
        os.replace(tmp, models)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)

    store.write_json({"key": key, "classes": ts.classes,
                      "rule": "w * z_mlp / T_mlp + (1 - w) * z_xgb / T_xgb",
                      "weight_grid": [round(w, 6) for w in fusion.weight_grid(settings.weight_grid).tolist()],
                      "folds": cv.fold_params, "final": cv.final, "fold_training": cv.fold_info},
                     run / store.CALIBRATION_FILE)

    probs = oof_probabilities(cv)["fused"][1]
    pred = probs.argmax(axis=1)
    C = len(ts.classes)
    lst = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float32).ravel()), C)  # noqa: E731
    table = pa.table({
        "image_id": pa.array(ts.image_ids, pa.string()),
        "fold": pa.array(cv.fold.astype(np.int32)),
        "label": pa.array([ts.classes[i] for i in ts.y], pa.string()),
        "logits_mlp": lst(cv.z_mlp), "logits_xgb": lst(cv.z_xgb), "prob": lst(probs),
        "prediction": pa.array([ts.classes[i] for i in pred], pa.string()),
    })
    store.write_table(table, run / store.OOF_FILE, meta={"key": key, "classes": ts.classes,
                                                         "encoder": metrics["encoder"], "seed": settings.seed})
    store.write_json(metrics, run / store.METRICS_FILE)

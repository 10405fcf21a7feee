"""The fit stage: cross-validated heads (``--heads``, default MLP + XGBoost), calibration,
fusion, class offsets and conformal sets.

For each fold k (stratified by label, seeded, no QC duplicate group straddling folds):

1. the training folds are split again into a *fit* part and an inner *stopping* part
   (stratified, group-aware); every head trains on the fit part and stops early (or picks
   its regularisation) on the stopping part, so the evaluation fold never chooses anything;
2. every head predicts the evaluation fold, one logit vector per (image, view): out-of-fold
   (OOF) logits per view and per image (the mean over views).

Then, by cross-fitting (``heads.decisions``), the temperatures, fusion weights, class offsets
and conformal thresholds applied to fold k are chosen on the other folds' OOF logits only, so
no reported prediction helped choose its own parameters. The final parameters (for the test
set) are chosen on all OOF logits.

Outputs under the run folder: ``models/`` (manifest + one folder per fold), ``calibration.json``,
``oof.parquet`` and ``metrics.json``, each written atomically and keyed, so a re-run with the
same features, labels, QC and settings does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed import __version__
from histoembed.core import cpus, feature_store, locks, store
from histoembed.core.config import FitSettings, output_settings
from histoembed.core.console import progress
from histoembed.core.errors import UserError, from_os_error
from histoembed.maths import scales
from histoembed.maths.metrics import accuracy_by_quantile, summary, view_spread
from histoembed.models.heads import Bags, Head, check_names, conformal, decisions, fusion
from histoembed.models.heads import get as get_head
from histoembed.models import members
from histoembed.models.heads.shared import first_seen_index

FUSION_RULE = "sum over heads of w_h * z_h / T_h (weights on the simplex)"
MULTI_NLL_IMAGES = 2.0  # several encoders: weights by NLL within two images' worth of the best macro-F1 (fusion.py)
FIT_VERSION = 1  # bump when the fit's outputs change meaning (part of the skip key)


# ---------------------------------------------------------------- the training set

@dataclass
class TrainingSet:
    """The training split's features with one label per image, after QC."""

    features: feature_store.Features
    store_dir: Path
    image_ids: list[str]          # first-seen order in the features (all of the train split)
    row_image: np.ndarray         # image index of each feature row
    y: np.ndarray                 # class index per image
    groups: np.ndarray            # fold group per image (QC duplicate group or the image alone)
    classes: list[str]
    excluded_flagged: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    train_crops: str | None = None  # digest of the training crops' pixels (crops.parquet)
    scales: list[float] = field(default_factory=lambda: [1.0])  # crop scales in the features (crops --scales)

    def fingerprint(self) -> dict:
        """What the fit depends on besides the features' own key and the settings."""
        return {"images": self.image_ids, "labels": self.y.tolist(), "groups": self.groups.tolist(),
                "classes": self.classes, "excluded_flagged": self.excluded_flagged}


def read_labels(run: Path) -> dict[str, str]:
    """Training labels by ``split/image_id`` key (see ``store.image_keys``), from ``run/crops.parquet``."""
    path = Path(run) / store.CROPS_FILE
    table = store.read_table(path, "crops table (the labels)", columns=["image_id", "split", "label"],
                             hint="run `histoembed crops` first", stage="crops")
    labels = {}
    for image_id, split, label in zip(*(table[c].to_pylist() for c in ("image_id", "split", "label"))):
        if split == "train" and label is not None and label != "":
            labels[f"{split}/{image_id}"] = label
    if not labels:
        raise UserError("no labelled training images", path=path,
                        hint="the crops stage reads labels from train_labels.csv (or the manifest's label column)")
    return labels


def qc_flags(run: Path) -> tuple[set[str], dict[str, int]]:
    """(flagged training images, duplicate group by image) from ``run/qc.parquet`` if present.

    Images are ``split/image_id`` keys: a test image's flags never touch the training image of its name.
    The table must be the one ``crops`` left images out by (see :func:`qc_mismatch`).
    """
    table = store.read_qc(run)
    crops_meta = store.read_meta(Path(run) / store.CROPS_FILE)
    if "qc" in crops_meta:  # crops files of older versions do not say which QC table they used
        why = qc_mismatch(crops_meta["qc"], store.read_meta(Path(run) / store.QC_FILE).get("key")
                          if table is not None else None)
        if why:
            raise UserError(why, path=Path(run) / store.QC_FILE,
                            hint="run `histoembed qc`, then `histoembed crops` (and `histoembed embed`) again, "
                                 "then fit")
    if table is None:
        return set(), {}
    flagged, groups = set(), {}
    for image_id, split, flag, group in zip(*(table[c].to_pylist()
                                                for c in ("image_id", "split", "flagged", "duplicate_group"))):
        if split == "train" and flag:
            flagged.add(f"{split}/{image_id}")
        if group is not None:
            groups[f"{split}/{image_id}"] = int(group)
    return flagged, groups


def qc_mismatch(used: str | None, current: str | None) -> str | None:
    """Why the QC table now in the run is not the one crops used (its key ``used``), or None when it is.

    Flags of another QC run (of changed data, or other settings) would leave out or group images the
    crops and features were not cut for.
    """
    if used == current:
        return None
    if current is None:
        return "`histoembed crops` used a QC table that is gone: its duplicate groups and flags cannot be applied"
    if used is None:
        return "this QC table was written after `histoembed crops` cut the crops without one"
    return "this QC table is not the one `histoembed crops` used (QC ran again since, on changed data or settings)"


def patient_groups(run: Path) -> dict[str, str]:
    """{"split/image_id": patient} from the crops file's ``group`` column (empty when the data has none)."""
    path = Path(run) / store.CROPS_FILE
    if "group" not in pq.read_schema(path).names:
        return {}
    t = pq.read_table(path, columns=["image_id", "split", "group"])
    return {f"{sp}/{i}": g for i, sp, g in zip(*(t[c].to_pylist() for c in ("image_id", "split", "group")))
            if g}


def load_training_set(run: Path, encoder: str | None, include_flagged: bool,
                      scale_fusion: str = "crops", keep_dtype: bool = False) -> TrainingSet:
    """The training features after QC, with crops of several scales fused as ``scale_fusion`` says.

    ``keep_dtype``: a float16 store's embeddings stay float16 (for ``Bags.from_rows``, which converts
    them to float32 exactly as reading would have; nothing else may compute on them).
    """
    run = Path(run)
    store_dir = feature_store.find_feature_store(run, encoder)
    labels = read_labels(run)
    flagged, dup_groups = qc_flags(run)
    features = feature_store.read_features(store_dir, split="train", keep_dtype=keep_dtype)
    if len(features) == 0:
        raise UserError("the feature store has no training rows", path=store_dir,
                        hint="run `histoembed embed` on a run whose crops include the train split")
    feature_store.check_complete(features, run, "train")
    features = feature_store.with_scales(features, run)
    crop_scales = scales.scales_of(features)
    features = scales.fuse_scales(features, scale_fusion, crop_scales)
    keys = features.keys()
    present = np.unique(keys)
    unlabelled = sorted(k for k in present if k not in labels)
    excluded = sorted(k for k in present if k in flagged and k in labels) if not include_flagged else []
    drop = set(unlabelled) | set(excluded)
    if drop:
        keep = ~np.isin(keys, list(drop))
        features, keys = features.subset(keep), keys[keep]
    if len(features) == 0:
        raise UserError("no training image is left to fit on (all are unlabelled or QC-flagged)", path=store_dir,
                        hint="check the labels in crops.parquet, or pass --include-flagged")
    image_keys, row_image = first_seen_index(keys)
    classes = sorted({labels[k] for k in image_keys})
    given = store.read_meta(run / store.CROPS_FILE).get("classes") or sorted(set(labels.values()))
    for label in given:
        if label not in classes:
            n = sum(1 for k in excluded if labels[k] == label)
            raise UserError(f"label {label!r} has no training image left to fit on: "
                            + (f"QC flagged all {n} of its image(s)" if n else "none of its images has crops"),
                            path=run / store.CROPS_FILE,
                            hint="pass --include-flagged to keep flagged images" if n else
                            "re-run `histoembed crops` and `histoembed embed`")
    if len(classes) < 2:
        raise UserError(f"only one class among the training images ({classes[0]!r})", path=run / store.CROPS_FILE,
                        hint="fitting a classifier needs at least two labels")
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[labels[k]] for k in image_keys], dtype=np.int64)
    # Images of one patient (the manifest's group column) share a fold group, as do images of one QC duplicate
    # group; others are their own group.
    patients = patient_groups(run)
    patient_id = {p: 10**9 + i for i, p in enumerate(sorted(set(patients.values())))}
    groups = np.array([patient_id[patients[k]] if k in patients else dup_groups[k] if k in dup_groups else -1 - n
                       for n, k in enumerate(image_keys)], dtype=np.int64)
    name = lambda k: str(k).split("/", 1)[1]  # noqa: E731  (every key here is train/<name>)
    return TrainingSet(features, store_dir, [name(k) for k in image_keys], row_image, y, groups, classes,
                       [name(k) for k in excluded], [name(k) for k in unlabelled], store.train_crops_digest(run),
                       crop_scales)


# ---------------------------------------------------------------- folds

def derived_seed(*parts: int) -> int:
    """A 32-bit seed that depends only on ``parts`` (e.g. the run seed and a fold)."""
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


def _group_kfold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of scikit-learn's ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``.

    The same folds, made fast: scikit-learn scores each fold for each group in a Python loop
    (``_find_best_fold``), which took about a sixth of ``fit --folds 10`` on 691 images; here
    all folds are scored at once with the same arithmetic, so the choice is identical (checked
    against scikit-learn in the tests).
    """
    y = np.asarray(y)
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    if np.all(n_splits > y_cnt):
        raise ValueError(f"n_splits={n_splits} cannot be greater than the number of members in each class.")
    _, groups_inv, groups_cnt = np.unique(groups, return_inverse=True, return_counts=True)
    n_groups, n_classes = len(groups_cnt), len(y_cnt)
    if n_splits > n_groups:
        raise ValueError(f"Cannot have number of splits n_splits={n_splits} greater than the number of groups: "
                         f"{n_groups}.")
    per_group = np.zeros((n_groups, n_classes))
    np.add.at(per_group, (groups_inv.reshape(-1), y_inv.reshape(-1)), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)           # as check_random_state(seed) does
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    groups_inv = inv_perm[groups_inv.reshape(-1)]
    per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    adds = np.eye(n_splits)[:, :, None]                  # candidate i adds the group to fold i only
    for g in np.argsort(-np.std(per_group, axis=1), kind="stable"):
        counts = per_group[g]
        evals = np.std((per_fold[None] + adds * counts) / y_cnt.reshape(1, 1, -1), axis=1).mean(axis=1)
        sizes = per_fold.sum(axis=1)
        best, best_eval, best_size = 0, np.inf, np.inf
        for i in range(n_splits):   # scikit-learn's tie rule: close scores go to the smaller fold
            e = evals[i]
            if e < best_eval or (abs(e - best_eval) <= 1e-8 + 1e-5 * abs(best_eval) and sizes[i] < best_size):
                best, best_eval, best_size = i, e, sizes[i]
        per_fold[best] += counts
        fold_of_group[g] = best
    fold = fold_of_group[groups_inv]
    everything = np.arange(len(y))
    return [(everything[fold != k], everything[fold == k]) for k in range(n_splits)]


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


# ---------------------------------------------------------------- one cross-validation

@dataclass
class CVResult:
    seed: int
    heads: list[str]              # head names, in fusion order
    fold: np.ndarray              # per image
    z: dict[str, np.ndarray]      # head -> [N, C] float32 OOF image logits
    z_bags: dict[str, np.ndarray]  # head -> [bags, C] OOF logits per (image, view)
    bag_image: np.ndarray         # image of each bag
    fold_params: list[dict]       # per fold: decisions.choose on the other folds
    final: dict                   # decisions.choose on all OOF
    models: list[list[Head]]      # per fold, one fitted head per name
    fold_info: list[dict]         # per fold: images, inner split sizes, what each head fitted


def decision_settings(settings: FitSettings) -> decisions.DecisionSettings:
    return decisions.DecisionSettings(settings.weight_grid, settings.alpha, settings.class_conditional)


def run_cv(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings, seed: int, n_classes: int,
           on_fold=lambda k: None) -> CVResult:
    """One full cross-validation with ``seed``: folds, heads, OOF logits, cross-fitted decisions."""
    names = list(settings.heads)
    fold = make_folds(y, groups, settings.folds, seed)
    z, z_bags, models, info = fit_heads(bags, y, groups, settings, seed, n_classes, fold, on_fold)
    per_fold, final = decisions.cross_fit(z, y, fold, decision_settings(settings))
    return CVResult(seed, names, fold, z, z_bags, bags.image, per_fold, final, models, info)


def fit_heads(bags: Bags, y: np.ndarray, groups: np.ndarray, settings: FitSettings, seed: int, n_classes: int,
              fold: np.ndarray, on_fold=lambda k: None
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[list[Head]], list[dict]]:
    """Every head on every fold of ``fold``: (OOF image logits, OOF bag logits, models per fold, info per fold).

    The inner (fit, stopping) split and the heads' seeds depend on (seed, fold) alone, so heads fitted on
    another encoder's features with the same ``fold`` see the very same images.
    """
    names = list(settings.heads)
    N = len(y)
    bags.means()   # once for every fold: each fold's bags take theirs, and heads on means never copy the rows
    z = {h: np.zeros((N, n_classes), dtype=np.float32) for h in names}
    z_bags = {h: np.zeros((bags.n_bags, n_classes), dtype=np.float32) for h in names}
    models, info = [], []
    for k in range(settings.folds):
        evaluated = np.flatnonzero(fold == k)
        training = np.flatnonzero(fold != k)
        fit_imgs, stop_imgs = inner_split(training, y, groups, settings.inner_val_fraction, derived_seed(seed, k, 1))
        head_seed = derived_seed(seed, k, 2)
        fit_bags, stop_bags, eval_bags = bags.select(fit_imgs), bags.select(stop_imgs), bags.select(evaluated)
        fold_models, fold_info = [], {"fold": k, "evaluated_images": int(len(evaluated)),
                                      "fit_images": int(len(fit_imgs)), "stopping_images": int(len(stop_imgs))}
        for name in names:
            cls = get_head(name)
            head = cls(getattr(settings, name), n_classes, head_seed).fit(
                fit_bags, y[fit_bags.image], stop_bags, y[stop_bags.image])
            zb = head.predict(eval_bags)
            if not np.isfinite(zb).all():
                raise UserError(f"fold {k}'s {name} head predicted NaN or infinity (seed {seed})",
                                hint=f"the features are finite, so the head diverged: check the [fit.{name}] "
                                     "settings in histoembed.toml (a lower learning rate)")
            z_bags[name][eval_bags.index] = zb
            z[name][eval_bags.images()] = eval_bags.per_image(zb)
            fold_models.append(head)
            fold_info[name] = head.fitted_info()
        models.append(fold_models)
        info.append(fold_info)
        on_fold(k)
    return z, z_bags, models, info


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
        "conformal": {**conformal.coverage_summary(applied.sets, y, classes, settings.alpha),
                      "class_conditional": settings.class_conditional,
                      "rule": "split-conformal on 1 - p(class); each fold's thresholds from the other folds"},
        "view_spread": {"definition": "mean total-variation distance of each view's fused probabilities "
                                      "from the image's mean", "median": float(np.median(spread)),
                        "accuracy_by_quantile": accuracy_by_quantile(spread, applied.pred == y)},
    }


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


MULTI_ONLY = ("encoder", "encoder_fusion")  # settings a one-encoder fit's key and manifest leave out (as before them)


def key_settings(settings: FitSettings) -> dict:
    """The settings in a one-encoder fit's key: which store is read is in its features' key already."""
    return {k: v for k, v in output_settings(settings).items() if k not in MULTI_ONLY}


def fit_key(ts: TrainingSet, settings: FitSettings) -> str:
    return store.config_key("fit", FIT_VERSION, key_settings(settings), ts.features.meta.get("key"),
                            ts.fingerprint(), ts.train_crops)


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
    if store.damaged_model_files(run / store.MODELS_DIR, manifest):
        return None  # a truncated or corrupt model file: fit again rather than say "up to date"
    return metrics


def run_fit(run: Path, settings: FitSettings, encoder: str | None = None) -> FitResult:
    """Fit, evaluate and save both heads with ``settings.folds``-fold cross-validation."""
    started = time.perf_counter()
    run = Path(run)
    check_names(settings.heads)
    cpus.use_threads(settings.threads)
    encoders = parse_encoders(encoder if encoder is not None else settings.encoder)
    if len(encoders) > 1:
        return run_fit_multi(run, settings, encoders, started)
    encoder = encoders[0] if encoders else None
    ts = load_training_set(run, encoder, settings.include_flagged, settings.scale_fusion, keep_dtype=True)
    check_class_counts(run, ts, settings)
    key = fit_key(ts, settings)
    with fit_lock(run):
        return _fit(run, ts, settings, key, started)


def parse_encoders(value: str | None) -> list[str]:
    """Encoder names of ``--encoder A,B`` (or ``encoder = "A,B"``); [] when none is given."""
    return feature_store.encoder_list(value) if value is not None else []


def check_class_counts(run: Path, ts: TrainingSet, settings: FitSettings) -> None:
    """Every class needs at least one image per fold."""
    counts = np.bincount(ts.y, minlength=len(ts.classes))
    smallest = int(counts.argmin())
    if counts[smallest] < settings.folds:
        label = ts.classes[smallest]
        labels = read_labels(run)
        flagged = sum(1 for i in ts.excluded_flagged if labels.get(f"train/{i}") == label)  # excluded: train names
        hint = f"use --folds {int(counts[smallest])} or fewer" if counts[smallest] >= 2 else \
            "every class needs at least 2 training images"
        raise UserError(f"class {label!r} has {counts[smallest]} training image(s), fewer than "
                        f"the {settings.folds} folds"
                        + (f" ({flagged} more were flagged by QC and left out)" if flagged else ""),
                        path=run / store.CROPS_FILE,
                        hint=hint + (", or pass --include-flagged" if flagged else ""))


FIT_LOCK = ".fit.lock"


def fit_lock(run: Path):
    """One fit per run at a time: two would both write models/ and the last to finish would win unseen."""
    lock = Path(run) / FIT_LOCK

    def busy(pid: int) -> UserError:
        return UserError(f"another `histoembed fit` (process {pid}) is fitting this run", path=lock,
                         hint="wait for it to finish, then run fit again; if no fit is running, delete this lock file")

    return locks.pid_lock(lock, busy)


def _fit(run: Path, ts: TrainingSet, settings: FitSettings, key: str, started: float) -> FitResult:
    """The fit proper, under the run's fit lock."""
    recover(run)
    done = _up_to_date(run, key)
    if done is not None:
        return FitResult(run, True, done, ts.classes, len(ts.image_ids), ts.excluded_flagged, ts.unlabelled,
                         time.perf_counter() - started)

    bags = Bags.from_rows(ts.features.embedding, ts.row_image, ts.features.view)
    # The bags hold the rows now: let the store's copy go (an empty array keeps the width for the manifest).
    ts.features = dataclasses.replace(ts.features, embedding=np.zeros((0, bags.dim), np.float32))
    gc.collect()
    C = len(ts.classes)
    seeds = [settings.seed + i for i in range(settings.seeds)]
    results: list[tuple[CVResult, dict]] = []
    with progress("folds") as bar:
        for seed in seeds:
            task = bar.add_task(f"fit, seed {seed}", total=settings.folds)
            cv = run_cv(bags, ts.y, ts.groups, settings, seed, C, on_fold=lambda k, t=task: bar.advance(t))
            results.append((cv, cv_metrics(cv, ts.y, ts.classes, settings)))
            if len(results) > 1:   # only the first seed's models are kept
                results[-1] = (_drop_heads(cv), results[-1][1])

    cv, cv_numbers = results[0]
    metrics = fit_metrics(key, encoder_name(ts), ts, settings, cv.heads, {}, "head", results, seeds)
    _write_outputs(run, ts, settings, cv, metrics, key)
    return FitResult(run, False, metrics, ts.classes, len(ts.image_ids), ts.excluded_flagged, ts.unlabelled,
                     time.perf_counter() - started)


# ---------------------------------------------------------------- several encoders

@dataclass
class EncoderPart:
    """One encoder of a multi-encoder fit: its store and what the manifest records of it."""

    name: str                     # as given (find_feature_store finds it again)
    store_dir: Path
    meta: dict                    # the store's metadata (its first part's)
    dim: int = 0
    scaling: dict | None = None   # concat mode: members.block_scaling of its training rows

    def record(self) -> dict:
        out = {"encoder": self.name, "slug": self.store_dir.name, "feature_encoder": self.meta.get("encoder"),
               "dim": self.dim, "feature_key": self.meta.get("key")}
        return out if self.scaling is None else {**out, "scaling": self.scaling}


def run_fit_multi(run: Path, settings: FitSettings, names: list[str], started: float) -> FitResult:
    """``fit --encoder A,B``: every head on each encoder's store, the same folds, all members fused.

    The stores must hold exactly the same (split, image, crop, view) rows. In logits mode each
    store is read, fitted and let go before the next one is read, so only one store's
    features are in memory at a time; concat mode holds them all (side by side).
    """
    parts = [EncoderPart(name, feature_store.find_feature_store(run, name), {}) for name in names]
    feature_store.check_same_rows({p.name: p.store_dir for p in parts})
    for p in parts:
        p.meta = store.read_meta(feature_store.feature_parts(p.store_dir)[0])
    first = load_training_set(run, names[0], settings.include_flagged, settings.scale_fusion,
                              keep_dtype=settings.encoder_fusion == "logits")
    check_class_counts(run, first, settings)
    key = store.config_key("fit", FIT_VERSION, output_settings(settings), "encoders",
                           [[p.store_dir.name, p.meta.get("key")] for p in parts], first.fingerprint(),
                           first.train_crops)
    with fit_lock(run):
        recover(run)
        done = _up_to_date(run, key)
        if done is not None:
            return FitResult(run, True, done, first.classes, len(first.image_ids), first.excluded_flagged,
                             first.unlabelled, time.perf_counter() - started)
        return _fit_multi(run, settings, parts, first, key, started)


def _same_images(first: TrainingSet, ts: TrainingSet, part: EncoderPart) -> None:
    if ts.image_ids != first.image_ids or not np.array_equal(ts.y, first.y) or ts.scales != first.scales:
        raise UserError(f"the training images of encoder {part.name!r} differ from those of the first encoder",
                        path=part.store_dir, hint=f"run `histoembed embed --encoder {part.name}` on the same crops")


def _fit_multi(run: Path, settings: FitSettings, parts: list[EncoderPart], first: TrainingSet, key: str,
               started: float) -> FitResult:
    C = len(first.classes)
    seeds = [settings.seed + i for i in range(settings.seeds)]
    folds = [make_folds(first.y, first.groups, settings.folds, seed) for seed in seeds]
    names: list[str] = []
    z: list[dict] = [{} for _ in seeds]
    z_bags: list[dict] = [{} for _ in seeds]
    models: list[list[Head]] = [[] for _ in range(settings.folds)]
    info: list[dict] = [{} for _ in range(settings.folds)]
    bag_image = None

    def fit_all(bags: Bags, label: str, member) -> None:
        nonlocal bag_image
        if bag_image is not None and not np.array_equal(bag_image, bags.image):
            raise UserError("the encoders' stores hold different views of an image", path=run / store.FEATURES_DIR,
                            hint="embed every encoder with the same --repeats")
        bag_image = bags.image
        with progress("folds") as bar:
            for s, seed in enumerate(seeds):
                task = bar.add_task(f"fit {label}, seed {seed}", total=settings.folds)
                zs, zbs, fold_models, fold_info = fit_heads(bags, first.y, first.groups, settings, seed, C, folds[s],
                                                            on_fold=lambda k, t=task: bar.advance(t))
                for h in settings.heads:
                    z[s][member(h)], z_bags[s][member(h)] = zs[h], zbs[h]
                if s == 0:   # only the first seed's models are kept
                    for k in range(settings.folds):
                        models[k].extend(fold_models[k])
                        info[k].update({("fold" if n == "fold" or n.endswith("_images") else member(n)): v
                                        for n, v in fold_info[k].items()})
        names.extend(member(h) for h in settings.heads)

    empty = first.features.subset(np.zeros(len(first.features), bool))
    if settings.encoder_fusion == "logits":
        for i, part in enumerate(parts):
            ts = first if i == 0 else load_training_set(run, part.name, settings.include_flagged,
                                                        settings.scale_fusion, keep_dtype=True)
            _same_images(first, ts, part)
            part.dim = int(ts.features.embedding.shape[1])
            bags = Bags.from_rows(ts.features.embedding, ts.row_image, ts.features.view)
            ts.features = ts.features.subset(np.zeros(len(ts.features), bool))   # let this store's features go
            fit_all(bags, part.store_dir.name, lambda h, slug=part.store_dir.name: members.member_name(slug, h))
            del bags, ts
            gc.collect()
    else:
        blocks = []
        for i, part in enumerate(parts):
            ts = first if i == 0 else load_training_set(run, part.name, settings.include_flagged,
                                                        settings.scale_fusion)
            _same_images(first, ts, part)
            part.dim = int(ts.features.embedding.shape[1])
            part.scaling = members.block_scaling(ts.features.embedding)
            blocks.append(ts.features)
        joined = members.concat_features(blocks, [p.scaling for p in parts])
        del blocks
        bags = Bags.from_rows(joined.embedding, first.row_image, joined.view)
        del joined
        gc.collect()
        fit_all(bags, "+".join(p.store_dir.name for p in parts), lambda h: h)
        del bags
    first.features = empty
    gc.collect()

    results = []
    for s, seed in enumerate(seeds):
        per_fold, final = decisions.cross_fit(z[s], first.y, folds[s],
                                              dataclasses.replace(decision_settings(settings),
                                                                  nll_images=MULTI_NLL_IMAGES))
        cv = CVResult(seed, names, folds[s], z[s], z_bags[s], bag_image, per_fold, final,
                      models if s == 0 else [], info)
        results.append((cv, cv_metrics(cv, first.y, first.classes, settings)))
    cv, cv_numbers = results[0]
    concat = settings.encoder_fusion == "concat"
    joined_name = ",".join(p.name for p in parts)
    member_rows = []
    for m in names:
        slug, head = members.split_member(m)
        encoder = joined_name if concat else next(p.name for p in parts if p.store_dir.name == slug)
        member_rows.append({"member": m, "encoder": encoder, "head": head, "weight": cv.final["weights"][m],
                            "oof_macro_f1": cv_numbers["heads"][m]["macro_f1"]})
    encoder_fields = {"encoders": [p.record() for p in parts],
                      "encoder_fusion": {"mode": settings.encoder_fusion,
                                         "rule": members.CONCAT_RULE if concat else members.LOGITS_RULE}}
    metrics = fit_metrics(key, joined_name, first, settings, member_rows, encoder_fields, "member", results, seeds)
    multi = {"encoder": joined_name, "encoder_slug": None, "feature_encoder": None, "feature_key": None,
             "dim": sum(p.dim for p in parts) if concat else None, "encoders": [p.record() for p in parts],
             "encoder_fusion": settings.encoder_fusion,
             "members": {m: dict(zip(("encoder_slug", "head"), members.split_member(m))) for m in names}}
    _write_outputs(run, first, settings, cv, metrics, key, multi)
    return FitResult(run, False, metrics, first.classes, len(first.image_ids), first.excluded_flagged,
                     first.unlabelled, time.perf_counter() - started)


def fit_metrics(key: str, encoder: str, ts: TrainingSet, settings: FitSettings, member_list: list,
                encoder_fields: dict, member_word: str, results: list[tuple[CVResult, dict]],
                seeds: list[int]) -> dict:
    """``metrics.json``: the first seed's cross-validated numbers, what they were fitted on, and the seeds' spread."""
    cv, cv_numbers = results[0]
    metrics = {
        "key": key, "version": __version__, "encoder": encoder,
        "classes": ts.classes, "images": len(ts.image_ids), "folds": settings.folds, "seed": settings.seed,
        "excluded_flagged": len(ts.excluded_flagged), "unlabelled": len(ts.unlabelled),
        "members": member_list,
        **encoder_fields,
        "scale_fusion": {"mode": settings.scale_fusion, "scales": ts.scales,
                         "rule": scales.RULES[settings.scale_fusion]},
        "calibration": f"per fold: each {member_word}'s regularised T, the fusion weights, offsets and conformal "
                       "thresholds chosen on the other folds' OOF predictions (cross-fitting); 'before' is T = 1 "
                       "with the same weights",
        **cv_numbers,
        "final": final_summary(cv.final),
    }
    if len(seeds) > 1:
        metrics["seeds"] = seed_spread(seeds, [m for _, m in results])
    return metrics


def encoder_name(ts: TrainingSet) -> str:
    """The encoder as the feature store names it, in a form ``find_feature_store`` finds again."""
    named = ts.features.meta.get("encoder")
    return named if named and feature_store.encoder_slug(named) == ts.store_dir.name else ts.store_dir.name


def _drop_heads(cv: CVResult) -> CVResult:
    cv.models = []
    return cv


def final_summary(final: dict) -> dict:
    """The parameters for the test set, as metrics.json and the manifest show them."""
    return {k: final[k] for k in ("heads", "T", "T_note", "weights", "offsets", "conformal_threshold")}


def seed_spread(seeds: list[int], per_seed: list[dict]) -> dict:
    """Each head's OOF macro-F1 per seed and its spread (how much of a difference is noise)."""
    out = {"seeds": seeds, "macro_f1": {}, "spread": {}}
    for head in per_seed[0]["heads"]:
        scores = [m["heads"][head]["macro_f1"] for m in per_seed]
        out["macro_f1"][head] = scores
        out["spread"][head] = {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)),
                               "min": float(np.min(scores)), "max": float(np.max(scores))}
    return out


def recover(run: Path) -> None:
    """Undo what a killed fit left: its temporaries go; models/ moved aside and never replaced comes back."""
    run = Path(run)
    store.remove_stale(run, ".*.tmp-*")  # models/ and every file a killed stage was writing
    models = run / store.MODELS_DIR
    for old in sorted(run.glob(f".{store.MODELS_DIR}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not store.pid_alive(int(pid)):
            if models.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, models)


def write_failed(e: OSError, path: Path) -> UserError:
    """A failed write of a fit output as a message naming the file and what to do (free space, fit again)."""
    reason = from_os_error(e).problem
    full = e.errno == errno.ENOSPC or "No space left" in str(e)
    return UserError(f"could not write the fit's outputs: {reason}", path=path,
                     hint=("free space (or choose another --run) and re-run `histoembed fit`" if full else
                           "check that the run folder is writable and has free space, then re-run `histoembed fit`")
                     + "; the previous fit's outputs, if any, are left as they were")


def _final_name(filename, run: Path, tmp: Path) -> Path | None:
    """The output a temporary stands for: ``.models.tmp-PID/fold-00/x`` -> ``models/fold-00/x``, ``.a.tmp-PID`` -> ``a``."""
    if not filename:
        return None
    path = Path(filename)
    with contextlib.suppress(ValueError):
        path = run / store.MODELS_DIR / path.relative_to(tmp)
    if path.name.startswith(".") and ".tmp-" in path.name:
        path = path.with_name(path.name[1:].rsplit(".tmp-", 1)[0])
    return path


def _write_outputs(run: Path, ts: TrainingSet, settings: FitSettings, cv: CVResult, metrics: dict,
                   key: str, multi: dict | None = None) -> None:
    """Write every output to a temporary first, then rename them in quick succession, metrics.json last.

    Readers check that the models, calibration.json, oof.parquet and metrics.json carry one key,
    so even a kill between two renames cannot make them mix outputs of two fits.
    """
    dim = int(ts.features.embedding.shape[1])
    models = run / store.MODELS_DIR
    tmp = run / f".{store.MODELS_DIR}.tmp-{os.getpid()}"
    old = run / f".{store.MODELS_DIR}.old-{os.getpid()}"
    recover(run)
    shutil.rmtree(tmp, ignore_errors=True)
    applied = decisions.apply_cross_fitted(cv.fold_params, cv.fold, cv.z)
    spread = oof_view_spread(cv)
    C = len(ts.classes)
    lst = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float32).ravel()), C)  # noqa: E731
    oof = pa.table({
        "image_id": pa.array(ts.image_ids, pa.string()),
        "split": pa.array(["train"] * len(ts.image_ids), pa.string()),
        "fold": pa.array(cv.fold.astype(np.int32)),
        "label": pa.array([ts.classes[i] for i in ts.y], pa.string()),
        **{f"logits_{h}": lst(cv.z[h]) for h in cv.heads},
        "prob": lst(applied.probs),
        "prediction": pa.array([ts.classes[i] for i in applied.pred], pa.string()),
        "prediction_offsets": pa.array([ts.classes[i] for i in applied.pred_offsets], pa.string()),
        "set": pa.array([[c for c, inside in zip(ts.classes, row) if inside] for row in applied.sets],
                        pa.list_(pa.string())),
        "view_spread": pa.array(spread.astype(np.float32)),
    })
    writing = models          # what is being written, for the message when the disk fills
    swapped = False           # models/ moved aside and the new one renamed in
    try:
        with contextlib.ExitStack() as renames:  # on success, renamed in reverse: calibration, oof, metrics
            metrics_tmp = renames.enter_context(store.atomic_path(run / store.METRICS_FILE))
            oof_tmp = renames.enter_context(store.atomic_path(run / store.OOF_FILE))
            calib_tmp = renames.enter_context(store.atomic_path(run / store.CALIBRATION_FILE))
            for k, fold_models in enumerate(cv.models):
                folder = store.fold_dir(tmp, k)
                writing = store.fold_dir(models, k)
                folder.mkdir(parents=True)
                for member, head in zip(cv.heads, fold_models):
                    slug = members.split_member(member)[0] if multi and multi["encoder_fusion"] == "logits" else None
                    head.save(folder / slug if slug else folder, ts.classes)
            writing = models / store.MODELS_MANIFEST_FILE
            manifest = {
                "key": key, "version": __version__, "encoder": metrics["encoder"],
                "encoder_slug": ts.store_dir.name, "feature_encoder": ts.features.meta.get("encoder"),
                "dim": dim, "classes": ts.classes, "folds": settings.folds, "seed": settings.seed,
                "feature_key": ts.features.meta.get("key"), "settings": settings.model_dump(exclude=set(MULTI_ONLY)),
                "train_crops": ts.train_crops, "scale_fusion": settings.scale_fusion, "scales": ts.scales,
                "heads": cv.heads, "final": final_summary(cv.final),
                "submission_uses": metrics["decision"]["submission_uses"],
                "fusion": FUSION_RULE + "; probabilities averaged over folds",
            }
            if multi:
                manifest.update(multi, settings=settings.model_dump())
            store.write_json({**manifest, "files": store.model_files(tmp)}, tmp / store.MODELS_MANIFEST_FILE)
            writing = run / store.CALIBRATION_FILE
            calib_tmp.write_text(json.dumps({
                "key": key, "classes": ts.classes, "heads": cv.heads, "rule": FUSION_RULE,
                "weight_grid": [round(w, 6) for w in fusion.weight_grid(settings.weight_grid).tolist()],
                "folds": cv.fold_params, "final": cv.final, "fold_training": cv.fold_info},
                indent=2, default=store.json_default) + "\n")
            writing = run / store.OOF_FILE
            pq.write_table(oof.replace_schema_metadata(store.with_meta(oof.schema, {
                "key": key, "classes": ts.classes, "heads": cv.heads, "encoder": metrics["encoder"],
                "seed": settings.seed}).metadata), oof_tmp, compression="zstd")
            writing = run / store.METRICS_FILE
            metrics_tmp.write_text(json.dumps(metrics, indent=2, default=store.json_default) + "\n")
            writing = models
            if models.exists():
                os.replace(models, old)
            os.replace(tmp, models)
            swapped = True
    except BaseException as e:
        # No models/ of this fit may outlive a failure: submit would accept it without metrics.json
        # (a first fit) or beside the previous fit's files. The previous models/ comes back.
        if swapped:
            shutil.rmtree(models, ignore_errors=True)
        if old.exists() and not models.exists():
            os.replace(old, models)
        if isinstance(e, OSError):
            raise write_failed(e, _final_name(e.filename, run, tmp) or writing) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if models.exists():
            shutil.rmtree(old, ignore_errors=True)

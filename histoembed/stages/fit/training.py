"""The training set: one label per training image after QC, and the fold group of each image.

Labels come from ``crops.parquet`` (train split), QC flags and duplicate groups from ``qc.parquet``
(the very table crops used), patients from the crops file's ``group`` column. Images of one patient
or one duplicate group share a fold group, so no fold sees a near-copy of an image it evaluates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from histoembed.core import feature_store, store
from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.inputs import patch_flags
from histoembed.maths import multiscale
from histoembed.models.heads.indexing import first_seen_index


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
    patient: list[str | None] | None = None  # the manifest's group of each image; None when the data has none
    artifacts: patch_flags.LeftOut = field(default_factory=patch_flags.LeftOut)  # flagged slide patches left out
    outcomes: np.ndarray | None = None  # survival [n, 2] time, event / regression [n, 1] target (y: their strata)

    def bootstrap_units(self) -> np.ndarray | None:
        """What every interval resamples: the patient of each image (an image without one is its own), or None
        (images) when the data has no patients."""
        if self.patient is None:
            return None
        return np.array([p if p else f"\0image:{i}" for p, i in zip(self.patient, self.image_ids)], dtype=object)

    def fingerprint(self) -> dict:
        """What the fit depends on besides the features' own key and the settings."""
        out = {"images": self.image_ids, "labels": self.y.tolist(), "groups": self.groups.tolist(),
               "classes": self.classes, "excluded_flagged": self.excluded_flagged,
               "artifacts_left_out": self.artifacts.per_slide}
        return out if self.outcomes is None else {**out, "outcomes": self.outcomes.tolist()}


def read_labels(run: Path) -> dict[str, str]:
    """Training labels by ``split/image_id`` key (see ``store.image_keys``), from ``run/crops.parquet``."""
    path = Path(run) / store.CROPS_FILE
    store.read_table(path, "crops table (the labels)", columns=["label"], hint="run `histoembed crops` first",
                     stage="crops")
    labels = {}
    # A batch at a time: a slide cohort's crops file holds millions of rows, its labels one per image.
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16, columns=["image_id", "split", "label"]):
        for image_id, split, label in zip(*(batch.column(c).to_pylist() for c in ("image_id", "split", "label"))):
            if split == "train" and label is not None and label != "":
                labels[f"{split}/{image_id}"] = label
    if not labels:
        raise UserError("no labelled training images", path=path,
                        hint="the crops stage reads labels from train_labels.csv (or the manifest's label column); "
                             "survival and regression read time and event, or target columns (fit --task)")
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
                      scale_fusion: str = "crops", keep_dtype: bool = False,
                      keep_artifacts: Sequence[str] = (), labels: dict[str, str] | None = None) -> TrainingSet:
    """The training features after QC and the slides' artifact flags (``patch_flags``: flagged patches left
    out unless their flags are in ``keep_artifacts``), with crops of several scales fused as ``scale_fusion`` says.

    ``labels``: the items to fit and a stratum of each (survival and regression: ``stages.fit.outcomes``) in
    place of crops.parquet's classes; the class checks are then left to the caller.
    ``keep_dtype``: a float16 store's embeddings stay float16 (for ``Bags.from_rows``, which converts
    them to float32 exactly as reading would have; nothing else may compute on them).
    """
    run = Path(run)
    store_dir = feature_store.find_feature_store(run, encoder)
    if labels is None:
        read_labels(run)   # a missing or broken crops file, or no label, is said before the store is read
    qc_flags(run)
    features = feature_store.read_features(store_dir, split="train", keep_dtype=keep_dtype)
    if len(features) == 0:
        raise UserError("the feature store has no training rows", path=store_dir,
                        hint="run `histoembed embed` on a run whose crops include the train split")
    feature_store.check_complete(features, run, "train")
    use, left_out = patch_flags.usable_rows(features.image_id, features.crop_index, run, "train", keep_artifacts)
    if not use.all():
        features = features.subset(use)
    features = feature_store.with_scales(features, run)
    crop_scales = multiscale.scales_of(features)
    features = multiscale.fuse_scales(features, scale_fusion, crop_scales)
    ts = select_images(run, store_dir, features, include_flagged, crop_scales, labels=labels)
    ts.artifacts = left_out
    return ts


def select_images(run: Path, store_dir: Path, features: feature_store.Features, include_flagged: bool,
                  crop_scales: list[float], train_crops: str | None = None,
                  labels: dict[str, str] | None = None) -> TrainingSet:
    """The training set of ``features``' rows: unlabelled and QC-flagged images left out, labels and fold groups.

    Only the rows' image keys are read here, so the streamed fit (``streaming``) passes one row per image.
    ``labels``: as for ``load_training_set``."""
    strata = labels is not None
    labels = read_labels(run) if labels is None else labels
    flagged, dup_groups = qc_flags(run)
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
    if not strata:
        check_every_class_left(run, classes, labels, excluded)
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
                       [name(k) for k in excluded], [name(k) for k in unlabelled],
                       train_crops or store.train_crops_digest(run), crop_scales,
                       patient=[patients.get(k) for k in image_keys] if patients else None)


def check_every_class_left(run: Path, classes: list[str], labels: dict[str, str], excluded: list[str]) -> None:
    """Stop when a label of the data has no training image left, or when one class is all there is."""
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


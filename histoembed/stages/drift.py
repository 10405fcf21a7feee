"""Train-versus-test drift: can a classifier tell the test images from the training images?

A cross-validated score promises what the test set gives only when the test images come
from the training images' distribution. The check is a classifier two-sample test: a
fixed, regularised linear classifier (standardise, PCA, logistic regression; nothing is
tuned, so its score is honest) learns "test or train?" from each image's mean clean-view
embedding, and its out-of-fold AUC says how separable the splits are (0.5: not at all),
with a bootstrap interval over images. Beside it, each split's stain statistics (the
haematoxylin and eosin densities of the crops' tissue pixels, Ruifrok-Johnston colour
deconvolution) say whether the difference looks like staining.

Written to ``run/drift.json``, keyed by the feature store and the crops it was computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed import __version__
from histoembed.core import feature_store, store
from histoembed.core.feature_store import bags as slides
from histoembed.core.config import DriftSettings
from histoembed.core.console import noun
from histoembed.core.errors import UserError
from histoembed.inputs.provenance import run_kinds
from histoembed.models.drift import (
    DRIFT_FILE,
    STAINS,
    drift_inputs,
    image_means,
    pca_dims,
    stain_densities,
    standardised_difference,
    two_sample_auc,
    verdict,
)

DRIFT_VERSION = 1
MIN_IMAGES = 5          # per split, below which the test says nothing





# ---------------------------------------------------------------- the stage

@dataclass
class DriftResult:
    report: dict      # the content of drift.json
    skipped: bool     # up to date: nothing computed
    path: Path

    @property
    def shifted(self) -> bool:
        return bool(self.report.get("shifted"))

    @property
    def finding(self) -> str:
        return self.report["finding"]


def _qc_flagged(run: Path) -> set[str]:
    table = store.read_qc(run)
    if table is None:
        return set()
    return {f"{s}/{i}" for i, s, f in zip(*(table[c].to_pylist() for c in ("image_id", "split", "flagged"))) if f}


def _crops_meta(run: Path) -> dict:
    path = run / store.CROPS_FILE
    if not path.exists():
        raise UserError("crops file not found", path=path, hint="run `histoembed crops`")
    return store.check_schema(path, "crops")


def _stain_table(run: Path, keys: np.ndarray, fill, settings: DriftSettings) -> dict[str, np.ndarray]:
    """Per image (in ``keys`` order) the mean haematoxylin and eosin density of its first scale-1 crops
    (context crops show the same tissue again, with more padding). crops.parquet is read a batch at a time and
    only the crops measured become Python objects: a slide cohort's file holds millions of crops (issue 37)."""
    pf = pq.ParquetFile(run / store.CROPS_FILE)   # run_drift checked it (_crops_meta)
    columns = ["image_id", "split", "crop_index", "png"] + (["scale"] if "scale" in pf.schema_arrow.names else [])
    index = {k: i for i, k in enumerate(keys)}
    sums, counts = np.zeros((len(keys), 2)), np.zeros(len(keys))
    for batch in pf.iter_batches(batch_size=1 << 16, columns=columns):
        t = pa.Table.from_batches([batch])
        measured = pc.and_(pc.less(t["crop_index"], settings.stain_crops), pc.greater(pc.binary_length(t["png"]), 0))
        if "scale" in t.column_names:   # a file from before scales holds scale-1 crops only
            measured = pc.and_(measured, pc.equal(t["scale"], 1.0))
        t = t.filter(pc.fill_null(measured, False))
        for image_id, split, png in zip(*(t[c].to_pylist() for c in ("image_id", "split", "png"))):
            i = index.get(f"{split}/{image_id}")
            bgr = None if i is None else cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            hed = None if bgr is None else stain_densities(bgr[..., ::-1], fill)
            if hed is not None:
                sums[i] += hed
                counts[i] += 1
    with np.errstate(invalid="ignore"):
        means = sums / counts[:, None]
    return {stain: means[:, j] for j, stain in enumerate(STAINS)}


def _stain_summary(values: np.ndarray) -> dict:
    q25, median, q75 = np.percentile(values, [25, 50, 75]) if len(values) else (np.nan,) * 3
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "images": int(len(values))}


def _compare_splits(run: Path, keys: np.ndarray, x: np.ndarray, is_test: np.ndarray, crops_meta: dict,
                    settings: DriftSettings, kinds: tuple[int, int]) -> dict:
    auc, lo, hi = two_sample_auc(x, is_test, settings)
    fill = tuple((crops_meta.get("settings") or {}).get("fill", ())) or None
    stain, difference = {"train": {}, "test": {}}, {}
    for name, values in _stain_table(run, keys, fill, settings).items():
        ok = np.isfinite(values)
        train, test = values[ok & ~is_test], values[ok & is_test]
        stain["train"][name], stain["test"][name] = _stain_summary(train), _stain_summary(test)
        difference[name] = standardised_difference(train, test) if min(len(train), len(test)) > 1 else 0.0
    shifted, finding = verdict(auc, lo, hi, difference, noun(*kinds, number="s"))
    dims = pca_dims(len(x) - len(x) // settings.folds, x.shape[1], settings.pca_dims)
    return {"classifier": f"standardise, PCA to {dims} dims, logistic regression (C={settings.c}); out-of-fold "
                          f"scores ({settings.folds} folds, mean over {settings.repeats} shuffles) of each {noun(*kinds)}'s "
                          "mean clean-view embedding",
            "auc": auc, "auc_ci": [lo, hi], "bootstrap": settings.bootstrap, "shifted": shifted,
            "stain": stain, "stain_difference": difference, "finding": finding}


def run_drift(run: Path, settings: DriftSettings, encoder: str | None = None) -> DriftResult:
    """Compare the splits' embeddings and stains (a finding without numbers when a split has too few images)."""
    run = Path(run)
    store_dir = feature_store.find_feature_store(run, encoder)
    crops_meta = _crops_meta(run)
    inputs = drift_inputs(run, store_dir)
    key = store.stage_key("drift", DRIFT_VERSION, settings, inputs)
    path = run / DRIFT_FILE
    if path.exists():
        previous = store.read_json(path, "drift report")
        if previous.get("key") == key:
            return DriftResult(previous, True, path)
    if slides.store_bytes(store_dir) > slides.STREAM_BYTES:   # a cohort's store: slide by slide (issue 37)
        keys, x, meta = slides.image_means(store_dir)
    else:
        features = feature_store.read_features(store_dir)
        (keys, x), meta = image_means(features), features.meta
    flagged = set() if settings.include_flagged else _qc_flagged(run)
    keep = np.array([k not in flagged for k in keys], dtype=bool)
    keys, x = keys[keep], x[keep]
    is_test = np.array([k.startswith("test/") for k in keys])
    counts = {"train": int((~is_test).sum()), "test": int(is_test.sum())}
    kinds = run_kinds(run, list(keys))
    report = {"key": key, "version": __version__, "encoder": meta.get("encoder"), "inputs": inputs,
              "images": counts, "left_out_flagged": int((~keep).sum()), "auc": None, "shifted": False}
    if min(counts.values()) < MIN_IMAGES:
        report["finding"] = (f"No train-versus-test check: it needs at least {MIN_IMAGES} "
                             f"{noun(*kinds, number='s')} of each split "
                             f"in the features ({counts['train']} training, {counts['test']} test).")
    else:
        report.update(_compare_splits(run, keys, x, is_test, crops_meta, settings, kinds))
    store.write_json(report, path)
    return DriftResult(report, False, path)

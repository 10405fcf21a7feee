"""Test-time inference: every fold's calibrated, fused heads on the test split's features.

Labels are the fused argmax, or the argmax with the class offsets when the fit stage chose
them (``--offsets``); ``test_predictions.parquet`` also has each image's conformal set and
view spread.

The submission has one row per test image in the order of the test folder (or of the
manifest), ``sample_index`` the file name exactly as there, labels spelled as in the
training labels. Test images are matched to their features by (split, name): the test
split may reuse the training split's names, as the reference challenge does. The data
folder is the one ``histoembed crops`` recorded in the run unless ``--data`` names
another, and its files must be unchanged since the crops were cut. A test image with no
usable crop (no features) still gets a prediction: the training-class prior, i.e. the
most frequent training class, and it is listed as a fallback.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from histoembed.core import feature_store, store
from histoembed.core.errors import UserError
from histoembed.inputs.provenance import run_data
from histoembed.inputs.dataset import submission_ids
from histoembed.models.inference import check_same_crops, load_ensemble, read_run_features


@dataclass
class SubmitResult:
    submission: Path
    predictions: Path
    n_images: int
    classes: list[str]
    counts: dict[str, int]                                # predicted label -> images
    fallbacks: list[str] = field(default_factory=list)    # test images predicted by the prior
    image_ids: list[str] = field(default_factory=list)    # the test images, in the submission's order


def _class_prior(run: Path, classes: list[str]) -> np.ndarray:
    """Training-class frequencies from the out-of-fold table (uniform if it is missing)."""
    oof = run / store.OOF_FILE
    if not oof.exists():
        return np.full(len(classes), 1.0 / len(classes))
    labels = store.read_table(oof, "out-of-fold predictions", columns=["label"], stage="fit")["label"].to_pylist()
    counts = np.array([labels.count(c) for c in classes], dtype=float)
    return counts / counts.sum() if counts.sum() else np.full(len(classes), 1.0 / len(classes))


def run_submit(data: Path | None, run: Path, encoder: str | None = None, tta: bool = True,
               verify_data: bool = False) -> SubmitResult:
    """Write ``run/submission.csv`` and ``run/test_predictions.parquet``.

    ``data`` None: the data folder the crops were cut from (recorded in the run). ``verify_data``: hash every
    data file again to check it is unchanged (else a file of unchanged size and modification time is trusted).
    """
    run = Path(run)
    ensemble = load_ensemble(run)
    data, _ = run_data(run, None if data is None else Path(data), verify=verify_data)
    ids = submission_ids(data)
    if not ids:
        raise UserError("the data has no test images", path=data)
    features = read_run_features(run, ensemble, "test", tta=tta, encoder=encoder)
    # Several encoders: each store is read once, while predicting (checked for strays below).
    found = set(features.image_id) if isinstance(features, feature_store.Features) else set()
    pred = None
    if isinstance(features, dict):
        pred = ensemble.predict(features)
        found = set(pred.image_ids)
    unknown = sorted(found - set(ids))   # every feature row here is of the test split
    if unknown:
        raise UserError(f"{len(unknown)} test image(s) in the features are not in the data "
                        f"(e.g. {unknown[0]})", path=run / store.FEATURES_DIR if ensemble.encoders else
                        feature_store.find_feature_store(run, encoder or ensemble.encoder),
                        hint="the features were embedded from another data folder; re-run crops and embed")
    if ensemble.outcome:
        check_same_crops(run, ensemble)
        return _submit_outcome(run, ensemble, ids, pred if pred is not None or not len(features)
                               else ensemble.predict(features), tta)
    prior = _class_prior(run, ensemble.classes)
    C = len(ensemble.classes)
    probs = np.tile(prior, (len(ids), 1))
    decided = probs.argmax(axis=1)
    sets = np.ones((len(ids), C), dtype=bool)         # no features: every class is possible
    spread = np.full(len(ids), np.nan, dtype=np.float32)
    have = np.zeros(len(ids), dtype=bool)
    if pred is None and len(features):
        pred = ensemble.predict(features)
    if pred is not None and len(pred.image_ids):
        row_of = {("test", image_id): i for i, image_id in enumerate(ids)}
        rows = np.array([row_of[k] for k in pred.keys()])
        probs[rows], decided[rows], sets[rows], spread[rows] = pred.probs, pred.pred, pred.sets, pred.view_spread
        have[rows] = True
    check_same_crops(run, ensemble)  # after the features' own checks (dimension, encoder), which say more
    labels = [ensemble.classes[k] for k in decided]
    fallbacks = [i for i, ok in zip(ids, have) if not ok]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sample_index", "label"])
    writer.writerows(zip(ids, labels))
    submission = run / store.SUBMISSION_FILE
    with store.atomic_path(submission) as tmp:
        tmp.write_text(buf.getvalue())

    columns = {"image_id": ids, "split": ["test"] * len(ids), "label": labels, "fallback": (~have).tolist()}
    columns.update({f"prob_{c}": probs[:, k].astype(np.float32) for k, c in enumerate(ensemble.classes)})
    columns["set"] = pa.array([[c for c, inside in zip(ensemble.classes, row) if inside] for row in sets],
                              pa.list_(pa.string()))
    columns["view_spread"] = pa.array(spread)
    predictions = run / store.TEST_PREDICTIONS_FILE
    store.write_table(pa.table(columns), predictions,
                      meta={"classes": ensemble.classes, "encoder": ensemble.encoder, "tta": tta,
                            "decision": "argmax with class offsets" if ensemble.use_offsets else "argmax",
                            "alpha": ensemble.manifest.get("settings", {}).get("alpha"),
                            "set": "split-conformal prediction set at 1 - alpha (all classes for a fallback)",
                            "view_spread": "mean total-variation distance of the views' fused probabilities "
                                           "from their mean (NaN for a fallback)",
                            "fallback": "training-class prior (most frequent class)"})
    counts = {c: labels.count(c) for c in ensemble.classes}
    return SubmitResult(submission, predictions, len(ids), ensemble.classes, counts, fallbacks, list(ids))


def _submit_outcome(run: Path, ensemble, ids: list[str], pred, tta: bool) -> SubmitResult:
    """Survival or regression: ``sample_index,risk`` or ``sample_index,prediction``; an item without features
    gets the out-of-fold median (``fallback``); regression adds the conformal interval of ``fit``."""
    name = ensemble.classes[0]                       # "risk" or "prediction"
    oof = store.read_table(run / store.OOF_FILE, "out-of-fold predictions", columns=[name], stage="fit")
    value = np.full(len(ids), float(np.median(oof[name].to_numpy())))
    have = np.zeros(len(ids), dtype=bool)
    if pred is not None and len(pred.image_ids):
        row_of = {("test", image_id): i for i, image_id in enumerate(ids)}
        rows = np.array([row_of[k] for k in pred.keys()])
        value[rows], have[rows] = pred.value, True
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sample_index", name])
    writer.writerows((i, f"{v:.6g}") for i, v in zip(ids, value))
    submission = run / store.SUBMISSION_FILE
    with store.atomic_path(submission) as tmp:
        tmp.write_text(buf.getvalue())
    columns = {"image_id": ids, "split": ["test"] * len(ids), name: value, "fallback": (~have).tolist()}
    half = ensemble.final.get("conformal_half_width")
    if ensemble.task == "regression":
        columns["interval_low"] = value - (np.inf if half is None else half)
        columns["interval_high"] = value + (np.inf if half is None else half)
    predictions = run / store.TEST_PREDICTIONS_FILE
    store.write_table(pa.table(columns), predictions,
                      meta={"task": ensemble.task, "encoder": ensemble.encoder, "tta": tta,
                            name: "higher = earlier event (standardised, fused over heads, averaged over folds)"
                            if ensemble.task == "survival" else "fused over heads, averaged over folds",
                            "fallback": "the out-of-fold median"})
    return SubmitResult(submission, predictions, len(ids), ensemble.classes, {name: int(have.sum())},
                        [i for i, ok in zip(ids, have) if not ok], list(ids))

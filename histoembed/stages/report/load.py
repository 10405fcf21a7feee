"""The run as the report reads it, loaded once: what the stages left under ``run/``, each part or a note on why not.

A part that is missing stays ``None`` and its section says so; a part that cannot be read adds a note (listed
under "Run") instead of failing, so the report can be written after any stage. Only data that changed since
the crops were cut stops the report (:class:`DataChanged`): a page of crops drawn on other images would mislead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from histoembed.core import feature_store, store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import load_dataset
from histoembed.inputs.provenance import DataChanged, crops_summary, run_data
from histoembed.models.inference import Ensemble, check_one_set, load_ensemble


@dataclass
class OutOfFold:
    """``fit``'s out-of-fold predictions (``oof.parquet``) as arrays; rows: training images."""

    image_id: np.ndarray
    fold: np.ndarray
    y: np.ndarray                 # true class index
    classes: list[str]
    logits: dict[str, np.ndarray]  # head -> [N, C] raw logits, in fusion order
    prob: np.ndarray | None       # fused, calibrated
    pred: np.ndarray              # class index (plain argmax)
    pred_offsets: np.ndarray | None = None   # class index with the class offsets
    sets: list[list[str]] | None = None      # conformal sets
    view_spread: np.ndarray | None = None
    groups: np.ndarray | None = None          # patient of each image (an image without one is its own), or None


@dataclass
class LoadedRun:
    """Everything the report draws from: the run folder's tables and JSON files, the data folder, and (on first
    use) the fitted models and the features they read."""

    folder: Path
    data: Path | None
    notes: list[str] = field(default_factory=list)   # problems reading the run, listed under "Run"
    crops = None            # pandas DataFrame of crops.parquet without the png column, or None
    qc = None               # pandas DataFrame of qc.parquet, or None
    oof: OutOfFold | None = None
    metrics: dict | None = None
    calibration: dict | None = None
    dataset = None          # inputs.dataset.Dataset, or None
    skipped: list[tuple[str, str]] | None = None   # (path, why) of every item `crops` skipped; None: no record
    left_out: list[str] = field(default_factory=list)  # training images `crops` left out because QC flagged them
    fallbacks: list[str] | None = None  # test images `submit` gave the class prior (no crop); None: no submit
    classes: list[str] = field(default_factory=list)
    _loaded: dict = field(default_factory=dict)      # what the sections share, read once: a value or its UserError

    def samples(self) -> dict:
        """{"split/image_id": sample} of the data folder ({} without one)."""
        return {f"{s.split}/{s.image_id}": s for s in self.dataset.samples} if self.dataset is not None else {}

    def slide_keys(self) -> set[str]:
        """``split/image_id`` of the whole slides in the crops table (their patches are coordinates, not pixels)."""
        if self.crops is None or "source" not in self.crops.columns:
            return set()
        return set(self.crops.loc[self.crops["source"].notna(), "key"])

    def pick_images(self, ids_with_crops: list[str], n: int) -> list[str]:
        """A few images (``split/image_id`` keys), one per class first (train), then the others, in a stable order."""
        if self.crops is None:
            return []
        first = self.crops.drop_duplicates("key").set_index("key")
        chosen: list[str] = []
        for c in self.classes:
            hit = [i for i in ids_with_crops if first.loc[i, "label"] == c]
            if hit:
                chosen.append(hit[0])
        chosen += [i for i in ids_with_crops if i not in chosen]
        return chosen[:n]

    def fold_ensemble(self) -> Ensemble:
        """The fitted models of ``run/models`` (read once; raises the same UserError each time they cannot be)."""
        return self._once("ensemble", lambda: load_ensemble(self.folder))

    def features(self, encoder: str) -> feature_store.Features:
        """Every split and view of ``encoder``'s feature store in the run (read once)."""
        return self._once(("features", encoder),
                          lambda: feature_store.read_features(feature_store.find_feature_store(self.folder, encoder)))

    def _once(self, key, read):
        if key not in self._loaded:
            try:
                self._loaded[key] = read()
            except UserError as e:
                self._loaded[key] = e
        value = self._loaded[key]
        if isinstance(value, UserError):
            raise value
        return value


def _list_column(table, name) -> np.ndarray | None:
    """A fixed-size-list column of oof.parquet as [N, C] float64, or None when it is absent."""
    return store.embedding_matrix(table[name]).astype(np.float64) if name in table.column_names else None


def read_out_of_fold(path: Path) -> OutOfFold:
    """``oof.parquet`` as arrays, classes in the order ``fit`` recorded."""
    table = store.read_table(path, "out-of-fold predictions", hint="run `histoembed fit` first", stage="fit")
    meta = store.read_meta(path)
    labels = table["label"].to_pylist()
    classes = list(meta.get("classes") or sorted(set(labels)))
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[c] for c in labels], dtype=np.int64)

    def classes_of(name):
        return np.array([index.get(p, -1) for p in table[name].to_pylist()], dtype=np.int64) \
            if name in table.column_names else None

    heads = meta.get("heads") or [c[len("logits_"):] for c in table.column_names if c.startswith("logits_")]
    return OutOfFold(image_id=np.array(table["image_id"].to_pylist(), dtype=object),
                     fold=table["fold"].to_numpy().astype(np.int64), y=y, classes=classes,
                     logits={h: _list_column(table, f"logits_{h}") for h in heads
                             if f"logits_{h}" in table.column_names},
                     prob=_list_column(table, "prob"), pred=classes_of("prediction"),
                     pred_offsets=classes_of("prediction_offsets"),
                     sets=table["set"].to_pylist() if "set" in table.column_names else None,
                     view_spread=table["view_spread"].to_numpy() if "view_spread" in table.column_names else None,
                     groups=_patients(table))


def _patients(table) -> np.ndarray | None:
    """oof.parquet's ``group`` column as resampling units, None when no image has a patient."""
    if "group" not in table.column_names:
        return None
    groups = table["group"].to_pylist()
    if not any(groups):
        return None
    return np.array([g if g else f"\0image:{i}" for g, i in zip(groups, table["image_id"].to_pylist())], dtype=object)


def _read_crops(run: LoadedRun, crops_path: Path) -> None:
    """crops.parquet without the crops' pixels, with each crop's scale and a ``key`` (names repeat across splits)."""
    cols = [c for c in store.CROPS_SCHEMA.names if c != "png" and c != "scale"]
    try:
        names = pq.read_schema(crops_path).names
    except (OSError, ValueError):  # the reader below says why
        names = []
    cols += [name for name, _ in store.SLIDE_FIELDS if name in names]
    try:
        run.crops = crops = store.read_table(crops_path, "crops table", columns=cols, stage="crops").to_pandas()
        scales = store.crop_scales(run.folder)  # a file from before scales holds scale-1 crops only
        crops["scale"] = [scales[k] for k in zip(crops["split"], crops["image_id"], crops["crop_index"])]
        crops["key"] = crops["split"] + "/" + crops["image_id"]
    except UserError as e:
        run.notes.append(str(e))


def _read_skipped(run: LoadedRun, crops_path: Path) -> None:
    """What ``crops`` skipped (its file's footer) and the test rows ``submit`` filled with the class prior."""
    summary = crops_summary(crops_path) if crops_path.exists() else {}
    if "problems" in summary:
        run.skipped = [(str(p), str(why)) for p, why in summary["problems"]]
        run.left_out = list(summary.get("left_out") or [])
    predictions = run.folder / store.TEST_PREDICTIONS_FILE
    if predictions.exists():
        try:
            t = store.read_table(predictions, "test predictions", columns=["image_id", "fallback"], stage="submit")
            run.fallbacks = [i for i, f in zip(t["image_id"].to_pylist(), t["fallback"].to_pylist()) if f]
        except (UserError, KeyError) as e:
            run.notes.append(f"{predictions}: cannot be used ({e})")


def _read_fit_outputs(run: LoadedRun) -> None:
    """metrics.json, calibration.json and oof.parquet, refusing models of one fit beside outputs of another."""
    folder = run.folder
    manifest = folder / store.MODELS_DIR / store.MODELS_MANIFEST_FILE
    if manifest.exists():  # never draw models of one fit beside metrics of another
        check_one_set(folder, store.read_json(manifest, "fitted-models manifest").get("key"))
    for name, attr in ((store.METRICS_FILE, "metrics"), (store.CALIBRATION_FILE, "calibration")):
        if (folder / name).exists():
            try:
                setattr(run, attr, store.read_json(folder / name, name))
            except UserError as e:
                run.notes.append(str(e))
    if (folder / store.OOF_FILE).exists():
        try:
            run.oof = read_out_of_fold(folder / store.OOF_FILE)
        except (UserError, KeyError) as e:
            run.notes.append(f"{folder / store.OOF_FILE}: cannot be used ({e})")


def _read_data(run: LoadedRun, data: Path | None, verify_data: bool) -> None:
    """The data folder the crops were cut from (or ``data``), if it is unchanged; else ``data`` as given."""
    if (run.folder / store.CROPS_FILE).exists():
        try:
            run.data, run.dataset = run_data(run.folder, data, verify=verify_data)
        except DataChanged:
            raise  # crops, features and models describe other images: a page of them would mislead
        except UserError as e:
            run.notes.append(str(e))
    if data is not None and run.dataset is None:
        try:
            run.dataset = load_dataset(data, check_sizes=False)
        except UserError as e:
            run.notes.append(str(e))


def load_run(folder: Path, data: Path | None, verify_data: bool = False) -> LoadedRun:
    """Read what the stages left in ``folder`` (see the module docstring)."""
    run = LoadedRun(folder=folder, data=data)
    crops_path = folder / store.CROPS_FILE
    if crops_path.exists():
        _read_crops(run, crops_path)
    qc_path = folder / store.QC_FILE
    if qc_path.exists():
        try:
            run.qc = store.read_table(qc_path, "QC table", stage="qc").to_pandas()
        except UserError as e:
            run.notes.append(str(e))
    _read_skipped(run, crops_path)
    _read_fit_outputs(run)
    _read_data(run, data, verify_data)
    if run.oof is not None:
        run.classes = run.oof.classes
    elif run.dataset is not None:
        run.classes = run.dataset.classes
    elif run.crops is not None:
        run.classes = sorted(run.crops["label"].dropna().unique())
    return run

"""Parquet schemas, readers and atomic writers: the contracts between stages.

Every file a stage writes goes to a temporary name in the same folder and is renamed
into place only when complete, so a crash or Ctrl-C never leaves a file that a later
stage would read as whole. Each Parquet file carries, in its schema metadata under
``histoembed``, a JSON object with at least ``key`` (a hash of the inputs and settings
that produced it), ``version`` and ``schema``.

Every table identifies an image by ``(split, image_id)``: the reference challenge numbers
both splits from ``img_0000.png``, so a name alone is ambiguous. Files written before that
(``schema`` 1 or missing) are refused where they are read, never joined by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed import __version__
from histoembed.errors import UserError

META_KEY = b"histoembed"
SCHEMA = 2  # 2: images keyed by (split, image_id) everywhere; bump when a table's meaning changes

# Default file names under the run folder.
CROPS_FILE = "crops.parquet"
QC_FILE = "qc.parquet"
FEATURES_DIR = "features"
MODELS_DIR = "models"
MODELS_MANIFEST_FILE = "manifest.json"   # under MODELS_DIR, beside fold-XX/
OOF_FILE = "oof.parquet"
METRICS_FILE = "metrics.json"
CALIBRATION_FILE = "calibration.json"
SUBMISSION_FILE = "submission.csv"
TEST_PREDICTIONS_FILE = "test_predictions.parquet"
REPORT_FILE = "report.html"


def fold_dir(models: str | Path, k: int) -> Path:
    """One fold's model folder under ``models/``."""
    return Path(models) / f"fold-{k:02d}"


# ---------------------------------------------------------------- atomic writing

@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path, what: str = "file", hint: str | None = None):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found", path=path, hint=hint)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON ({e})", path=path, hint=hint) from None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def config_key(*parts) -> str:
    """A short, stable hash of JSON-able inputs and settings (for skip-if-unchanged)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- Parquet helpers

def with_meta(schema: pa.Schema, meta: dict) -> pa.Schema:
    meta = {"version": __version__, "schema": SCHEMA, **meta}
    return schema.with_metadata({META_KEY: json.dumps(meta, default=_json_default).encode()})


def read_meta(path: str | Path) -> dict:
    """The ``histoembed`` metadata of a Parquet file, or {} if it has none or cannot be read."""
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return {}
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


def check_schema(path: str | Path, stage: str, meta: dict | None = None) -> dict:
    """The file's metadata, or a clear stop when an older histoembed wrote it (re-run ``stage``)."""
    meta = read_meta(path) if meta is None else meta
    found = meta.get("schema", 1)
    if found != SCHEMA:
        why = ("it identifies images by name alone, which is ambiguous when train_data/ and test_data/ "
               "share names" if found < SCHEMA else "it was written by a newer histoembed")
        raise UserError(f"{Path(path).name} has file schema {found}, this histoembed reads schema {SCHEMA}: {why}",
                        path=path, hint=f"re-run `histoembed {stage}`")
    return meta


def write_table(table: pa.Table, path: str | Path, meta: dict, **kwargs) -> None:
    """Write ``table`` atomically with ``meta`` in its schema metadata."""
    table = table.replace_schema_metadata(with_meta(table.schema, meta).metadata)
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def read_table(path: str | Path, what: str, hint: str | None = None, columns=None,
               stage: str | None = None) -> pa.Table:
    """Read a whole Parquet file; with ``stage``, refuse one of an older schema (see :func:`check_schema`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found", path=path, hint=hint)
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"{what} cannot be read ({e})", path=path,
                        hint="delete it and re-run the stage that writes it") from None
    if stage is not None:
        check_schema(path, stage)
    return table


# ---------------------------------------------------------------- crops.parquet

CROPS_SCHEMA = pa.schema([
    ("image_id", pa.string()),        # the sample_index, e.g. img_0000.png (unique within its split)
    ("split", pa.string()),           # train / test: (split, image_id) identifies the image
    ("label", pa.string()),           # null for test
    ("crop_index", pa.int32()),       # 0.. within the image
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),  # box in source px
    ("tissue_fraction", pa.float32()),  # fraction of the box inside the mask
    ("strategy", pa.string()),        # the strategy that cut it (grid-fallback for fallbacks)
    ("png", pa.binary()),             # the square crop, RGB PNG
])


# ---------------------------------------------------------------- qc.parquet

QC_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("flagged", pa.bool_()),          # any flag set
    ("non_tissue", pa.bool_()),
    ("ink", pa.bool_()),
    ("blank", pa.bool_()),
    ("outlier", pa.bool_()),          # embedding kNN outlier (null when no embedding pass ran)
    ("duplicate_group", pa.int32()),  # near-duplicates within one split share a group; null when none
    ("mask_twin", pa.list_(pa.string())),  # training images whose mask file is byte-identical to this one's
    ("near_train", pa.string()),      # test rows: the training image this one nearly duplicates (leakage); null
    ("near_train_hash_distance", pa.int32()),  # perceptual-hash Hamming distance to near_train (of 256 bits)
    ("near_train_cosine", pa.float32()),       # centred embedding cosine to near_train (null without embeddings)
    ("reason", pa.string()),          # the flags and scores in words
    # followed by float score columns: green_fraction, brown_fraction, yellow_fraction,
    # ink_fraction, tissue_fraction, mask_fraction, tissue_in_mask, knn_z, ...
])


def read_qc(run: str | Path) -> pa.Table | None:
    """``run/qc.parquet``, or None when QC has not been run."""
    path = Path(run) / QC_FILE
    if not path.exists():
        return None
    return read_table(path, "QC table", hint="re-run `histoembed qc`", stage="qc")


# ---------------------------------------------------------------- features/<encoder>/

FEATURE_COLUMNS = ("image_id", "split", "crop_index", "view", "embedding")


def feature_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("crop_index", pa.int32()),
        ("view", pa.int16()),
        ("embedding", pa.list_(value, dim)),
    ])


def encoder_slug(encoder: str) -> str:
    """A folder name for an encoder id or path: ``owkin/phikon-v2`` -> ``owkin--phikon-v2``."""
    name = str(encoder).rstrip("/")
    if os.sep in name and Path(name).exists():
        name = Path(name).name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("/", "--"))


@dataclass
class Features:
    """All embeddings of a feature store, one row per (image, crop, view)."""

    image_id: np.ndarray    # object array of str
    split: np.ndarray       # object array of str
    crop_index: np.ndarray  # int32
    view: np.ndarray        # int16
    embedding: np.ndarray   # float32 [N, D]
    meta: dict              # the store's metadata (encoder, dim, pool, augment, seed, ...)

    def __len__(self) -> int:
        return len(self.image_id)

    def subset(self, mask: np.ndarray) -> Features:
        return Features(self.image_id[mask], self.split[mask], self.crop_index[mask],
                        self.view[mask], self.embedding[mask], self.meta)

    def keys(self) -> np.ndarray:
        """Each row's image as one string ``split/image_id`` (object array), for grouping and joins."""
        return image_keys(self.split, self.image_id)


def image_keys(split, image_id) -> np.ndarray:
    """``split/image_id`` strings: one value per image even when names repeat across splits.

    The split never holds a ``/``, so the key splits back at its first one.
    """
    split = np.asarray(split, dtype=object)
    image_id = np.asarray(image_id, dtype=object)
    return np.asarray([f"{s}/{i}" for s, i in zip(split, image_id)], dtype=object)


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as an [N, D] float32 array, without per-row Python work."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim).astype(np.float32, copy=False)


def feature_parts(store_dir: str | Path) -> list[Path]:
    """The complete part files of a store (temporaries are never listed)."""
    return sorted(p for p in Path(store_dir).glob("part-*.parquet"))


def read_features(store_dir: str | Path, split: str | None = None) -> Features:
    """Read every part of ``run/features/<encoder>/`` (all shards) as one table."""
    store_dir = Path(store_dir)
    parts = feature_parts(store_dir)
    if not parts:
        raise UserError("no feature parts found", path=store_dir,
                        hint="run `histoembed embed` first")
    metas = [read_meta(p) for p in parts]
    for p, m in zip(parts, metas):
        check_schema(p, "embed", m)
    keys = {m.get("key") for m in metas}
    if len(keys) != 1:
        raise UserError("feature parts were written with different settings", path=store_dir,
                        hint="re-run `histoembed embed`; it removes parts of old settings")
    try:
        table = pa.concat_tables(pq.read_table(p) for p in parts)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"feature store cannot be read ({e})", path=store_dir,
                        hint="delete the folder and re-run `histoembed embed`") from None
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return Features(
        image_id=table["image_id"].to_numpy(zero_copy_only=False),
        split=table["split"].to_numpy(zero_copy_only=False),
        crop_index=table["crop_index"].to_numpy(),
        view=table["view"].to_numpy(),
        embedding=embedding_matrix(table["embedding"]),
        meta=metas[0],
    )


def find_feature_store(run_dir: str | Path, encoder: str | None = None) -> Path:
    """The one feature store under ``run/features`` (or the one named by ``encoder``)."""
    root = Path(run_dir) / FEATURES_DIR
    stores = sorted(d for d in root.glob("*") if d.is_dir() and feature_parts(d)) if root.exists() else []
    if encoder is not None:
        slug = encoder_slug(encoder)
        match = [d for d in stores if d.name == slug]
        if not match:
            names = ", ".join(d.name for d in stores) or "none"
            raise UserError(f"no feature store for encoder {encoder!r} (found: {names})", path=root,
                            hint=f"run `histoembed embed --encoder {encoder}` first")
        return match[0]
    if not stores:
        raise UserError("no feature store found", path=root, hint="run `histoembed embed` first")
    if len(stores) > 1:
        names = ", ".join(d.name for d in stores)
        raise UserError(f"several feature stores ({names})", path=root,
                        hint="choose one with --encoder")
    return stores[0]

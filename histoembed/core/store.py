"""The run folder's files: names, atomic writers, JSON, keys and stamps, Parquet helpers, the crops and QC tables.

Every file a stage writes goes to a temporary name in the same folder and is renamed
into place only when complete, so a crash or Ctrl-C never leaves a file that a later
stage would read as whole. Each Parquet file carries, in its schema metadata under
``histoembed``, a JSON object with at least ``key`` (a hash of the inputs and settings
that produced it), ``version`` and ``schema``.

Every table identifies an image by ``(split, image_id)``: the reference challenge numbers
both splits from ``img_0000.png``, so a name alone is ambiguous. Files written before that
(``schema`` 1 or missing) are refused where they are read, never joined by name.

The feature store (``run/features/<encoder>/``) has its own module, :mod:`histoembed.core.feature_store`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from histoembed import __version__
from histoembed.core.config import output_settings
from histoembed.core.errors import UserError

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


def model_files(models: Path) -> dict[str, str]:
    """sha256 of every file in the fold folders, by path relative to ``models`` (fit records them)."""
    return {str(f.relative_to(models)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(models).glob("fold-*/**/*")) if f.is_file()}


def damaged_model_files(models: Path, manifest: dict) -> list[str]:
    """Model files missing or different from what fit wrote (truncated, corrupt, replaced)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict):
        return [MODELS_MANIFEST_FILE]
    found = model_files(models)
    return sorted(name for name, digest in recorded.items() if found.get(name) != digest)


# ---------------------------------------------------------------- atomic writing

def pid_alive(pid: int) -> bool:
    """Whether another process with this id runs (our own id counts as gone: a leftover of ours is stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove the ``pattern`` temporaries (named ``...-PID``) whose process is gone; return them."""
    removed = []
    for p in Path(folder).glob(pattern):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only on success.

    Temporaries of ``path`` left by killed runs are removed first, so they never pile up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{glob.escape(path.name)}.tmp-*")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def read_json(path: str | Path, what: str = "file", hint: str | None = None):
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found", path=path, hint=hint)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON ({e})", path=path, hint=hint) from None


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def config_key(*parts) -> str:
    """A short, stable hash of JSON-able inputs and settings (for skip-if-unchanged)."""
    blob = json.dumps(parts, sort_keys=True, default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_key(stage: str, version: int, settings: BaseModel | None, *inputs) -> str:
    """Every stage's skip-if-unchanged key: its inputs' stamps and the settings that change its output.

    ``settings`` fields marked ``NO_OUTPUT_CHANGE`` in config.py (workers, batch size, device,
    rows per part, threads) are left out; ``version`` is bumped when the stage's output changes
    meaning.
    """
    return config_key(stage, version, output_settings(settings) if settings is not None else None, *inputs)


SAMPLED_STAMP_BYTES = 256 * 2**20  # files larger than this (whole slides) are stamped by samples of their bytes
SAMPLE_BLOCK = 2**20                # the first and last MiB, and 16 blocks of 64 KiB evenly between


def sampled_digest(path: Path, size: int) -> str:
    """``sampled-`` + sha256 of the size, the first and last MiB and 16 evenly spaced 64 KiB blocks.

    A 2 GB slide's full sha256 takes seconds; a cohort's, an hour. A re-scan, re-export or truncation changes
    the size, the header (first MiB) or the tile directory TIFF writers put at the end: all caught. An in-place
    edit of tile bytes that keeps the size is caught only when it touches a sampled block.
    """
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        offsets = [0, max(0, size - SAMPLE_BLOCK)]
        offsets += [int(size * (i + 1) / 17) for i in range(16)]
        for i, off in enumerate(offsets):
            f.seek(off)
            h.update(f.read(SAMPLE_BLOCK if i < 2 else 2**16))
    return "sampled-" + h.hexdigest()


class ContentStamps:
    """Files stamped by their content (sha256), so ``touch`` or a copy changes no key.

    Files over ``SAMPLED_STAMP_BYTES`` (whole slides) are stamped by samples of their bytes
    (``sampled_digest``), so stamping a cohort of slides reads a few MiB per slide, not terabytes.

    ``cache`` is the ``used`` of the previous run, kept in its output's metadata: a file whose
    size and modification time are unchanged is not read again.
    """

    def __init__(self, cache: dict | None = None):
        self.cache: dict[str, list] = cache if isinstance(cache, dict) else {}
        self.used: dict[str, list] = {}

    def __call__(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        path = Path(path).resolve()
        st = path.stat()
        name = str(path)
        hit = self.cache.get(name)
        if hit and hit[:2] == [st.st_size, st.st_mtime_ns]:
            digest = hit[2]
        elif st.st_size > SAMPLED_STAMP_BYTES:
            digest = sampled_digest(path, st.st_size)
        else:
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.used[name] = [st.st_size, st.st_mtime_ns, digest]
        return digest


# ---------------------------------------------------------------- Parquet helpers

def with_meta(schema: pa.Schema, meta: dict) -> pa.Schema:
    meta = {"version": __version__, "schema": SCHEMA, **meta}
    return schema.with_metadata({META_KEY: json.dumps(meta, default=json_default).encode()})


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
    ("crop_index", pa.int32()),       # 0.. within the image, unique across scales (see crops.py)
    ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),  # box in source px
    ("tissue_fraction", pa.float32()),  # fraction of the box inside the mask
    ("strategy", pa.string()),        # the strategy that cut it (grid-fallback for fallbacks)
    ("scale", pa.float32()),          # 1: the crop as cut; 2: its square grown twice about its centre (context)
    ("png", pa.binary()),             # the square crop, RGB PNG (null for a whole slide's patch)
])

# Columns a crops file has when its data holds whole slides (after CROPS_SCHEMA's): a slide's patch is stored as
# coordinates, its pixels read from the slide when embedded. Null on the rows of flat images.
SLIDE_FIELDS = [
    ("level", pa.int32()),            # pyramid level the patch is read from (x0..y1 stay in level-0 pixels)
    ("mpp", pa.float32()),            # microns per pixel of the patch as embedded (size x size pixels)
    ("source", pa.string()),          # the slide's absolute path (a file system every worker sees)
    ("patch_digest", pa.string()),    # digest of (slide content, level, box, size, mpp): the patch's identity
    ("flags", pa.list_(pa.string())),  # artifact flags (background, ink, fold, blur; empty: usable); null unscored
    ("sharpness", pa.float32()),      # the scores behind them (inputs/artifacts.py): Laplacian variance in tissue,
    ("ink_fraction", pa.float32()),   # share of the patch that is pen ink,
    ("fold_fraction", pa.float32()),  # share of its tissue that is doubled (a fold),
    ("background_fraction", pa.float32()),  # share that is unstained
]
GROUP_FIELD = ("group", pa.string())  # patient id from the manifest's group column (a data with groups only)


def crops_schema(slides: bool, groups: bool) -> pa.Schema:
    """CROPS_SCHEMA, with the slide columns when the data has slides and ``group`` when it has groups."""
    schema = CROPS_SCHEMA
    for name, type_ in (SLIDE_FIELDS if slides else []) + ([GROUP_FIELD] if groups else []):
        schema = schema.append(pa.field(name, type_))
    return schema


def _columns(path: Path) -> list[str]:
    """The column names of a Parquet file (the key columns when it cannot be read: the reader then says why)."""
    try:
        return pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid):
        return ["split", "image_id", "crop_index"]


def crop_scales(run: str | Path) -> dict[tuple[str, str, int], float]:
    """The scale of every crop in ``run/crops.parquet`` by (split, image_id, crop_index).

    A crops file written before scales existed has no ``scale`` column; all its crops were cut
    exactly as scale-1 crops are today, so they read as scale 1 (no re-run needed).
    """
    path = Path(run) / CROPS_FILE
    t = read_table(path, "crops file", hint="run `histoembed crops` first", stage="crops",
                   columns=[c for c in ("split", "image_id", "crop_index", "scale") if c in _columns(path)])
    scale = t["scale"].to_pylist() if "scale" in t.column_names else [1.0] * t.num_rows
    return {(s, i, c): float(x) for s, i, c, x in zip(t["split"].to_pylist(), t["image_id"].to_pylist(),
                                                      t["crop_index"].to_pylist(), scale)}


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


# ---------------------------------------------------------------- crops' digests and image keys

def train_crops_digest(run: str | Path) -> str:
    """The digest of every training crop's pixels in ``run/crops.parquet``, in the store's order."""
    path = Path(run) / CROPS_FILE
    index = read_table(path, "crops file", columns=["image_id", "split", "crop_index"], hint="run `histoembed crops`",
                       stage="crops")
    rows = sorted((i, c, h) for i, c, h, s in zip(index["image_id"].to_pylist(), index["crop_index"].to_pylist(),
                                                    crop_hashes(path), index["split"].to_pylist()) if s == "train")
    return config_key([h for _, _, h in rows])


def crop_digest(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()[:16]


def crop_hashes(crops_path: str | Path) -> list[str]:
    """The digest of every crop's PNG in ``crops.parquet``, in row order (read one row group at a time)."""
    try:
        pf = pq.ParquetFile(crops_path)
        if "patch_digest" not in pf.schema_arrow.names:
            return [crop_digest(png) for g in range(pf.num_row_groups)
                    for png in pf.read_row_group(g, columns=["png"])["png"].to_pylist()]
        out = []
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["png", "patch_digest"])
            out += [crop_digest(png) if png is not None else d
                    for png, d in zip(t["png"].to_pylist(), t["patch_digest"].to_pylist())]
        return out
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"crops file cannot be read ({e})", path=crops_path,
                        hint="delete it and re-run `histoembed crops`") from None


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

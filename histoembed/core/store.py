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
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


# ---------------------------------------------------------------- features/<encoder>/

FEATURE_COLUMNS = ("image_id", "split", "crop_index", "view", "embedding")
CROP_HASH = "crop_hash"  # optional column: the digest of the crop's PNG, so changed crops are found one by one


def feature_schema(dim: int, dtype: str = "float32", crop_hash: bool = False) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("crop_index", pa.int32()),
        ("view", pa.int16()),
        ("embedding", pa.list_(value, dim)),
        *([(CROP_HASH, pa.string())] if crop_hash else []),
    ])


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


def encoder_list(text: str) -> list[str]:
    """The encoders of a comma list, in order, each once; two that would share a store folder are refused."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    slugs: dict[str, str] = {}
    for n in names:
        other = slugs.setdefault(encoder_slug(n), n)
        if other != n:
            raise UserError(f"encoders {other!r} and {n!r} share the same store "
                            f"(run/{FEATURES_DIR}/{encoder_slug(n)})", hint="give each encoder once")
    return names


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
    crop_hash: np.ndarray | None = None  # digest of each row's crop PNG, where the store has it
    scale: np.ndarray | None = None      # float32 scale of each row's crop, once :func:`with_scales` added it

    def __len__(self) -> int:
        return len(self.image_id)

    def subset(self, mask: np.ndarray) -> Features:
        return Features(self.image_id[mask], self.split[mask], self.crop_index[mask],
                        self.view[mask], self.embedding[mask], self.meta,
                        None if self.crop_hash is None else self.crop_hash[mask],
                        None if self.scale is None else self.scale[mask])

    def keys(self) -> np.ndarray:
        """Each row's image as one string ``split/image_id`` (object array), for grouping and joins."""
        return image_keys(self.split, self.image_id)


def with_scales(features: Features, run: str | Path) -> Features:
    """``features`` with each row's crop scale from ``run/crops.parquet`` (the store itself holds crops by index)."""
    scales = crop_scales(run)
    try:
        scale = np.array([scales[(s, i, int(c))] for s, i, c in zip(features.split, features.image_id,
                                                                     features.crop_index)], dtype=np.float32)
    except KeyError as e:
        raise UserError(f"the features hold a crop that {CROPS_FILE} does not ({e.args[0]})",
                        path=Path(run) / CROPS_FILE, hint="run `histoembed embed` after `histoembed crops`") from None
    return replace(features, scale=scale)


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


def _read_part(path: Path, split: str | None = None) -> pa.Table:
    """One part (only ``split``'s rows, when given), or a clear error naming it when it cannot be read."""
    try:
        return pq.read_table(path, filters=None if split is None else [("split", "=", split)])
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"feature part is corrupt and cannot be read ({e})", path=path,
                        hint="re-run `histoembed embed`: it replaces parts it cannot read") from None


def _part_meta(path: Path) -> dict:
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"feature part is corrupt and cannot be read ({e})", path=path,
                        hint="re-run `histoembed embed`: it replaces parts it cannot read") from None
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


ROW_KEY = ("split", "image_id", "crop_index", "view")  # one feature row; the store's reading order


def _row_name(split, image_id, crop_index, view) -> str:
    return f"{split} image {image_id}, crop {crop_index}, view {view}"


def sorted_embedding(column: pa.ChunkedArray, order: np.ndarray, keep_dtype: bool = False) -> np.ndarray:
    """``column``'s rows in ``order`` as an [N, D] array, placed chunk by chunk: no sorted copy of the Arrow
    column nor a combined one is made. float32, or the store's float16 with ``keep_dtype`` (fit converts
    each bag's rows to float32 as it groups them, so a float16 store is held once in half the memory)."""
    dim = column.type.list_size
    half = keep_dtype and column.type.value_type == pa.float16()
    out = np.empty((len(order), dim), np.float16 if half else np.float32)
    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))      # sorted position of each row as read
    start = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        for a in range(0, len(values), 1 << 16):
            b = min(a + (1 << 16), len(values))
            out[where[start + a:start + b]] = values[a:b]
        start += len(values)
    return out


def read_features(store_dir: str | Path, split: str | None = None, keep_dtype: bool = False) -> Features:
    """Read every part of ``run/features/<encoder>/`` (all shards) as one table.

    Rows come sorted by (split, image, crop, view), whatever the parts' names or order, so
    a sharded or resumed store gives the same results as a whole one. Duplicate rows and
    non-finite embeddings are refused: a model trained on them would be silently wrong.
    Only ``split``'s rows are read, when given; ``keep_dtype`` keeps a float16 store's embeddings
    in float16 (see :func:`sorted_embedding`).
    """
    store_dir = Path(store_dir)
    parts = feature_parts(store_dir)
    if not parts:
        raise UserError("no feature parts found", path=store_dir,
                        hint="run `histoembed embed` first")
    metas = [_part_meta(p) for p in parts]
    for p, m in zip(parts, metas):
        check_schema(p, "embed", m)
    keys = {m.get("key") for m in metas}
    if len(keys) != 1:
        raise UserError("feature parts were written with different settings", path=store_dir,
                        hint="re-run `histoembed embed`; it removes parts of old settings")
    table = pa.concat_tables(_read_part(p, split) for p in parts)
    order = pc.sort_indices(table.select(list(ROW_KEY)), sort_keys=[(c, "ascending") for c in ROW_KEY])
    embedding = sorted_embedding(table["embedding"], order.to_numpy(), keep_dtype)
    table = table.drop_columns(["embedding"]).take(order)
    features = Features(
        image_id=table["image_id"].to_numpy(zero_copy_only=False),
        split=table["split"].to_numpy(zero_copy_only=False),
        crop_index=table["crop_index"].to_numpy(),
        view=table["view"].to_numpy(),
        embedding=embedding,
        meta=metas[0],
        crop_hash=(table[CROP_HASH].to_numpy(zero_copy_only=False) if CROP_HASH in table.column_names
                   and table[CROP_HASH].null_count == 0 else None),
    )
    _refuse_duplicates(features, store_dir)
    _refuse_non_finite(features, store_dir)
    return features


def _refuse_duplicates(f: Features, store_dir: Path) -> None:
    if len(f) < 2:
        return
    same = ((f.split[1:] == f.split[:-1]) & (f.image_id[1:] == f.image_id[:-1])
            & (f.crop_index[1:] == f.crop_index[:-1]) & (f.view[1:] == f.view[:-1]))
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise UserError(f"{int(same.sum())} duplicate feature row(s), e.g. "
                        f"{_row_name(f.split[i], f.image_id[i], f.crop_index[i], f.view[i])}",
                        path=store_dir, hint="two embed runs wrote the same crops: delete the folder and "
                                             "re-run `histoembed embed`")


def _refuse_non_finite(f: Features, store_dir: Path) -> None:
    bad = ~np.isfinite(f.embedding).all(axis=1) if len(f) else np.zeros(0, bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{int(bad.sum())} embedding(s) hold NaN or infinity, e.g. "
                        f"{_row_name(f.split[i], f.image_id[i], f.crop_index[i], f.view[i])}",
                        path=store_dir, hint="delete the folder and re-run `histoembed embed` "
                                             "(try --precision fp32)")


def views_of(split: str, repeats: int, tta: bool) -> list[int]:
    """The views a crop of ``split`` is embedded in: all r for train (and test with TTA), else view 0."""
    return list(range(repeats)) if split == "train" or tta else [0]


def check_complete(features: Features, run: str | Path, split: str) -> None:
    """Refuse features that are stale (embedded from other crops) or partial (a crop or a view missing).

    ``features`` hold ``split``'s rows of a store; ``run/crops.parquet`` says which crops it
    must hold (by their pixels, where the store records each crop's digest, else by the
    crops file's key), and the store's metadata how many views each.
    """
    crops_path = Path(run) / CROPS_FILE
    hint = "run `histoembed embed` (it resumes a partial store and replaces what is stale)"
    index = read_table(crops_path, "crops file", columns=["image_id", "split", "crop_index"],
                       hint="run `histoembed crops` first", stage="crops")
    mine = features.split == split
    keys = [index["image_id"].to_pylist(), index["crop_index"].to_pylist()]
    found_keys = [features.image_id[mine].tolist(), features.crop_index[mine].tolist()]
    if features.crop_hash is not None:
        keys.append(crop_hashes(crops_path))
        found_keys.append(features.crop_hash[mine].tolist())
    elif features.meta.get("crops_key") != read_meta(crops_path).get("key"):
        raise UserError(f"the features were embedded from other crops than {CROPS_FILE} holds now "
                        "(crops changed since `histoembed embed`)", path=crops_path, hint=hint)
    views = views_of(split, int(features.meta.get("repeats", 1)), bool(features.meta.get("tta", True)))
    # One tuple per crop view: (image, crop, view, digest or None).
    digests = keys[2] if len(keys) > 2 else [None] * len(keys[0])
    expected = {(i, c, v, h) for i, c, h, s in zip(*keys[:2], digests, index["split"].to_pylist()) if s == split
                for v in views}
    found_digests = found_keys[2] if len(found_keys) > 2 else [None] * len(found_keys[0])
    found = set(zip(*found_keys[:2], features.view[mine].tolist(), found_digests))
    missing, extra = expected - found, found - expected
    where = crops_path.parent / FEATURES_DIR
    if extra and features.crop_hash is not None:
        stale = {f[:2] for f in extra} & {m[:2] for m in missing}
        if stale:
            i, c = min(stale)
            raise UserError(f"the features of {len(stale)} {split} crop(s) were embedded from other pixels than "
                            f"{CROPS_FILE} holds now, e.g. {split} image {i}, crop {c}", path=where, hint=hint)
    if missing:
        i, c, v, _ = min(missing, key=lambda m: m[:3])
        crops = len({m[:2] for m in missing})
        raise UserError(f"the features are partial: {len(missing)} of {len(expected)} {split} crop views "
                        f"({crops} crop(s)) are missing, e.g. {_row_name(split, i, c, v)}", path=where, hint=hint)
    if extra:
        i, c, v, _ = min(extra, key=lambda m: m[:3])
        raise UserError(f"the features hold {len(extra)} {split} crop view(s) that {CROPS_FILE} does not, "
                        f"e.g. {_row_name(split, i, c, v)}", path=where, hint=hint)


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


def feature_rows(store_dir: str | Path) -> set[tuple[str, str, int, int]]:
    """The (split, image_id, crop_index, view) rows of a store, read without the embeddings."""
    rows: set[tuple[str, str, int, int]] = set()
    for part in feature_parts(store_dir):
        try:
            t = pq.read_table(part, columns=list(ROW_KEY))
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"feature part is corrupt and cannot be read ({e})", path=part,
                            hint="re-run `histoembed embed`: it replaces parts it cannot read") from None
        rows.update(zip(t["split"].to_pylist(), t["image_id"].to_pylist(), t["crop_index"].to_pylist(),
                        t["view"].to_pylist()))
    return rows


def check_same_rows(stores: dict[str, Path]) -> None:
    """Refuse feature stores (encoder -> folder) that do not hold exactly the same (split, image, crop, view) rows.

    Encoders fused into one decision must see the same crops in the same views; the message names the
    store that lacks rows, how many, the first few, and the embed run that fills them in.
    """
    rows = {name: feature_rows(d) for name, d in stores.items()}
    union = set().union(*rows.values())
    for name, have in rows.items():
        missing = union - have
        if missing:
            first = "; ".join(_row_name(*r) for r in sorted(missing)[:3])
            others = [n for n, r in rows.items() if n != name and r & missing]
            raise UserError(f"the feature store of encoder {name!r} lacks {len(missing)} of the {len(union)} "
                            f"(split, image, crop, view) rows that the store(s) of {', '.join(map(repr, others))} "
                            f"hold ({len(have)} rows here), e.g. {first}", path=stores[name],
                            hint=f"run `histoembed embed --encoder {name}` (it fills in what is missing), or "
                                 "embed every encoder from the same crops with the same --repeats and --tta")

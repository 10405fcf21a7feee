"""What a feature store's parts hold: columns, metadata, key, views, folder names, and the stain note in their footers.

The contract in words is :mod:`histoembed.core.feature_store`'s docstring.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed import __version__
from histoembed.core import store
from histoembed.core.config import AugmentSettings, EmbedSettings, output_settings
from histoembed.core.errors import UserError

STORE_VERSION = 3  # 2: bf16 on CUDA runs a bf16 copy of the weights, not autocast; 3: rows keyed by (split, image_id)

FEATURE_COLUMNS = ("image_id", "split", "crop_index", "view", "embedding")
CROP_HASH = "crop_hash"  # optional column: the digest of the crop's PNG, so changed crops are found one by one
ROW_KEY = ("split", "image_id", "crop_index", "view")  # one feature row; the store's reading order
PART_OPTIONS = dict(compression="zstd", use_byte_stream_split=["embedding.list.element"])
RUN_ID_FILE = ".ray-run"  # the Ray run that may add parts to a store now (see histoembed.engines.ray)
STAIN_NOTE_KEY = "histoembed_stain"  # part footer: the crops of the part that passed through unchanged

Crop = tuple[str, str, int, str]  # split, image id, crop index, digest of its PNG


class EncoderFacts(Protocol):
    """What the store records of an encoder (``histoembed.models.encoders.Encoder`` has all of it)."""

    name: str
    encoder_id: str
    weights_hash: str
    dim: int
    pool: str
    size: int
    precision: str


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


def part_schema(dim: int, dtype: str, meta: dict) -> pa.Schema:
    """The schema every part of a store is written with: the columns, digests included, and ``store_meta``."""
    return store.with_meta(feature_schema(dim, dtype, crop_hash=True), meta)


def store_key(encoder: EncoderFacts, settings: EmbedSettings, augment: AugmentSettings,
              stain_target: dict | None = None) -> str:
    """What decides a crop's features besides its pixels: weights, pooling, precision, views, augmentation, and
    the stain normalisation's target (``StainTarget.key()``, its values: the same stain from another file keys
    the same; None without stain normalisation).

    The crops themselves are matched one by one by their PNG digest (``crop_hash``), so a
    re-cut of some images re-embeds only the crops whose pixels changed.
    """
    if stain_target is None:  # the stain thresholds change nothing then
        settings = settings.model_copy(update={"stain_min_tissue": EmbedSettings().stain_min_tissue})
    return store.stage_key("embed", STORE_VERSION, settings, encoder.encoder_id, encoder.weights_hash,
                           encoder.pool, encoder.size, encoder.precision,
                           output_settings(augment) if settings.repeats > 1 else None, stain_target)


def store_meta(encoder: EncoderFacts, settings: EmbedSettings, augment: AugmentSettings, key: str,
               crops_key: str | None, precision_check: dict | None, shard: str, stain: dict | None = None) -> dict:
    """The provenance every part of a store carries in its schema metadata (``key`` decides what is kept).

    ``precision_check``: ``PrecisionCheck.as_meta()`` (None when none ran); ``stain``: the normaliser's
    ``stain.as_meta`` (None without stain normalisation).
    """
    return {"key": key, "encoder": encoder.name, "encoder_id": encoder.encoder_id,
            "weights_hash": encoder.weights_hash, "dim": encoder.dim, "pool": encoder.pool, "size": encoder.size,
            "precision": encoder.precision, "repeats": settings.repeats, "tta": settings.tta, "seed": settings.seed,
            "augment": augment.model_dump(), "store_dtype": settings.store_dtype, "crops_key": crops_key,
            "shard": shard, "package_version": __version__, "precision_check": precision_check, "stain": stain}


def views_of(split: str, repeats: int, tta: bool) -> list[int]:
    """The views a crop of ``split`` is embedded in: all r for train (and test with TTA), else view 0."""
    return list(range(repeats)) if split == "train" or tta else [0]


def row_name(split, image_id, crop_index, view) -> str:
    return f"{split} image {image_id}, crop {crop_index}, view {view}"


def feature_parts(store_dir: str | Path) -> list[Path]:
    """The complete part files of a store (temporaries are never listed)."""
    return sorted(p for p in Path(store_dir).glob("part-*.parquet"))


def encoder_slug(encoder: str) -> str:
    """A store's folder name for an encoder id or path: ``owkin/phikon-v2`` -> ``owkin--phikon-v2``."""
    name = str(encoder).rstrip("/")
    if os.sep in name and Path(name).exists():
        name = Path(name).name
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("/", "--"))


def encoder_list(text: str) -> list[str]:
    """The encoders of a comma list, in order, each once; two that would share a store folder are refused."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    slugs: dict[str, str] = {}
    for n in names:
        other = slugs.setdefault(encoder_slug(n), n)
        if other != n:
            raise UserError(f"encoders {other!r} and {n!r} share the same store "
                            f"(run/{store.FEATURES_DIR}/{encoder_slug(n)})", hint="give each encoder once")
    return names


# ---------------------------------------------------------------- the stain note in a part's footer

def stain_note(unchanged: np.ndarray, splits: list[str], ids: list[str], crop_index: list[int]) -> dict:
    """A batch's stain note: how many crops were normalised, and which (``unchanged``: bool per crop) were not."""
    left = np.flatnonzero(unchanged)
    return {"normalised": len(ids) - len(left),
            "unchanged": [[str(splits[i]), str(ids[i]), int(crop_index[i])] for i in left]}


def add_stain_notes(a: dict | None, b: dict) -> dict:
    """Two notes as one (a part's note grows batch by batch)."""
    if a is None:
        return {"normalised": b["normalised"], "unchanged": list(b["unchanged"])}
    return {"normalised": a["normalised"] + b["normalised"], "unchanged": a["unchanged"] + b["unchanged"]}


def with_stain_note(table: pa.Table, note: dict | None) -> pa.Table:
    """``table`` whose footer will carry ``note`` (a part written whole; None: no note)."""
    if note is None:
        return table
    return table.replace_schema_metadata({**table.schema.metadata, STAIN_NOTE_KEY: json.dumps(note)})


def stain_summary(store_dir: Path) -> dict:
    """Crops normalised and crops passed through unchanged, over every part of a feature store."""
    normalised, unchanged = 0, []
    for part in feature_parts(store_dir):
        raw = (pq.ParquetFile(part).metadata.metadata or {}).get(STAIN_NOTE_KEY.encode())
        if raw:
            note = json.loads(raw)
            normalised += note["normalised"]
            unchanged += note["unchanged"]
    return {"normalised": normalised, "unchanged": len(unchanged), "unchanged_crops": sorted(unchanged)}

"""Reading a feature store: every part as one sorted table, refused when it is mixed, duplicated, non-finite,
stale or partial; the store of an encoder; the rows several stores must share.

The contract in words is :mod:`histoembed.core.feature_store`'s docstring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.core.feature_store.schema import CROP_HASH, ROW_KEY, encoder_slug, feature_parts, row_name, views_of


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
        return store.image_keys(self.split, self.image_id)


def with_scales(features: Features, run: str | Path) -> Features:
    """``features`` with each row's crop scale from ``run/crops.parquet`` (the store itself holds crops by index)."""
    scales = store.crop_scales(run)
    try:
        scale = np.array([scales[(s, i, int(c))] for s, i, c in zip(features.split, features.image_id,
                                                                     features.crop_index)], dtype=np.float32)
    except KeyError as e:
        raise UserError(f"the features hold a crop that {store.CROPS_FILE} does not ({e.args[0]})",
                        path=Path(run) / store.CROPS_FILE,
                        hint="run `histoembed embed` after `histoembed crops`") from None
    return replace(features, scale=scale)


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
    raw = md.get(store.META_KEY)
    return json.loads(raw) if raw else {}


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
        store.check_schema(p, "embed", m)
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
                        f"{row_name(f.split[i], f.image_id[i], f.crop_index[i], f.view[i])}",
                        path=store_dir, hint="two embed runs wrote the same crops: delete the folder and "
                                             "re-run `histoembed embed`")


def _refuse_non_finite(f: Features, store_dir: Path) -> None:
    bad = ~np.isfinite(f.embedding).all(axis=1) if len(f) else np.zeros(0, bool)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{int(bad.sum())} embedding(s) hold NaN or infinity, e.g. "
                        f"{row_name(f.split[i], f.image_id[i], f.crop_index[i], f.view[i])}",
                        path=store_dir, hint="delete the folder and re-run `histoembed embed` "
                                             "(try --precision fp32)")


def check_complete(features: Features, run: str | Path, split: str) -> None:
    """Refuse features that are stale (embedded from other crops) or partial (a crop or a view missing).

    ``features`` hold ``split``'s rows of a store; ``run/crops.parquet`` says which crops it
    must hold (by their pixels, where the store records each crop's digest, else by the
    crops file's key), and the store's metadata how many views each.
    """
    crops_path = Path(run) / store.CROPS_FILE
    hint = "run `histoembed embed` (it resumes a partial store and replaces what is stale)"
    index = store.read_table(crops_path, "crops file", columns=["image_id", "split", "crop_index"],
                       hint="run `histoembed crops` first", stage="crops")
    mine = features.split == split
    keys = [index["image_id"].to_pylist(), index["crop_index"].to_pylist()]
    found_keys = [features.image_id[mine].tolist(), features.crop_index[mine].tolist()]
    if features.crop_hash is not None:
        keys.append(store.crop_hashes(crops_path))
        found_keys.append(features.crop_hash[mine].tolist())
    elif features.meta.get("crops_key") != store.read_meta(crops_path).get("key"):
        raise UserError(f"the features were embedded from other crops than {store.CROPS_FILE} holds now "
                        "(crops changed since `histoembed embed`)", path=crops_path, hint=hint)
    views = views_of(split, int(features.meta.get("repeats", 1)), bool(features.meta.get("tta", True)))
    # One tuple per crop view: (image, crop, view, digest or None).
    digests = keys[2] if len(keys) > 2 else [None] * len(keys[0])
    expected = {(i, c, v, h) for i, c, h, s in zip(*keys[:2], digests, index["split"].to_pylist()) if s == split
                for v in views}
    found_digests = found_keys[2] if len(found_keys) > 2 else [None] * len(found_keys[0])
    found = set(zip(*found_keys[:2], features.view[mine].tolist(), found_digests))
    missing, extra = expected - found, found - expected
    where = crops_path.parent / store.FEATURES_DIR
    if extra and features.crop_hash is not None:
        stale = {f[:2] for f in extra} & {m[:2] for m in missing}
        if stale:
            i, c = min(stale)
            raise UserError(f"the features of {len(stale)} {split} crop(s) were embedded from other pixels than "
                            f"{store.CROPS_FILE} holds now, e.g. {split} image {i}, crop {c}", path=where, hint=hint)
    if missing:
        i, c, v, _ = min(missing, key=lambda m: m[:3])
        crops = len({m[:2] for m in missing})
        raise UserError(f"the features are partial: {len(missing)} of {len(expected)} {split} crop views "
                        f"({crops} crop(s)) are missing, e.g. {row_name(split, i, c, v)}", path=where, hint=hint)
    if extra:
        i, c, v, _ = min(extra, key=lambda m: m[:3])
        raise UserError(f"the features hold {len(extra)} {split} crop view(s) that {store.CROPS_FILE} does not, "
                        f"e.g. {row_name(split, i, c, v)}", path=where, hint=hint)


def find_feature_store(run_dir: str | Path, encoder: str | None = None) -> Path:
    """The one feature store under ``run/features`` (or the one named by ``encoder``)."""
    root = Path(run_dir) / store.FEATURES_DIR
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


def feature_rows(store_dir: str | Path) -> pa.Table:
    """The distinct (split, image_id, crop_index, view) rows of a store, read without the embeddings (Arrow
    columns, not Python tuples: a slide cohort's store holds millions of rows)."""
    tables = []
    for part in feature_parts(store_dir):
        try:
            tables.append(pq.read_table(part, columns=list(ROW_KEY)))
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"feature part is corrupt and cannot be read ({e})", path=part,
                            hint="re-run `histoembed embed`: it replaces parts it cannot read") from None
    if not tables:
        return pa.table({k: pa.array([], t) for k, t in
                         zip(ROW_KEY, (pa.string(), pa.string(), pa.int32(), pa.int16()))})
    return pa.concat_tables(tables).group_by(list(ROW_KEY)).aggregate([])


def check_same_rows(stores: dict[str, Path]) -> None:
    """Refuse feature stores (encoder -> folder) that do not hold exactly the same (split, image, crop, view) rows.

    Encoders fused into one decision must see the same crops in the same views; the message names the
    store that lacks rows, how many, the first few, and the embed run that fills them in.
    """
    rows = {name: feature_rows(d) for name, d in stores.items()}
    union = pa.concat_tables(rows.values()).group_by(list(ROW_KEY)).aggregate([])
    for name, have in rows.items():
        missing = union.join(have, list(ROW_KEY), join_type="left anti")
        if missing.num_rows:
            missing = missing.sort_by([(k, "ascending") for k in ROW_KEY])
            others = [n for n, r in rows.items() if n != name
                      and r.join(missing, list(ROW_KEY), join_type="left semi").num_rows]
            first = "; ".join(row_name(*r.values()) for r in missing.slice(0, 3).to_pylist())
            raise UserError(f"the feature store of encoder {name!r} lacks {missing.num_rows} of the {union.num_rows} "
                            f"(split, image, crop, view) rows that the store(s) of {', '.join(map(repr, others))} "
                            f"hold ({have.num_rows} rows here), e.g. {first}", path=stores[name],
                            hint=f"run `histoembed embed --encoder {name}` (it fills in what is missing), or "
                                 "embed every encoder from the same crops with the same --repeats and --tta")

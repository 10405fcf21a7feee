"""A feature store read slide by slide: where each image's rows are, and one image's rows on demand.

``fit`` on a cohort larger than memory (issue 37) never reads the whole store: ``SlideIndex`` lists,
for one split, the row-group pieces that hold each image's rows (built once from the parts'
``split`` and ``image_id`` columns and kept in memory for the process, keyed by the parts' names,
sizes and times, so the bytes of stores written before it read as they are), and ``SlideReader``
returns one image's rows sorted by (crop, view), as ``read_features`` would sort them, keeping a
bounded number of decoded row groups. A row group is the unit Parquet decodes: the local engine
writes one per batch and the Ray engine one per unit, so a slide's rows come with little else.

``CropFingerprints`` says, per image, which crops ``crops.parquet`` holds (a count and an
order-free sum of 64-bit digests of (crop, pixels)), read one row group at a time, so the
completeness check of ``check_complete`` runs slide by slide with memory of the images, not rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.core.feature_store.schema import CROP_HASH, feature_parts, row_name

HINT = "run `histoembed embed` (it resumes a partial store and replaces what is stale)"
MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of row group ``group`` of part ``part`` (an index into ``SlideIndex.parts``)."""

    part: int
    group: int
    start: int
    stop: int


@dataclass
class SlideIndex:
    """Where each image of one split lies in a store: its pieces, in the order the parts hold them."""

    store_dir: Path
    split: str
    parts: list[Path]
    meta: dict
    dim: int
    half: bool                                  # float16 embeddings
    has_hash: bool                              # the store records each crop's digest
    pieces: dict[str, list[Piece]] = field(default_factory=dict)

    def rows(self, image_id: str) -> int:
        return sum(p.stop - p.start for p in self.pieces.get(image_id, ()))

    @property
    def total_rows(self) -> int:
        return sum(p.stop - p.start for ps in self.pieces.values() for p in ps)

    @property
    def image_ids(self) -> list[str]:
        return sorted(self.pieces)


_INDEXES: OrderedDict[tuple, SlideIndex] = OrderedDict()   # a few recent indexes, by the parts' identity


def slide_index(store_dir: str | Path, split: str) -> SlideIndex:
    """The index of ``split``'s images in the store (refused like ``read_features``: mixed keys, old schema)."""
    store_dir = Path(store_dir)
    parts = feature_parts(store_dir)
    if not parts:
        raise UserError("no feature parts found", path=store_dir, hint="run `histoembed embed` first")
    ident = (str(store_dir.resolve()), split, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in parts))
    if ident in _INDEXES:
        _INDEXES.move_to_end(ident)
        return _INDEXES[ident]
    metas = [json.loads((_open(p).schema_arrow.metadata or {}).get(store.META_KEY) or "{}") for p in parts]
    for p, m in zip(parts, metas):
        store.check_schema(p, "embed", m)
    if len({m.get("key") for m in metas}) != 1:
        raise UserError("feature parts were written with different settings", path=store_dir,
                        hint="re-run `histoembed embed`; it removes parts of old settings")
    schema = pq.read_schema(parts[0])
    etype = schema.field("embedding").type
    index = SlideIndex(store_dir, split, parts, metas[0], etype.list_size, etype.value_type == pa.float16(),
                       CROP_HASH in schema.names)
    for i, path in enumerate(parts):
        pf = _open(path)
        index.has_hash = index.has_hash and CROP_HASH in pf.schema_arrow.names
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=["split", "image_id"])
            mine = pc.equal(t["split"], split).to_numpy(zero_copy_only=False)
            ids = t["image_id"].to_numpy(zero_copy_only=False)
            cut = np.flatnonzero(np.r_[True, (ids[1:] != ids[:-1]) | (mine[1:] != mine[:-1])]) if len(ids) else []
            for a, b in zip(cut, [*cut[1:], len(ids)]):
                if mine[a]:
                    index.pieces.setdefault(str(ids[a]), []).append(Piece(i, g, int(a), int(b)))
    _INDEXES[ident] = index
    while len(_INDEXES) > 4:
        _INDEXES.popitem(last=False)
    return index


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"feature part is corrupt and cannot be read ({e})", path=path,
                        hint="re-run `histoembed embed`: it replaces parts it cannot read") from None


@dataclass
class SlideRows:
    """One image's rows, sorted by (crop, view); ``embedding`` float32 [rows, D]."""

    image_id: str
    crop_index: np.ndarray
    view: np.ndarray
    embedding: np.ndarray
    crop_hash: np.ndarray | None


class SlideReader:
    """One image's rows at a time, with at most ``cache_bytes`` of decoded row groups kept."""

    def __init__(self, index: SlideIndex, cache_bytes: int = 256 << 20):
        self.index, self.cache_bytes = index, cache_bytes
        self._groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._files: dict[int, pq.ParquetFile] = {}
        self.columns = ["crop_index", "view", "embedding"] + ([CROP_HASH] if index.has_hash else [])

    def _group(self, part: int, group: int) -> pa.Table:
        key = (part, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        if part not in self._files:
            self._files[part] = _open(self.index.parts[part])
        try:
            table = self._files[part].read_row_group(group, columns=self.columns)
        except (OSError, pa.ArrowInvalid) as e:
            raise UserError(f"feature part is corrupt and cannot be read ({e})", path=self.index.parts[part],
                            hint="re-run `histoembed embed`: it replaces parts it cannot read") from None
        self._groups[key] = table
        while len(self._groups) > 1 and sum(t.nbytes for t in self._groups.values()) > self.cache_bytes:
            self._groups.popitem(last=False)
        return table

    def read(self, image_id: str) -> SlideRows:
        pieces = self.index.pieces.get(image_id, [])
        tables = [self._group(p.part, p.group).slice(p.start, p.stop - p.start) for p in pieces]
        t = pa.concat_tables(tables) if tables else pa.table({c: [] for c in self.columns})
        crop, view = t["crop_index"].to_numpy(), t["view"].to_numpy()
        order = np.lexsort((view, crop))
        dim = self.index.dim
        emb = np.empty((len(order), dim), np.float32)
        where = np.empty(len(order), np.int64)
        where[order] = np.arange(len(order))
        start = 0
        for chunk in t["embedding"].chunks:
            values = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            emb[where[start:start + len(values)]] = values
            start += len(values)
        hashes = t[CROP_HASH].to_numpy(zero_copy_only=False)[order] if self.index.has_hash else None
        return SlideRows(image_id, crop[order].astype(np.int32), view[order].astype(np.int16), emb, hashes)


STREAM_BYTES = 32 << 20    # a store whose rows as float32 pass this is read slide by slide by ``image_means``


def store_bytes(store_dir: str | Path) -> int:
    """The store's rows as float32, in bytes, from the parts' footers (nothing is decoded)."""
    total = 0
    for part in feature_parts(store_dir):
        pf = _open(part)
        total += pf.metadata.num_rows * pf.schema_arrow.field("embedding").type.list_size * 4
    return total


def image_means(store_dir: str | Path, view: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image keys ``split/image_id`` sorted, [N, D] float64 mean of each image's ``view`` rows, the store's meta),
    one slide at a time: the means ``drift`` compares, without the store in memory."""
    keys, means, meta = [], [], {}
    for split in ("test", "train"):
        index = slide_index(store_dir, split)
        meta = index.meta
        reader = SlideReader(index, cache_bytes=16 << 20)
        for image_id in index.image_ids:
            rows = reader.read(image_id)
            mine = rows.embedding[rows.view == view].astype(np.float64)
            if len(mine):
                keys.append(f"{split}/{image_id}")
                means.append(np.add.reduceat(mine, [0], axis=0)[0] / len(mine))
    order = np.argsort(np.asarray(keys, dtype=object)) if keys else np.zeros(0, np.int64)
    dim = means[0].shape[0] if means else 0
    return (np.asarray(keys, dtype=object)[order], np.asarray(means, np.float64).reshape(-1, dim)[order], meta)


def crop_fingerprint(crop_index, digests) -> tuple[int, int]:
    """(count, sum of 64-bit digests of each (crop, digest) mod 2**64): equal for equal sets of crops."""
    total = 0
    for c, d in zip(crop_index, digests):
        total += int.from_bytes(hashlib.blake2b(f"{int(c)}|{d}".encode(), digest_size=8).digest(), "little")
    return len(crop_index), total & MASK64


def crop_fingerprints(run: str | Path, split: str, digests: bool = True) -> dict[str, tuple[int, int]]:
    """Per image of ``split`` in ``run/crops.parquet``: ``crop_fingerprint`` of its crops (with each crop's
    digest, or None for every crop without ``digests``: a store that records none), read one row group at a time."""
    path = Path(run) / store.CROPS_FILE
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"crops file cannot be read ({e})", path=path,
                        hint="run `histoembed crops` first") from None
    names = pf.schema_arrow.names
    columns = ["image_id", "split", "crop_index"] + (["png"] if digests else []) \
        + (["patch_digest"] if digests and "patch_digest" in names else [])
    out: dict[str, list[int]] = {}
    for batch in pf.iter_batches(batch_size=1 << 16, columns=columns):
        t = pa.Table.from_batches([batch])
        t = t.filter(pc.equal(t["split"], split))
        pngs = t["png"].to_pylist() if digests else [None] * t.num_rows
        given = t["patch_digest"].to_pylist() if "patch_digest" in t.column_names else [None] * len(pngs)
        for i, c, png, d in zip(t["image_id"].to_pylist(), t["crop_index"].to_pylist(), pngs, given):
            digest = None if not digests else store.crop_digest(png) if png is not None else d
            n_sum = out.setdefault(i, [0, 0])
            n_sum[0] += 1
            n_sum[1] = (n_sum[1] + crop_fingerprint([c], [digest])[1]) & MASK64
    return {i: (n, s) for i, (n, s) in out.items()}


def check_slide(rows: SlideRows, expected: tuple[int, int] | None, views: list[int], store_dir: Path,
                split: str) -> None:
    """Refuse one image's rows when duplicated, non-finite, or not exactly its crops of ``crops.parquet`` in
    every view (``expected``: its ``crop_fingerprint``; the crops' digests are compared when the store has them)."""
    name = lambda i: row_name(split, rows.image_id, rows.crop_index[i], rows.view[i])  # noqa: E731
    same = (rows.crop_index[1:] == rows.crop_index[:-1]) & (rows.view[1:] == rows.view[:-1])
    if same.any():
        raise UserError(f"{int(same.sum())} duplicate feature row(s), e.g. {name(int(np.flatnonzero(same)[0]))}",
                        path=store_dir, hint="two embed runs wrote the same crops: delete the folder and "
                                             "re-run `histoembed embed`")
    bad = ~np.isfinite(rows.embedding).all(axis=1)
    if bad.any():
        raise UserError(f"{int(bad.sum())} embedding(s) hold NaN or infinity, e.g. {name(int(np.flatnonzero(bad)[0]))}",
                        path=store_dir, hint="delete the folder and re-run `histoembed embed` (try --precision fp32)")
    crops_path = store_dir.parent.parent / store.CROPS_FILE
    if expected is None:
        raise UserError(f"the features hold {split} image {rows.image_id}, which {store.CROPS_FILE} does not",
                        path=crops_path, hint=HINT)
    for v in views:
        of_view = rows.view == v
        digests = rows.crop_hash[of_view] if rows.crop_hash is not None else [None] * int(of_view.sum())
        if crop_fingerprint(rows.crop_index[of_view], digests) != expected:
            raise UserError(f"the features of {split} image {rows.image_id}, view {v}, are not the "
                            f"{expected[0]} crop(s) {store.CROPS_FILE} holds now (crops missing, or embedded "
                            "from other pixels)", path=crops_path, hint=HINT)
    extra = ~np.isin(rows.view, views)
    if extra.any():
        raise UserError(f"the features hold a view the store's settings do not make, e.g. "
                        f"{name(int(np.flatnonzero(extra)[0]))}", path=store_dir, hint=HINT)

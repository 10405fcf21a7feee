"""Writing a feature store: which crops are still to embed, the shard lock, and the parts themselves.

Either engine plans with ``open_store`` (holding ``shard_lock``), builds each batch's rows with
``part_rows`` and writes them with ``PartWriter`` (local: row groups into numbered parts) or
``write_part`` (Ray: one whole part per unit), so their parts are interchangeable.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed.core import locks, store
from histoembed.core.config import EmbedSettings
from histoembed.core.errors import UserError
from histoembed.core.feature_store.schema import (
    CROP_HASH,
    PART_OPTIONS,
    RUN_ID_FILE,
    STAIN_NOTE_KEY,
    Crop,
    add_stain_notes,
    feature_parts,
    views_of,
)


@dataclass
class CropIndex:
    """The crops of ``run/crops.parquet``, one entry per row: what either engine embeds."""

    path: Path
    ids: list[str]
    splits: list[str]
    crop_index: list[int]
    digests: list[str]  # each crop's PNG digest
    key: str | None     # the crops file's key

    @classmethod
    def read(cls, run: Path) -> CropIndex:
        path = Path(run) / store.CROPS_FILE
        index = store.read_table(path, "crops file", hint="run `histoembed crops` first",
                                 columns=["image_id", "split", "crop_index"], stage="crops")
        return cls(path, index["image_id"].to_pylist(), index["split"].to_pylist(), index["crop_index"].to_pylist(),
                   store.crop_hashes(path), store.read_meta(path).get("key"))

    def crops(self) -> list[Crop]:
        return list(zip(self.splits, self.ids, self.crop_index, self.digests))


@dataclass
class StorePlan:
    """What ``open_store`` found: the crops still to embed, and what the store already holds of the others."""

    store_dir: Path
    todo: list[int]     # rows of the crops file still to embed, in order
    rows: int           # feature rows the store holds of the crops asked for (all views)
    removed_parts: int  # parts of other settings that were removed


def open_store(store_dir: Path, key: str, index: CropIndex, mine: list[int], settings: EmbedSettings,
               run_id: str | None = None) -> StorePlan:
    """The rows of ``mine`` still to embed, once the store holds only crops of ``key``.

    Call it holding the store's shard lock: the rows left are an anti-join of the crops file on
    the store's own index, so a resumed run of either engine skips what finished parts hold.
    ``run_id`` (the Ray engine's) replaces the store's run id before the store is read; without it
    the id is removed, so Ray actors of an earlier run can no longer add parts.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    if run_id is None:
        (store_dir / RUN_ID_FILE).unlink(missing_ok=True)
    else:
        with store.atomic_path(store_dir / RUN_ID_FILE) as tmp:
            tmp.write_text(run_id)
    crops_now = index.crops()
    done, removed = _prepare_store(store_dir, key, set(crops_now))
    todo = [r for r in mine if crops_now[r] not in done]
    rows_of = {s: len(views_of(s, settings.repeats, settings.tta)) for s in ("train", "test")}
    total_rows = sum(rows_of[index.splits[r]] for r in mine)
    return StorePlan(store_dir, todo, total_rows - sum(rows_of[index.splits[r]] for r in todo), removed)


def _prepare_store(store_dir: Path, key: str, current: set[Crop]) -> tuple[set[Crop], int]:
    """Make the store hold only crops of ``current`` embedded with ``key``; return (crops it holds, parts removed).

    Parts of other settings (or without crop digests) are removed; rows of crops that are no
    longer in ``current`` (other pixels, or gone) are dropped from their part, which is
    rewritten atomically. Temporaries of killed runs go too.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    store.remove_stale(store_dir, ".part-*")
    done: set[Crop] = set()
    removed = 0
    for p in feature_parts(store_dir):
        if store.read_meta(p).get("key") != key or CROP_HASH not in pq.read_schema(p).names:
            p.unlink(missing_ok=True)
            removed += 1
            continue
        t = pq.read_table(p, columns=["split", "image_id", "crop_index", CROP_HASH])
        crops = list(zip(*(t[c].to_pylist() for c in ("split", "image_id", "crop_index", CROP_HASH))))
        keep = [c in current for c in crops]
        if not all(keep):
            table = pq.read_table(p).filter(pa.array(keep))
            if len(table):
                write_part(table, p)
            else:
                p.unlink(missing_ok=True)
                removed += 1
        done.update(c for c, k in zip(crops, keep) if k)
    return done, removed


class _Superseded(Exception):
    """Another run owns the store now: this part must not be renamed into place."""


def write_part(table: pa.Table, path: Path, run_id: str | None = None) -> None:
    """Write one whole part atomically (a temporary, renamed into place when complete).

    With ``run_id`` (a Ray actor's run) it is renamed into place only while the store's run id is
    still that one: an actor outliving a killed driver cannot add rows behind a re-run.
    """
    try:
        with store.atomic_path(path) as tmp:
            pq.write_table(table, tmp, **PART_OPTIONS)
            if run_id is not None and _read_text(path.parent / RUN_ID_FILE) != run_id:
                raise _Superseded
    except _Superseded:
        raise UserError("another embed run took over this store; this one stops", path=path.parent,
                        hint="run one embed per store at a time") from None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def shard_lock(store_dir: Path, shard: tuple[int, int]) -> Iterator[None]:
    """One process per shard, and one shard count per store at a time.

    A second ``embed`` of the same shard, or one that splits the crops another way
    (``embed`` beside ``embed --shard 0/2``), would write duplicate rows.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    lock = store_dir / f".lock-s{shard[0]}of{shard[1]}"

    def busy(pid: int) -> UserError:
        return UserError(f"shard {shard[0]}/{shard[1]} is being embedded by process {pid}", path=lock,
                         hint="wait for it, or give each process its own --shard i/n; if no embed is "
                              "running, delete this lock file")

    with locks.pid_lock(lock, busy):
        # Every process takes its own lock before looking at the others', so of two that start
        # together at least one sees the other.
        for other in store_dir.glob(".lock-s*of*"):
            n = other.name.rsplit("of", 1)[-1]
            holder = locks.holder(other)
            if n != str(shard[1]) and holder is not None:
                i = other.name[len(".lock-s"):].split("of")[0]
                raise UserError(f"process {holder} is embedding this store as shard {i}/{n}; shards of one "
                                f"store must all use the same count (here {shard[1]})", path=other,
                                hint=f"wait for it, or run every shard as --shard i/{n}")
        yield


class PartWriter:
    """Row groups into a hidden temporary part, renamed into place when full or closed."""

    def __init__(self, store_dir: Path, shard: tuple[int, int], schema: pa.Schema, rows_per_part: int):
        self.store_dir, self.schema, self.rows_per_part = store_dir, schema, rows_per_part
        self.prefix = f"part-s{shard[0]}of{shard[1]}-"
        taken = [int(p.stem.rsplit("-", 1)[-1]) for p in store_dir.glob(self.prefix + "*.parquet")]
        self.seq = max(taken, default=-1) + 1
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.stain: dict | None = None   # the open part's stain note (stain_note)

    def note_stain(self, note: dict) -> None:
        """Add ``note`` (``stain_note`` of a batch) to the part the next ``write`` goes to; its footer keeps it."""
        self.stain = add_stain_notes(self.stain, note)

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.tmp = self.store_dir / f".{self.prefix}{self.seq:05d}.parquet.tmp-{os.getpid()}"
            self.writer = pq.ParquetWriter(self.tmp, self.schema, **PART_OPTIONS)
        self.writer.write_table(table)
        self.rows += len(table)
        if self.rows >= self.rows_per_part:
            self.commit()

    def commit(self) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            if self.stain is not None:
                writer.add_key_value_metadata({STAIN_NOTE_KEY: json.dumps(self.stain)})
                self.stain = None
            writer.close()
            os.replace(self.tmp, self.store_dir / f"{self.prefix}{self.seq:05d}.parquet")
        except BaseException:  # a full disk, say: no temporary is left behind
            self.tmp.unlink(missing_ok=True)
            raise
        self.rows, self.seq = 0, self.seq + 1

    def discard(self) -> None:
        self.stain = None
        if self.writer is not None:
            self.writer.close()
            self.tmp.unlink(missing_ok=True)
            self.writer = None


def part_rows(ids: list[str], splits: list[str], crop_index: list[int], views: list[int], feats: np.ndarray,
              schema: pa.Schema, digests: list[str] | None = None) -> pa.Table:
    """Crop-major rows of features [B, V, D] (with each crop's PNG digest when the schema has the column)."""
    b, v, d = feats.shape
    value_type = schema.field("embedding").type.value_type
    values = pa.array(np.asarray(feats).reshape(-1).astype(value_type.to_pandas_dtype(), copy=False))
    return pa.Table.from_arrays([
        pa.array(np.repeat(ids, v), pa.string()),
        pa.array(np.repeat(splits, v), pa.string()),
        pa.array(np.repeat(crop_index, v), pa.int32()),
        pa.array(np.tile(views, b), pa.int16()),
        pa.FixedSizeListArray.from_arrays(values, d),
        *([pa.array(np.repeat(digests, v), pa.string())] if CROP_HASH in schema.names else []),
    ], schema=schema)

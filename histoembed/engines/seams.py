"""What both engines of the embed stage share: the forward of a batch's views, the crops to embed, the store.

The store (``run/features/<encoder-slug>/``) and its contract are described in :mod:`histoembed.stages.embed`.
Either engine plans the crops still to embed with ``open_store`` (under ``shard_lock``), runs each
batch through ``queue_batch`` and writes rows built by ``part_rows`` with the schema and metadata
of ``part_schema``/``store_meta``, so their parts are interchangeable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from histoembed import __version__
from histoembed.core import cpus, locks, store
from histoembed.core.config import AugmentSettings, EmbedSettings, output_settings
from histoembed.core.console import console
from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.pixels import decode_png
from histoembed.maths import stain
from histoembed.maths.augment import augment_batch
from histoembed.models.encoders import Encoder
from histoembed.models.precision import PrecisionCheck, check_precision
from histoembed.models.sizing import CPU_BATCH_SIZE, CPU_WORKERS, Sizes, cuda_sizes

STORE_VERSION = 3  # 2: bf16 on CUDA runs a bf16 copy of the weights, not autocast; 3: rows keyed by (split, image_id)


# ---------------------------------------------------------------- in-memory embedding

def embed_views(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], augment: AugmentSettings | None, seed: int,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """[B, V, D] float32 features of uint8 crops [B, H, W, 3], one column per view in ``views``, on the host."""
    return queue_views(encoder, crops, image_ids, crop_index, views, augment, seed, normaliser).cpu()


def queue_views(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], augment: AugmentSettings | None, seed: int,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """``embed_views`` left on the encoder's device: on a GPU the work is only queued, so the host can
    draw the next view's augmentation, write the previous batch and fetch the next one meanwhile.

    With a stain ``normaliser`` the crops are normalised first, so every view (view 0 too) is
    made from the normalised crop; ``normaliser.last_unchanged`` then marks the crops it passed
    through unchanged.
    """
    x = crops.to(encoder.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    if normaliser is not None:
        x = normaliser(x)
    out = []
    for v in views:
        xv = x if v == 0 else augment_batch(x, image_ids, crop_index, [v] * len(x), augment or AugmentSettings(),
                                            seed)
        out.append(encoder(xv))
    return torch.stack(out, dim=1)


def queue_batch(encoder: Encoder, crops: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int],
                views: Sequence[int], settings: EmbedSettings, augment: AugmentSettings,
                normaliser: stain.StainNormaliser | None = None) -> torch.Tensor:
    """One batch of one split's crops [B, H, W, 3] as features [B, V, D] on the encoder's device.

    Both engines call this for every batch (the local loop and the Ray actors), so whatever a
    batch goes through on its way to the encoder (stain normalisation, views) is the same for both.
    """
    return queue_views(encoder, crops, image_ids, crop_index, views, augment, settings.seed, normaliser)


def copy_to_host(feats: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device features into pinned host memory; read them after ``event.synchronize()``."""
    if feats.device.type != "cuda":
        return feats, None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def check_finite(feats: torch.Tensor, image_ids: Sequence[str], crop_index: Sequence[int], views: Sequence[int],
                 splits: Sequence[str] | None, encoder: str) -> None:
    """Refuse NaN or infinity in the encoder's output [B, V, D], naming the first crop and view."""
    bad = ~torch.isfinite(feats).all(dim=-1)
    if bad.any():
        b, v = (int(i) for i in bad.nonzero()[0])
        split = f"{splits[b]} " if splits is not None else ""
        raise UserError(f"encoder {encoder} returned NaN or infinity for {split}image {image_ids[b]}, "
                        f"crop {crop_index[b]}, view {views[v]} ({int(bad.sum())} crop view(s) in this batch)",
                        hint="check that crop and the encoder's weights; on a GPU try --precision fp32")


STOP_AFTER_ENV = "HISTOEMBED_TEST_STOP_AFTER_BATCHES"


def stop_for_tests(batches_done: int) -> None:
    """Test hook: ``HISTOEMBED_TEST_STOP_AFTER_BATCHES=N:SIGNAL`` sends this process SIGNAL after N batches.

    Interrupt tests stop the run at a fixed point this way, never by timing.
    """
    spec = os.environ.get(STOP_AFTER_ENV)
    if spec:
        n, sig = spec.split(":")
        if batches_done == int(n):
            os.kill(os.getpid(), getattr(signal, sig))


def embed_crops(encoder: Encoder, crops: np.ndarray, views: int = 1, augment: AugmentSettings | None = None,
                seed: int = 0, image_ids: Sequence[str] | None = None, crop_index: Sequence[int] | None = None,
                batch_size: int = 64, normaliser: stain.StainNormaliser | None = None) -> np.ndarray:
    """[N * views, D] float32 features of uint8 crops [N, H, W, 3], crop-major (crop 0's views first).

    Without ids, crop i is keyed as image ``"crop"`` with crop index i (for the augmentation draw).
    """
    crops = np.ascontiguousarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be uint8 [N, H, W, 3], got {crops.dtype} {crops.shape}")
    n = len(crops)
    ids = list(image_ids) if image_ids is not None else ["crop"] * n
    idx = list(crop_index) if crop_index is not None else list(range(n))
    parts = [embed_views(encoder, torch.from_numpy(crops[i:i + batch_size]), ids[i:i + batch_size],
                         idx[i:i + batch_size], range(views), augment, seed, normaliser)
             for i in range(0, n, batch_size)]
    if not parts:
        return np.zeros((0, encoder.dim), np.float32)
    feats = torch.cat(parts)
    check_finite(feats, ids, idx, range(views), None, encoder.name)
    return feats.reshape(n * views, -1).numpy()


# ---------------------------------------------------------------- decoding in workers

class CropBatches(torch.utils.data.IterableDataset):
    """Batches of decoded crops, read from crops.parquet row group by row group.

    Worker w of W takes batches w, w+W, ...; the DataLoader interleaves them back in order.
    Each item: (batch number, uint8 tensor [B, H, W, 3]), or (batch number, row) for a crop
    whose PNG cannot be decoded, or (batch number, (slide path, problem, hint)) for a slide
    patch that cannot be read. A whole slide's patch (no PNG; ``source``, ``level`` and the
    level-0 box in its row) is read from the slide with ``slides.read_patch``; each process
    opens each slide once (``SlideHandles``).
    """

    def __init__(self, path: Path, batches: list[np.ndarray]):
        self.path, self.batches = path, batches

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        pf = pq.ParquetFile(self.path)
        # whole slides: a patch's pixels are read from its slide (one handle per slide in this process)
        slide_cols = ["png", "source", "level", "x0", "y0", "x1"] if "source" in pf.schema_arrow.names else None
        size = int((store.read_meta(self.path).get("settings") or {}).get("size", 224))
        handles = slides.process_handles()
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        cached: tuple[int, list] = (-1, [])
        for b in range(worker, len(self.batches), workers):
            crops = []
            for row in self.batches[b]:
                group = int(np.searchsorted(starts, row, side="right")) - 1
                if cached[0] != group:
                    if slide_cols is None:
                        cached = (group, [(p,) for p in
                                          pf.read_row_group(group, columns=["png"])["png"].to_pylist()])
                    else:
                        t = pf.read_row_group(group, columns=slide_cols)
                        cached = (group, list(zip(*(t[c].to_pylist() for c in slide_cols))))
                item = cached[1][row - starts[group]]
                if item[0] is None and len(item) > 1 and item[1] is not None:
                    _, source, level, x0, y0, x1 = item
                    try:
                        crops.append(slides.read_patch_at(source, handles, x0, y0, level, x1 - x0, size))
                    except UserError as e:  # a damaged slide: named by the caller, never a worker's traceback
                        yield b, (str(e.path or source), e.problem, e.hint or "")
                        return
                    continue
                try:
                    crops.append(decode_png(item[0]))
                except (ValueError, TypeError):
                    yield b, int(row)  # the caller names the bad crop
                    return
            yield b, torch.from_numpy(np.stack(crops))


def raise_batch_problem(item, index: CropIndex | None) -> None:
    """Stop with a clear message when a batch came back as an unreadable crop or slide patch."""
    if isinstance(item, tuple):
        path, problem, hint = item
        raise UserError(problem, path=Path(path), hint=hint or None)
    if isinstance(item, int):
        raise UserError(f"crop {index.crop_index[item]} of {index.ids[item]} ({index.splits[item]}) is not a "
                        "readable PNG", path=index.path, hint="re-run `histoembed crops` (delete the file first)")


def check_slides_unchanged(crops_path: Path) -> None:
    """Stop when a slide the crops file reads patches from is gone or its bytes changed since `crops`.

    The slide's stamp recorded by crops (``content_stamps``) is trusted while its size and modification
    time are unchanged, as for images; otherwise the slide is stamped again and compared.
    """
    if "source" not in pq.read_schema(crops_path).names:
        return
    cache = store.read_meta(crops_path).get("content_stamps") or {}
    sources = pq.read_table(crops_path, columns=["source"])["source"].unique().to_pylist()
    stamp = store.ContentStamps(cache)
    for source in sources:
        if source is None:
            continue
        if not Path(source).exists():
            raise UserError("slide not found (it was cut by `histoembed crops`, then moved or deleted)",
                            path=Path(source), hint="put it back, or re-run `histoembed crops`")
        recorded = cache.get(str(Path(source).resolve()))
        if recorded is None or stamp(source) != recorded[2]:
            raise UserError("slide changed since `histoembed crops` cut its patches", path=Path(source),
                            hint="re-run `histoembed crops`, then `histoembed embed`")


# ---------------------------------------------------------------- the store

@dataclass
class EmbedResult:
    store_dir: Path
    encoder: str
    dim: int
    rows: int          # rows this shard holds now (new and resumed)
    new_rows: int      # rows embedded by this call
    skipped: bool      # True: everything was already embedded with these settings
    removed_parts: int  # parts of other settings that were removed
    seconds: float
    precision_check: PrecisionCheck | None = None
    stain_norm: str = "none"
    stain: dict | None = None  # stain.store_summary of the store: crops normalised, crops passed through unchanged


def views_of(split: str, settings: EmbedSettings) -> list[int]:
    return store.views_of(split, settings.repeats, settings.tta)


def sized(settings: EmbedSettings, encoder: Encoder | None) -> EmbedSettings:
    """``settings`` with ``batch_size`` and ``workers`` set: those left unset are chosen from the GPU's free
    memory, the encoder's size and the usable CPUs for an encoder on CUDA (said once on the console), and
    take the CPU defaults otherwise. Values given (options, histoembed.toml) are kept as they are."""
    if settings.batch_size is not None and settings.workers is not None:
        return settings
    chosen = Sizes(CPU_BATCH_SIZE, CPU_WORKERS, "the CPU defaults")
    if encoder is not None and encoder.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(encoder.device)
        params = sum(p.numel() for p in encoder.module.parameters())
        chosen = cuda_sizes(free, params, encoder.dim, encoder.size, cpus.usable_cpus(), views=settings.repeats)
    update = {k: getattr(chosen, k) for k in ("batch_size", "workers") if getattr(settings, k) is None}
    if encoder is not None and encoder.device.type == "cuda":
        said = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in update.items())
        console.print(f"chose {said} for {encoder.name} on {torch.cuda.get_device_name(encoder.device)}: "
                      f"{chosen.why} (set them to override)", soft_wrap=True)
    return settings.model_copy(update=update)


def configured(encoder: Encoder, settings: EmbedSettings) -> Encoder:
    """``encoder`` compiled or not as ``settings`` say, for batches of ``settings.batch_size`` crops (``sized``)."""
    return dataclasses.replace(encoder, compile=settings.compile, fixed_batch=settings.batch_size)


def plan_batches(rows: list[int], splits: list[str], batch_size: int) -> list[np.ndarray]:
    """Crop rows in batches that never mix splits, so each batch has one list of views."""
    out = []
    for split in ("train", "test"):
        mine = [r for r in rows if splits[r] == split]
        out += [np.array(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    return out


def checked_encoder(encoder: Encoder, crops_path: Path, rows: list[int],
                    settings: EmbedSettings) -> tuple[Encoder, PrecisionCheck | None]:
    """The encoder to embed with, after comparing its precision with fp32 on the crops ``rows`` when asked.

    Default: checked when a GPU runs below fp32, in fp8 or compiled (against eager fp32). A failed
    check stops the run, naming the figures, or with ``fallback_fp32`` returns the encoder in eager fp32.
    """
    below_fp32 = encoder.precision != "fp32" or encoder.compile
    wanted = (settings.check_precision if settings.check_precision is not None
              else encoder.device.type == "cuda" or encoder.compile or encoder.precision == "fp8")
    if not wanted or not below_fp32 or not rows:
        return encoder, None
    _, crops = next(iter(CropBatches(crops_path, [np.asarray(rows)])))
    if not isinstance(crops, torch.Tensor):
        return encoder, None  # the embedding loop names the unreadable crop
    x = crops.to(encoder.device).permute(0, 3, 1, 2).float().div_(255)
    check = check_precision(encoder, x, settings.precision_threshold)
    if check.passed:
        return encoder, check
    if settings.fallback_fp32:
        return encoder.with_precision("fp32"), dataclasses.replace(check, fallback=True)
    raise UserError(f"encoder {encoder.name} in {check.precision} is not close to fp32 on real crops: "
                    f"{check.summary()}",
                    hint="embed in fp32 (--precision fp32), or add --fallback-fp32 to fall back by itself")


def store_key(encoder: Encoder, settings: EmbedSettings, augment: AugmentSettings,
              normaliser: stain.StainNormaliser | None = None) -> str:
    """What decides a crop's features besides its pixels: weights, pooling, precision, views, augmentation, and
    the stain normalisation's target (its values: the same stain from another file keys the same).

    The crops themselves are matched one by one by their PNG digest (``crop_hash``), so a
    re-cut of some images re-embeds only the crops whose pixels changed.
    """
    if normaliser is None:  # the stain thresholds change nothing then
        settings = settings.model_copy(update={"stain_min_tissue": EmbedSettings().stain_min_tissue})
    return store.stage_key("embed", STORE_VERSION, settings, encoder.encoder_id, encoder.weights_hash,
                           encoder.pool, encoder.size, encoder.precision,
                           output_settings(augment) if settings.repeats > 1 else None,
                           normaliser.target.key() if normaliser else None)


Crop = tuple[str, str, int, str]  # split, image id, crop index, digest of its PNG
RUN_ID_FILE = ".ray-run"  # the Ray run that may add parts to a store now (see histoembed.engines.ray)


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
    for p in store.feature_parts(store_dir):
        if store.read_meta(p).get("key") != key or store.CROP_HASH not in pq.read_schema(p).names:
            p.unlink(missing_ok=True)
            removed += 1
            continue
        t = pq.read_table(p, columns=["split", "image_id", "crop_index", store.CROP_HASH])
        crops = list(zip(*(t[c].to_pylist() for c in ("split", "image_id", "crop_index", store.CROP_HASH))))
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


PART_OPTIONS = dict(compression="zstd", use_byte_stream_split=["embedding.list.element"])


def write_part(table: pa.Table, path: Path) -> None:
    """Write one whole part atomically (a temporary, renamed into place when complete)."""
    with store.atomic_path(path) as tmp:
        pq.write_table(table, tmp, **PART_OPTIONS)


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
        self.stain: dict | None = None   # the open part's stain note (stain.note)

    def note_stain(self, note: dict) -> None:
        """Add ``note`` (``stain.note`` of a batch) to the part the next ``write`` goes to; its footer keeps it."""
        self.stain = stain.add_notes(self.stain, note)

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
                writer.add_key_value_metadata({stain.SUMMARY_KEY: json.dumps(self.stain)})
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


def part_rows(ids: list[str], splits: list[str], crop_index: list[int], views: list[int], feats: torch.Tensor,
          schema: pa.Schema, digests: list[str] | None = None) -> pa.Table:
    """Crop-major rows of features [B, V, D] (with each crop's PNG digest when the schema has the column)."""
    b, v, d = feats.shape
    value_type = schema.field("embedding").type.value_type
    values = pa.array(feats.reshape(-1).numpy().astype(value_type.to_pandas_dtype(), copy=False))
    return pa.Table.from_arrays([
        pa.array(np.repeat(ids, v), pa.string()),
        pa.array(np.repeat(splits, v), pa.string()),
        pa.array(np.repeat(crop_index, v), pa.int32()),
        pa.array(np.tile(views, b), pa.int16()),
        pa.FixedSizeListArray.from_arrays(values, d),
        *([pa.array(np.repeat(digests, v), pa.string())] if store.CROP_HASH in schema.names else []),
    ], schema=schema)


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


def open_store(store_dir: Path, key: str, index: CropIndex, mine: list[int], settings: EmbedSettings, encoder: str,
               dim: int, check: PrecisionCheck | None, run_id: str | None = None) -> tuple[list[int], EmbedResult]:
    """(rows of ``mine`` still to embed, the result so far) once the store holds only crops of ``key``.

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
    rows_of = {s: len(views_of(s, settings)) for s in ("train", "test")}
    total_rows = sum(rows_of[index.splits[r]] for r in mine)
    return todo, EmbedResult(store_dir, encoder, dim, total_rows - sum(rows_of[index.splits[r]] for r in todo), 0,
                             not todo, removed, 0.0, check, settings.stain_norm)


def store_meta(encoder: Encoder, settings: EmbedSettings, augment: AugmentSettings, key: str, crops_key: str | None,
               check: PrecisionCheck | None, shard: str, normaliser: stain.StainNormaliser | None = None) -> dict:
    """The provenance every part of a store carries in its schema metadata (``key`` decides what is kept)."""
    return {"key": key, "encoder": encoder.name, "encoder_id": encoder.encoder_id,
            "weights_hash": encoder.weights_hash, "dim": encoder.dim, "pool": encoder.pool, "size": encoder.size,
            "precision": encoder.precision, "repeats": settings.repeats, "tta": settings.tta, "seed": settings.seed,
            "augment": augment.model_dump(), "store_dtype": settings.store_dtype, "crops_key": crops_key,
            "shard": shard, "package_version": __version__, "precision_check": check.as_meta() if check else None,
            "stain": stain.as_meta(normaliser)}


def part_schema(encoder: Encoder, settings: EmbedSettings, meta: dict) -> pa.Schema:
    return store.with_meta(store.feature_schema(encoder.dim, settings.store_dtype, crop_hash=True), meta)

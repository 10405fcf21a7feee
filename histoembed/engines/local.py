"""The local engine: the crops and embed stages' work on this machine.

crops: one image per worker process (or all in this process). embed: DataLoader workers decode
the crops of each batch, this process queues the batch's views on the encoder's device and
writes the previous batch's rows while the device works; one process per shard holds the
shard's lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from histoembed.core import cpus, store
from histoembed.core.console import progress

if TYPE_CHECKING:
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.engines.seams import EmbedResult
    from histoembed.models.encoders import Encoder


@contextlib.contextmanager
def map_ordered(fn: Callable, items: Sequence, workers: int, initializer: Callable | None = None) -> Iterator[Iterator]:
    """``fn`` of every item, in the items' order, in up to ``workers`` spawned processes (or this one)."""
    workers = min(workers, len(items))
    if workers <= 1:
        yield map(fn, items)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer) as pool:
        try:
            yield pool.map(fn, items, chunksize=max(1, min(8, len(items) // (workers * 4))))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_embed(run: Path, settings: EmbedSettings, augment: AugmentSettings, shard: tuple[int, int] = (0, 1),
              encoder: Encoder | None = None) -> EmbedResult:
    """Embed this shard's crops of ``run/crops.parquet`` into ``run/features/<encoder>/`` with this machine's
    processes (DataLoader workers decode, this process runs the encoder); resume if interrupted.
    """
    import torch  # torch and the encoders: loaded only to embed, not to crop

    from histoembed.engines.seams import (
        CropBatches,
        CropIndex,
        PartWriter,
        check_finite,
        check_slides_unchanged,
        checked_encoder,
        configured,
        sized,
        copy_to_host,
        open_store,
        part_rows,
        part_schema,
        plan_batches,
        queue_batch,
        raise_batch_problem,
        shard_lock,
        stop_for_tests,
        store_key,
        store_meta,
        views_of,
    )
    from histoembed.maths import stain
    from histoembed.models.encoders import load_encoder

    started = time.perf_counter()
    index = CropIndex.read(run)
    crops_path = index.path
    check_slides_unchanged(crops_path)
    if encoder is None:
        encoder = load_encoder(settings.encoder, settings.pool, settings.device, settings.precision)
    if encoder.device.type == "cpu":
        cpus.use_threads(settings.threads)
    settings = sized(settings, encoder)
    encoder = configured(encoder, settings)
    ids, splits, crop_index, digests = index.ids, index.splits, index.crop_index, index.digests
    mine = [r for r in range(len(ids)) if r % shard[1] == shard[0]]
    encoder, check = checked_encoder(encoder, crops_path, mine[:settings.batch_size], settings)
    normaliser = stain.for_run(run, settings.stain_norm, settings.stain_target, settings.stain_min_tissue,
                               encoder.device)
    key = store_key(encoder, settings, augment, normaliser)
    store_dir = Path(run) / store.FEATURES_DIR / encoder.slug
    with shard_lock(store_dir, shard):
        todo, result = open_store(store_dir, key, index, mine, settings, encoder.name, encoder.dim, check)
        if not todo:
            result.stain = stain.store_summary(store_dir) if normaliser else None
            result.seconds = time.perf_counter() - started
            return result

        batches = plan_batches(todo, splits, settings.batch_size)
        schema = part_schema(encoder, settings,
                             store_meta(encoder, settings, augment, key, index.key, check, f"{shard[0]}/{shard[1]}",
                                        normaliser))
        workers = min(settings.workers, len(batches))
        loader = torch.utils.data.DataLoader(
            CropBatches(crops_path, batches), batch_size=None, num_workers=workers,
            pin_memory=encoder.device.type == "cuda")
        writer = PartWriter(store_dir, shard, schema, settings.rows_per_part)
        bar_context = progress("crops")
        try:
            with bar_context as bar:
                job = bar.add_task(f"embed {encoder.name}", total=len(todo)) if bar else None
                pending = None  # the previous batch: written once this one is queued on the device
                written = 0

                def write(batch) -> None:
                    nonlocal written
                    bid, bsplit, bcidx, bhash, views, unchanged, feats, copied = batch
                    if copied is not None:
                        copied.synchronize()
                    check_finite(feats, bid, bcidx, views, bsplit, encoder.name)
                    if unchanged is not None:
                        writer.note_stain(stain.note(unchanged, bsplit, bid, bcidx))
                    writer.write(part_rows(bid, bsplit, bcidx, views, feats, schema, bhash))
                    result.rows += len(bid) * len(views)
                    result.new_rows += len(bid) * len(views)
                    if bar:
                        bar.advance(job, len(bid))
                    written += 1
                    stop_for_tests(written)

                for b, crops in loader:
                    if not isinstance(crops, torch.Tensor):
                        raise_batch_problem(crops, index)
                    rows = batches[b]
                    bid, bsplit, bcidx, bhash = ([col[r] for r in rows] for col in (ids, splits, crop_index, digests))
                    views = views_of(bsplit[0], settings)
                    feats = queue_batch(encoder, crops, bid, bcidx, views, settings, augment, normaliser)
                    unchanged = normaliser.last_unchanged if normaliser else None
                    queued = (bid, bsplit, bcidx, bhash, views, unchanged, *copy_to_host(feats))
                    if pending is not None:
                        write(pending)
                    pending = queued
                if pending is not None:
                    write(pending)
            writer.commit()
            result.stain = stain.store_summary(store_dir) if normaliser else None
        except KeyboardInterrupt:
            writer.commit()  # the part holds whole crops only: keep them
            raise
        except BaseException:
            writer.discard()
            raise
        result.seconds = time.perf_counter() - started
        return result

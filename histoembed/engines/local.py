"""The local engine: the crops and embed stages' work on this machine.

crops: one image per worker process (or all in this process). embed: DataLoader workers decode
the crops of each batch, this process queues the batch's views on the encoder's device and
writes the previous batch's rows while the device works; one process per shard holds the
shard's lock.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from histoembed.core import cpus, feature_store, store
from histoembed.core.console import progress
from histoembed.engines.base import EmbedResult

if TYPE_CHECKING:
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.maths.stain import StainNormaliser
    from histoembed.models.encoders import Encoder


def session(address: str | None) -> contextlib.AbstractContextManager[None]:
    """Nothing to open for a command on this machine (``address`` is Ray's)."""
    return contextlib.nullcontext()


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
    from histoembed.engines import forward  # torch and the encoders: loaded only to embed, not to crop
    from histoembed.engines.batches import check_slides_unchanged
    from histoembed.maths import stain
    from histoembed.models.encoders import load_encoder

    started = time.perf_counter()
    index = feature_store.CropIndex.read(run)
    check_slides_unchanged(index.path)
    if encoder is None:
        encoder = load_encoder(settings.encoder, settings.pool, settings.device, settings.precision)
    if encoder.device.type == "cpu":
        cpus.use_threads(settings.threads)
    settings = forward.sized(settings, encoder)
    encoder = forward.configured(encoder, settings)
    mine = [r for r in range(len(index.ids)) if r % shard[1] == shard[0]]
    encoder, check = forward.checked_encoder(encoder, index.path, mine[:settings.batch_size], settings)
    normaliser = stain.for_run(run, settings.stain_norm, settings.stain_target, settings.stain_min_tissue,
                               encoder.device)
    key = feature_store.store_key(encoder, settings, augment, stain.target_key(normaliser))
    store_dir = Path(run) / store.FEATURES_DIR / encoder.slug
    with feature_store.shard_lock(store_dir, shard):
        plan = feature_store.open_store(store_dir, key, index, mine, settings)
        result = EmbedResult.planned(plan, encoder.name, encoder.dim, check, settings.stain_norm)
        if plan.todo:
            meta = feature_store.store_meta(encoder, settings, augment, key, index.key,
                                            check.as_meta() if check else None, f"{shard[0]}/{shard[1]}",
                                            stain.as_meta(normaliser))
            writer = feature_store.PartWriter(store_dir, shard,
                                              feature_store.part_schema(encoder.dim, settings.store_dtype, meta),
                                              settings.rows_per_part)
            try:
                _embed(index, plan.todo, encoder, settings, augment, normaliser, writer, result)
                writer.commit()
            except KeyboardInterrupt:
                writer.commit()  # the part holds whole crops only: keep them
                raise
            except BaseException:
                writer.discard()
                raise
        result.stain = feature_store.stain_summary(store_dir) if normaliser else None
    result.seconds = time.perf_counter() - started
    return result


def _embed(index: feature_store.CropIndex, todo: list[int], encoder: Encoder, settings: EmbedSettings,
           augment: AugmentSettings, normaliser: StainNormaliser | None, writer: feature_store.PartWriter,
           result: EmbedResult) -> None:
    """The crops ``todo`` through the encoder into ``writer``'s parts: DataLoader workers decode the batches,
    and each batch's rows are written while the device works on the next one."""
    import torch

    from histoembed.engines import forward
    from histoembed.engines.base import stop_for_tests
    from histoembed.engines.batches import CropBatches, end_with_parent, plan_batches, raise_batch_problem, unit_of

    ids, splits, crop_index, digests = index.ids, index.splits, index.crop_index, index.digests
    batches = plan_batches(todo, splits, settings.batch_size)
    loader = torch.utils.data.DataLoader(  # workers die with this process, not seconds after a kill
        CropBatches(index.path, batches), batch_size=None, num_workers=min(settings.workers, len(batches)),
        pin_memory=encoder.device.type == "cuda", worker_init_fn=functools.partial(end_with_parent, os.getpid()))
    with progress(unit_of(index.path)) as bar:
        job = bar.add_task(f"embed {encoder.name}", total=len(todo)) if bar else None
        pending = None  # the previous batch: written once this one is queued on the device
        written = 0

        def write(batch) -> None:
            nonlocal written
            bid, bsplit, bcidx, bhash, views, unchanged, feats, copied = batch
            if copied is not None:
                copied.synchronize()
            forward.check_finite(feats, bid, bcidx, views, bsplit, encoder.name)
            if unchanged is not None:
                writer.note_stain(feature_store.stain_note(unchanged.cpu().numpy(), bsplit, bid, bcidx))
            writer.write(feature_store.part_rows(bid, bsplit, bcidx, views, feats.numpy(), writer.schema, bhash))
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
            views = feature_store.views_of(bsplit[0], settings.repeats, settings.tta)
            feats = forward.queue_batch(encoder, crops, bid, bcidx, views, settings, augment, normaliser)
            unchanged = normaliser.last_unchanged if normaliser else None
            queued = (bid, bsplit, bcidx, bhash, views, unchanged, *forward.copy_to_host(feats))
            if pending is not None:
                write(pending)
            pending = queued
        if pending is not None:
            write(pending)

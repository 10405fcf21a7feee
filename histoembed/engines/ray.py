"""The ``ray`` engine: the crops and embed stages over a Ray cluster, writing what the local engine writes.

embed: the driver plans the crops still to embed in units of about ``rows_per_part`` rows (one
Ray block each); CPU tasks read each unit's PNGs from ``crops.parquet`` and decode them; a pool
of actors (``ray.data.ActorPoolStrategy``: one GPU each when the cluster has GPUs, CPU actors
otherwise) holds the encoder, embeds every batch with :func:`histoembed.engines.forward.queue_batch`
(what the local loop calls) and writes each unit as one part of the same store through
:mod:`histoembed.core.feature_store`, with the same schema, key and metadata, so every later stage
reads it as it reads a local store. The connection itself is :mod:`histoembed.engines.ray_session`'s.

Exactly once:

- A part is named from what it holds, ``part-ray-<digest of the store key and its sorted crops>``,
  and written atomically (a temporary, renamed into place). A task Ray retries after its actor
  died rewrites the same part with the same rows rather than adding one.
- The driver plans the work as the local engine does: under the store's lock, parts of other
  settings go and the crops still to embed are an anti-join of ``crops.parquet`` on the store's
  own index, so a re-run after the driver was killed skips what finished parts hold.
- Each run writes a run id into the store (``.ray-run``); an actor renames a part into place only
  while the id is its run's, so an actor outliving a killed driver cannot add rows behind a re-run
  (or a local run, which removes the id) that already counted its crops as missing.
- At the end the driver checks the store's index: every crop view once, none missing.

crops: one Ray task per image, each running the function the stage gives ``map_ordered``
(:func:`histoembed.stages.crops._crop_one`, what the local worker processes run); the driver writes
``crops.parquet`` in the images' order as before.

Ray moves data between processes with its own in-memory serialisation; nothing it pickles is
written to the run folder. The run folder (and a model given as a folder) must be on a file
system every node sees at the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from histoembed.core import cpus, feature_store, store
from histoembed.core.config import AugmentSettings, EmbedSettings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.core.feature_store import CropIndex
from histoembed.engines import forward
from histoembed.engines.base import EmbedResult, stop_for_tests
from histoembed.engines.batches import (CropBatches, SlideProblem, check_slides_unchanged, raise_batch_problem,
                                        unit_of)
from histoembed.engines.ray_session import quiet, ray_module, session, user_errors
from histoembed.maths import stain
from histoembed.models.encoders import Encoder, load_encoder
from histoembed.models.precision import PrecisionCheck

RETRIES = 3            # retries of a crop task whose process died
ACTOR_START_S = 900    # the encoder actors must all be up within this (model loading included)
PART_PREFIX = "part-ray-"
RUN_ID_FILE = feature_store.RUN_ID_FILE
# Test hook, acting in an encoder actor right after it wrote its N-th part, before returning it:
# "N:exit:MARKER": the first actor to get there creates MARKER and its process exits (Ray restarts it
# and retries the task, which rewrites that part); "N:stall": every actor stops there for good, so a
# killed driver leaves work undone; "N:wait:K": it waits until the store holds K parts (at most
# TEST_WAIT_S), so with K = 2 after its 1st part another actor must have written one. Tests place
# kills and spread work this way, never by timing.
ACTOR_HOOK_ENV = "HISTOEMBED_TEST_RAY_ACTOR_AFTER_PARTS"
TEST_WAIT_S = 120


# ---------------------------------------------------------------- crops

@contextlib.contextmanager
def map_ordered(fn: Callable, items: Sequence, workers: int, initializer: Callable | None = None) -> Iterator[Iterator]:
    """``fn`` of every item as Ray tasks over the cluster, results in order, a bounded number in flight.

    Each task runs ``initializer`` before ``fn`` (a task's process runs one item at a time); ``workers``
    counts the local engine's processes: here the cluster's CPUs decide. Inside ``session``.
    """
    results = _ordered(fn, items, initializer)
    try:
        yield results
    finally:
        results.close()  # the tasks still in flight are cancelled


def _initialized(initializer: Callable | None, fn: Callable, item):
    if initializer is not None:
        initializer()
    return fn(item)


def _ordered(fn: Callable, items: Iterable, initializer: Callable | None) -> Iterator:
    ray = ray_module()
    task = ray.remote(max_retries=RETRIES)(_initialized)
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    try:
        with user_errors():
            for item in items:
                pending.append(task.remote(initializer, fn, item))
                if len(pending) >= window:
                    yield ray.get(pending.popleft())
            while pending:
                yield ray.get(pending.popleft())
    finally:
        for ref in pending:
            ray.cancel(ref)


# ---------------------------------------------------------------- embed

@dataclass
class _Resolved:
    """What the encoder turned out to be where it runs: decides the store's folder and key."""

    key: str
    slug: str
    name: str
    dim: int
    precision: str
    compile: bool             # after the precision check (a fallback runs eager)
    check: PrecisionCheck | None


def _resolve(encoder: Encoder | None, settings: EmbedSettings, augment: AugmentSettings, crops_path: Path,
             rows: list[int], normaliser: stain.StainNormaliser | None = None) -> tuple[_Resolved, Encoder]:
    """Load (unless given) and check the encoder as the local engine does; run where the actors run."""
    if encoder is None:
        encoder = load_encoder(settings.encoder, settings.pool, settings.device, settings.precision)
    encoder = forward.configured(encoder, settings)
    encoder, check = forward.checked_encoder(encoder, crops_path, rows, settings)
    key = feature_store.store_key(encoder, settings, augment, stain.target_key(normaliser))
    return _Resolved(key, encoder.slug, encoder.name, encoder.dim, encoder.precision, encoder.compile, check), encoder


def _resolve_on_driver(settings: EmbedSettings, augment: AugmentSettings, crops_path: Path, rows: list[int],
           normaliser: stain.StainNormaliser | None) -> _Resolved:
    return _resolve(None, settings, augment, crops_path, rows, normaliser)[0]


@dataclass
class _Job:
    """What every encoder actor of one run gets."""

    settings: EmbedSettings
    augment: AugmentSettings
    store_dir: Path
    resolved: _Resolved
    crops_key: str | None
    run_id: str
    test_hook: str | None  # ACTOR_HOOK_ENV's value on the driver
    normaliser: stain.StainNormaliser | None = None  # its target computed once, on the driver


def part_name(key: str, crops: Iterable[tuple]) -> str:
    """A part's file name from the store key and the crops it holds, in any order."""
    return f"{PART_PREFIX}{store.config_key(key, sorted(crops))}.parquet"


class _EmbedActor:
    """One encoder, loaded once per actor: each call embeds one Ray batch of decoded crops into one part."""

    def __init__(self, job: _Job, encoder: Encoder | None = None):
        import ray

        self.job, self.parts = job, 0
        s = job.settings
        if encoder is None:
            encoder = load_encoder(s.encoder, s.pool, s.device, job.resolved.precision)
        encoder = dataclasses.replace(forward.configured(encoder, s), compile=job.resolved.compile)
        if encoder.device.type == "cpu":
            cpus.use_threads(s.threads)
        self.encoder = encoder
        self.key = feature_store.store_key(encoder, s, job.augment, stain.target_key(job.normaliser))
        check = job.resolved.check.as_meta() if job.resolved.check else None
        meta = feature_store.store_meta(encoder, s, job.augment, job.resolved.key, job.crops_key, check, "0/1",
                                        stain.as_meta(job.normaliser))
        meta.update(engine="ray", ray_node=ray.get_runtime_context().get_node_id())
        self.schema = feature_store.part_schema(encoder.dim, s.store_dtype, meta)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.key != self.job.resolved.key:  # checked here, not at start-up, so the message reaches the driver
            raise UserError(f"encoder {self.encoder.name} on this Ray node differs from the one the run was planned "
                            f"with (store key {self.key}, expected {self.job.resolved.key}): other weights or "
                            "software", hint="give every node the same model files and histoembed version")
        ids, splits = batch["image_id"].tolist(), batch["split"].tolist()
        crop_index, digests = batch["crop_index"].tolist(), batch["crop_hash"].tolist()
        if not ids:
            return {"part": np.array([], object), "crops": np.array([], np.int64), "rows": np.array([], np.int64)}
        tables, note = self._tables(batch["pixels"], ids, splits, crop_index, digests)
        table = feature_store.with_stain_note(pa.concat_tables(tables), note)  # crops left as they were
        name = part_name(self.job.resolved.key, zip(splits, ids, crop_index, digests))
        feature_store.write_part(table, self.job.store_dir / name, run_id=self.job.run_id)
        self.parts += 1
        self._hook_for_tests()
        return {"part": np.array([name], object), "crops": np.array([len(ids)]), "rows": np.array([len(table)])}

    def _tables(self, pixels: np.ndarray, ids: list, splits: list, crop_index: list,
                digests: list) -> tuple[list[pa.Table], dict | None]:
        """The batch's rows, split by split (each has its views) and cut into batches of ``batch_size`` crops,
        and its stain note (``feature_store.stain_note``; None without stain normalisation)."""
        s, out, pending, note = self.job.settings, [], None, None

        def rows(done) -> pa.Table:
            nonlocal note
            sel, views, unchanged, feats, copied = done
            if copied is not None:
                copied.synchronize()
            bid, bsplit, bcidx, bhash = ([col[i] for i in sel] for col in (ids, splits, crop_index, digests))
            forward.check_finite(feats, bid, bcidx, views, bsplit, self.encoder.name)
            if unchanged is not None:
                note = feature_store.add_stain_notes(
                    note, feature_store.stain_note(unchanged.cpu().numpy(), bsplit, bid, bcidx))
            return feature_store.part_rows(bid, bsplit, bcidx, views, feats.numpy(), self.schema, bhash)

        for split in dict.fromkeys(splits):
            mine = [i for i, sp in enumerate(splits) if sp == split]
            views = feature_store.views_of(split, s.repeats, s.tta)
            for start in range(0, len(mine), s.batch_size):
                sel = mine[start:start + s.batch_size]
                crops = torch.from_numpy(np.ascontiguousarray(pixels[sel]))  # a copy: the batch is read-only
                feats = forward.queue_batch(self.encoder, crops, [ids[i] for i in sel], [crop_index[i] for i in sel],
                                            views, s, self.job.augment, self.job.normaliser)
                unchanged = self.job.normaliser.last_unchanged if self.job.normaliser else None
                queued = (sel, views, unchanged, *forward.copy_to_host(feats))
                if pending is not None:
                    out.append(rows(pending))  # while the device works on the next batch
                pending = queued
        out.append(rows(pending))
        return out, note

    def _hook_for_tests(self) -> None:
        if not self.job.test_hook:
            return
        n, action, *marker = self.job.test_hook.split(":", 2)
        if self.parts != int(n):
            return
        if action == "stall":
            while True:  # until the job's end kills this actor
                time.sleep(1)
        if action == "wait":
            deadline = time.monotonic() + TEST_WAIT_S
            while len(feature_store.feature_parts(self.job.store_dir)) < int(marker[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        try:
            os.close(os.open(marker[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # a restarted actor: it died once already
        os._exit(1)


def _decode(batch: dict[str, np.ndarray], crops_path: str) -> dict[str, np.ndarray]:
    """A CPU task: the crops of one unit (rows of crops.parquet) decoded to uint8 [B, H, W, 3]."""
    rows = batch["row"]
    _, crops = next(iter(CropBatches(Path(crops_path), [rows])))
    if isinstance(crops, SlideProblem):  # a slide patch that cannot be read: the slide is named
        raise_batch_problem(crops, None)
    if isinstance(crops, int):
        i = int(np.flatnonzero(rows == crops)[0])
        raise UserError(f"crop {batch['crop_index'][i]} of {batch['image_id'][i]} ({batch['split'][i]}) is not a "
                        "readable PNG", path=crops_path, hint="re-run `histoembed crops` (delete the file first)")
    return {**batch, "pixels": crops.numpy()}


def _part_units(index: CropIndex, todo: list[int], per_part: int) -> list[pa.Table]:
    """The crops ``todo`` in units of ``per_part`` (one Ray block each, so actors share the work evenly)."""
    crops = index.crops()
    out = []
    for start in range(0, len(todo), per_part):
        rows = todo[start:start + per_part]
        split, image_id, crop_index, digest = zip(*(crops[r] for r in rows))
        out.append(pa.table({"row": pa.array(rows, pa.int64()), "image_id": pa.array(image_id, pa.string()),
                             "split": pa.array(split, pa.string()), "crop_index": pa.array(crop_index, pa.int32()),
                             "crop_hash": pa.array(digest, pa.string())}))
    return out


def _crop_shape(index: CropIndex, row: int) -> tuple[int, ...]:
    """The decoded shape of crop ``row`` (a crops file holds crops of one size)."""
    _, crops = next(iter(CropBatches(index.path, [np.array([row])])))
    if isinstance(crops, SlideProblem):
        raise_batch_problem(crops, index)
    if isinstance(crops, int):
        raise UserError(f"crop {index.crop_index[row]} of {index.ids[row]} ({index.splits[row]}) is not a readable "
                        "PNG", path=index.path, hint="re-run `histoembed crops` (delete the file first)")
    return tuple(crops.shape[1:])


@dataclass
class _ActorLayout:
    actors: int
    gpus: float  # per actor
    cpus: float  # per actor


def _layout(ray, settings: EmbedSettings, todo_parts: int) -> _ActorLayout:
    """How many encoder actors, each with what: one GPU each when the cluster has GPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    actors = max(1, min(settings.ray_actors or gpus or nodes, todo_parts))
    if gpus and actors > gpus:
        raise UserError(f"--ray-actors {actors}: the cluster has {gpus} GPU(s), one per actor",
                        hint=f"pass --ray-actors {gpus} or fewer (0: one per GPU)")
    left = resources.get("CPU", 0) - actors * settings.ray_actor_cpus
    if left < 1:
        raise UserError(f"{actors} encoder actor(s) of {settings.ray_actor_cpus:g} CPU(s) each would leave "
                        f"{max(left, 0):g} of the cluster's {resources.get('CPU', 0):g} CPUs to decode crops: "
                        "the run would wait forever", hint="lower --ray-actors or --ray-actor-cpus")
    return _ActorLayout(actors, 1.0 if gpus else 0.0, settings.ray_actor_cpus)


def part_crops(settings: EmbedSettings) -> int:
    """Crops per Ray batch, i.e. per part: about ``rows_per_part`` rows, whole encoder batches."""
    settings = forward.sized(settings, None)  # an unset batch size: the CPU default, as in run_embed
    per_part = max(1, settings.rows_per_part // settings.repeats)
    return settings.batch_size * max(1, round(per_part / settings.batch_size))


def check_store(store_dir: Path, expected: int) -> None:
    """Stop unless the store holds ``expected`` rows, each (split, image, crop, view) once."""
    tables = [pq.read_table(p, columns=list(feature_store.ROW_KEY)) for p in feature_store.feature_parts(store_dir)]
    index = pa.concat_tables(tables) if tables else pa.table({c: [] for c in feature_store.ROW_KEY})
    unique = index.group_by(list(feature_store.ROW_KEY)).aggregate([]).num_rows
    if unique != index.num_rows or unique != expected:
        raise UserError(f"after the Ray run the store holds {index.num_rows} rows, {unique} distinct, where "
                        f"{expected} were expected", path=store_dir,
                        hint="another process wrote to this store meanwhile; re-run `histoembed embed`")


def run_embed(run: Path, settings: EmbedSettings, augment: AugmentSettings, shard: tuple[int, int] = (0, 1),
              encoder: Encoder | None = None) -> EmbedResult:
    """``histoembed.stages.embed.run_embed`` on Ray: the same store, written in parts named from their crops."""
    if shard != (0, 1):
        raise UserError(f"--shard {shard[0]}/{shard[1]} splits the crops by hand; --engine ray spreads them over the "
                        "cluster itself", hint="drop --shard (and torchrun) with --engine ray")
    started = time.perf_counter()
    settings = forward.sized(settings, None)  # unset sizes: the CPU defaults (actors may sit on other machines)
    index = CropIndex.read(run)
    check_slides_unchanged(index.path)
    mine = list(range(len(index.ids)))
    normaliser = stain.for_run(run, settings.stain_norm, settings.stain_target, settings.stain_min_tissue,
                               torch.device("cpu"))
    with session(settings.ray_address), user_errors():
        ray = ray_module()
        first = mine[:settings.batch_size]
        if encoder is None and ray.cluster_resources().get("GPU", 0):
            # Load and check the encoder where the actors will run (a GPU), to fix the store's key.
            probe = ray.remote(num_gpus=1, num_cpus=settings.ray_actor_cpus, max_retries=RETRIES)(_resolve_on_driver)
            resolved = ray.get(probe.remote(settings, augment, index.path, first, normaliser))
        else:  # CPU actors: this process resolves it as they will (the actors check that their key agrees)
            resolved, checked = _resolve(encoder, settings, augment, index.path, first, normaliser)
            encoder = checked if encoder is not None else None  # a given encoder goes to the actors as checked
        store_dir = Path(run) / store.FEATURES_DIR / resolved.slug
        run_id = uuid.uuid4().hex
        with feature_store.shard_lock(store_dir, (0, 1)):
            plan = feature_store.open_store(store_dir, resolved.key, index, mine, settings, run_id=run_id)
            result = EmbedResult.planned(plan, resolved.name, resolved.dim, resolved.check, settings.stain_norm)
            if plan.todo:
                _embed_todo(ray, index, plan.todo, settings, augment, store_dir, resolved, run_id, encoder, result,
                            normaliser)
                check_store(store_dir, result.rows)
            result.stain = feature_store.stain_summary(store_dir) if normaliser else None
    result.seconds = time.perf_counter() - started
    return result


def _embed_todo(ray, index: CropIndex, todo: list[int], settings: EmbedSettings, augment: AugmentSettings,
                store_dir: Path, resolved: _Resolved, run_id: str, encoder: Encoder | None,
                result: EmbedResult, normaliser: stain.StainNormaliser | None = None) -> None:
    """Run the Ray Data pipeline over the crops ``todo``; count the parts as the actors finish them."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is below
    ctx.raise_original_map_exception = True  # a task's UserError reaches the user as it is
    per_part = part_crops(settings)
    layout = _layout(ray, settings, math.ceil(len(todo) / per_part))
    job = _Job(settings, augment, store_dir, resolved, index.key, run_id, os.environ.get(ACTOR_HOOK_ENV), normaliser)
    ctx.wait_for_min_actors_s = ACTOR_START_S  # every actor up before the first unit: the work is shared
    # Each decode task reserves the memory of its unit (PNG bytes, decoded crops and their copy in the
    # block); that also keeps Ray Data from fusing decoding into CPU actors of the same CPU count.
    unit_bytes = 3 * per_part * math.prod(_crop_shape(index, todo[0]))
    ds = ray.data.from_arrow(_part_units(index, todo, per_part))
    ds = ds.map_batches(_decode, fn_kwargs={"crops_path": str(index.path)}, batch_format="numpy",
                        memory=unit_bytes)
    # Ray Data restarts a dead actor and retries its task by default (max_restarts, max_task_retries -1).
    ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs={"job": job, "encoder": encoder},
                        compute=ray.data.ActorPoolStrategy(size=layout.actors, max_tasks_in_flight_per_actor=2),
                        batch_size=per_part, batch_format="numpy", num_gpus=layout.gpus, num_cpus=layout.cpus)
    try:
        with quiet("ray.data"):  # its plan, and the traceback of a task's error that the user gets as a message
            _count_parts(ds, result, len(todo), f"embed {resolved.name} (ray, {layout.actors} actor(s))",
                         unit_of(index.path))
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"the {layout.actors} encoder actor(s) did not all start within {ACTOR_START_S} s",
                        hint="check that the cluster has the GPUs/CPUs they need (`ray status`), or lower "
                             "--ray-actors") from None


def _count_parts(ds, result: EmbedResult, crops: int, what: str, unit: str = "crops") -> None:
    """Follow the actors' output: one row per part written, with its rows and crops."""
    parts: set[str] = set()
    with progress(unit) as bar:
        job_bar = bar.add_task(what, total=crops)
        # Each block as soon as an actor returns it (no prefetch: a block is not held back for the next).
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for name, rows, n in zip(block["part"], block["rows"], block["crops"]):
                if name in parts:  # a retried task's output, reported twice: the part was rewritten
                    continue
                parts.add(name)
                result.rows += int(rows)
                result.new_rows += int(rows)
                bar.advance(job_bar, int(n))
                stop_for_tests(len(parts))

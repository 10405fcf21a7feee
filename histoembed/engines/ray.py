"""The ``ray`` engine: the crops and embed stages over a Ray cluster, writing what the local engine writes.

embed: the driver plans the crops still to embed in units of about ``rows_per_part`` rows (one
Ray block each); CPU tasks read each unit's PNGs from ``crops.parquet`` and decode them; a pool
of actors (``ray.data.ActorPoolStrategy``: one GPU each when the cluster has GPUs, CPU actors
otherwise) holds the encoder, embeds every batch with :func:`histoembed.seams.queue_batch` (what
the local loop calls) and writes each unit as one part of the same store, with the same schema,
key and metadata, so every later stage reads it as it reads a local store.

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

crops: one Ray task per image, each running :func:`histoembed.stages.crops._crop_one` (what the local
worker processes run); the driver writes ``crops.parquet`` in the images' order as before.

Ray moves data between processes with its own in-memory serialisation; nothing it pickles is
written to the run folder. The run folder (and a model given as a folder) must be on a file
system every node sees at the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from histoembed.core import cpus, store
from histoembed.core.config import AugmentSettings, EmbedSettings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.engines import seams
from histoembed.engines.seams import CropIndex, EmbedResult
from histoembed.maths import stain
from histoembed.models.encoders import Encoder, load_encoder
from histoembed.models.precision import PrecisionCheck

INSTALL_HINT = "install the extra: pip install 'histoembed[ray]' (Ray Data 2.60), or run with --engine local"
RETRIES = 3            # retries of a crop task whose process died
ACTOR_START_S = 900    # the encoder actors must all be up within this (model loading included)
PART_PREFIX = "part-ray-"
RUN_ID_FILE = seams.RUN_ID_FILE
# Test hook, acting in an encoder actor right after it wrote its N-th part, before returning it:
# "N:exit:MARKER": the first actor to get there creates MARKER and its process exits (Ray restarts it
# and retries the task, which rewrites that part); "N:stall": every actor stops there for good, so a
# killed driver leaves work undone; "N:wait:K": it waits until the store holds K parts (at most
# TEST_WAIT_S), so with K = 2 after its 1st part another actor must have written one. Tests place
# kills and spread work this way, never by timing.
ACTOR_HOOK_ENV = "HISTOEMBED_TEST_RAY_ACTOR_AFTER_PARTS"
TEST_WAIT_S = 120


def _ray():
    """The ``ray`` module with Ray Data, or a clear message when the extra is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine ray needs Ray, which is not installed here ({e.msg})", hint=INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """A Ray connection for the command: join ``address`` (or RAY_ADDRESS), else start Ray on this machine.

    An already connected process (a notebook, a test) keeps its connection and it is not closed.
    """
    ray = _ray()
    if ray.is_initialized():
        yield
        return
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    # "local" always starts an instance of its own: Ray's default (None) would join any Ray it finds
    # running on this machine, another user's or another run's included.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        kwargs["num_cpus"] = cpus.usable_cpus()  # the CPUs this process may use
    previous = _signal_handlers()
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        _restore(previous)
        where = "this machine" if address == "local" else address
        raise UserError(f"cannot start or join Ray at {where} ({e})",
                        hint="start the cluster with `ray start --head` (and `ray start --address HEAD:6379` on "
                             "the other machines), then pass --ray-address auto or HEAD:6379") from None
    watchdog = _start_watchdog(ray) if address == "local" else None
    _interrupt_on_signals(previous)
    try:
        yield
    finally:
        try:
            ray.shutdown()
        finally:
            _restore(previous)
            if watchdog is not None:
                _stop_watchdog(watchdog)


SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def _signal_handlers() -> dict | None:
    """The handlers now installed, or None off the main thread (where none can be installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


def _interrupt_on_signals(previous: dict | None) -> None:
    """SIGTERM, SIGINT and SIGHUP raise KeyboardInterrupt, so ``session``'s ``ray.shutdown()`` runs.

    Killed by a signal's default action, the driver would leave the instance's agents and workers
    behind (Ray's own SIGTERM handler, set by ``ray.init``, is never taken back).
    """
    if previous is None:
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in SIGNALS:
        if previous[sig] is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, interrupt)


def _restore(previous: dict | None) -> None:
    for sig, handler in (previous or {}).items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _start_watchdog(ray) -> subprocess.Popen | None:
    """``histoembed.engines.ray_watchdog`` beside a local instance: it ends the instance if this process is killed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        return subprocess.Popen([sys.executable, "-m", "histoembed.engines.ray_watchdog", session_dir,
                                 os.path.dirname(ray.__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # it outlives a closed terminal's SIGHUP
    except (AttributeError, OSError):  # Ray's internals moved: no watchdog, Ray's own clean-up only
        return None


def _stop_watchdog(watchdog: subprocess.Popen) -> None:
    """Ray was shut down here: the watchdog leaves without killing anything."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        watchdog.communicate(b"done\n", timeout=10)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only critical log records of logger ``name`` (and its children) while inside."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def user_error(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, from inside Ray's wrappers (RayTaskError, Ray Data's), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Re-raise a task's UserError as itself, so the command prints it as one clear message."""
    try:
        yield
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise UserError(found.problem, path=found.path, hint=found.hint) from None


# ---------------------------------------------------------------- crops

def map_ordered(fn: Callable, items: Iterable) -> Iterator:
    """``map(fn, items)`` as Ray tasks over the cluster, results in order, a bounded number in flight."""
    ray = _ray()
    task = ray.remote(max_retries=RETRIES)(fn)
    window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    try:
        with _user_errors():
            for item in items:
                pending.append(task.remote(item))
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
    encoder = seams.configured(encoder, settings)
    encoder, check = seams.checked_encoder(encoder, crops_path, rows, settings)
    key = seams.store_key(encoder, settings, augment, normaliser)
    return _Resolved(key, encoder.slug, encoder.name, encoder.dim, encoder.precision, encoder.compile, check), encoder


def _probe(settings: EmbedSettings, augment: AugmentSettings, crops_path: Path, rows: list[int],
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


class _Superseded(Exception):
    """Another run owns the store now: this part must not be renamed into place."""


class _EmbedActor:
    """One encoder, loaded once per actor: each call embeds one Ray batch of decoded crops into one part."""

    def __init__(self, job: _Job, encoder: Encoder | None = None):
        import ray

        self.job, self.parts = job, 0
        s = job.settings
        if encoder is None:
            encoder = load_encoder(s.encoder, s.pool, s.device, job.resolved.precision)
        encoder = dataclasses.replace(seams.configured(encoder, s), compile=job.resolved.compile)
        if encoder.device.type == "cpu":
            cpus.use_threads(s.threads)
        self.encoder = encoder
        self.key = seams.store_key(encoder, s, job.augment, job.normaliser)
        meta = seams.store_meta(encoder, s, job.augment, job.resolved.key, job.crops_key, job.resolved.check, "0/1",
                                job.normaliser)
        meta.update(engine="ray", ray_node=ray.get_runtime_context().get_node_id())
        self.schema = seams.part_schema(encoder, s, meta)

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
        table = pa.concat_tables(tables)
        name = part_name(self.job.resolved.key, zip(splits, ids, crop_index, digests))
        if note is not None:  # the part's footer says which crops stain normalisation left as they were
            table = table.replace_schema_metadata({**table.schema.metadata, stain.SUMMARY_KEY: json.dumps(note)})
        self._write(table, self.job.store_dir / name)
        self.parts += 1
        self._hook_for_tests()
        return {"part": np.array([name], object), "crops": np.array([len(ids)]), "rows": np.array([len(table)])}

    def _tables(self, pixels: np.ndarray, ids: list, splits: list, crop_index: list,
                digests: list) -> tuple[list[pa.Table], dict | None]:
        """The batch's rows, split by split (each has its views) and cut into batches of ``batch_size`` crops,
        and its stain note (``stain.note``; None without stain normalisation)."""
        s, out, pending, note = self.job.settings, [], None, None

        def rows(done) -> pa.Table:
            nonlocal note
            sel, views, unchanged, feats, copied = done
            if copied is not None:
                copied.synchronize()
            bid, bsplit, bcidx, bhash = ([col[i] for i in sel] for col in (ids, splits, crop_index, digests))
            seams.check_finite(feats, bid, bcidx, views, bsplit, self.encoder.name)
            if unchanged is not None:
                note = stain.add_notes(note, stain.note(unchanged, bsplit, bid, bcidx))
            return seams.part_rows(bid, bsplit, bcidx, views, feats, self.schema, bhash)

        for split in dict.fromkeys(splits):
            mine = [i for i, sp in enumerate(splits) if sp == split]
            views = seams.views_of(split, s)
            for start in range(0, len(mine), s.batch_size):
                sel = mine[start:start + s.batch_size]
                crops = torch.from_numpy(np.ascontiguousarray(pixels[sel]))  # a copy: the batch is read-only
                feats = seams.queue_batch(self.encoder, crops, [ids[i] for i in sel], [crop_index[i] for i in sel],
                                          views, s, self.job.augment, self.job.normaliser)
                unchanged = self.job.normaliser.last_unchanged if self.job.normaliser else None
                queued = (sel, views, unchanged, *seams.copy_to_host(feats))
                if pending is not None:
                    out.append(rows(pending))  # while the device works on the next batch
                pending = queued
        out.append(rows(pending))
        return out, note

    def _write(self, table: pa.Table, path: Path) -> None:
        run_id = self.job.store_dir / RUN_ID_FILE
        try:
            with store.atomic_path(path) as tmp:
                pq.write_table(table, tmp, **seams.PART_OPTIONS)
                if _read_text(run_id) != self.job.run_id:
                    raise _Superseded
        except _Superseded:
            raise UserError("another embed run took over this store; this one stops", path=self.job.store_dir,
                            hint="run one embed per store at a time") from None

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
            while len(store.feature_parts(self.job.store_dir)) < int(marker[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        try:
            os.close(os.open(marker[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # a restarted actor: it died once already
        os._exit(1)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _decode(batch: dict[str, np.ndarray], crops_path: str) -> dict[str, np.ndarray]:
    """A CPU task: the crops of one unit (rows of crops.parquet) decoded to uint8 [B, H, W, 3]."""
    rows = batch["row"]
    _, crops = next(iter(seams.CropBatches(Path(crops_path), [rows])))
    if isinstance(crops, tuple):  # a slide patch that cannot be read: the slide is named
        seams.raise_batch_problem(crops, None)
    if isinstance(crops, int):
        i = int(np.flatnonzero(rows == crops)[0])
        raise UserError(f"crop {batch['crop_index'][i]} of {batch['image_id'][i]} ({batch['split'][i]}) is not a "
                        "readable PNG", path=crops_path, hint="re-run `histoembed crops` (delete the file first)")
    return {**batch, "pixels": crops.numpy()}


def _units(index: CropIndex, todo: list[int], per_part: int) -> list[pa.Table]:
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
    _, crops = next(iter(seams.CropBatches(index.path, [np.array([row])])))
    if isinstance(crops, tuple):
        seams.raise_batch_problem(crops, index)
    if isinstance(crops, int):
        raise UserError(f"crop {index.crop_index[row]} of {index.ids[row]} ({index.splits[row]}) is not a readable "
                        "PNG", path=index.path, hint="re-run `histoembed crops` (delete the file first)")
    return tuple(crops.shape[1:])


@dataclass
class _Layout:
    actors: int
    gpus: float  # per actor
    cpus: float  # per actor


def _layout(ray, settings: EmbedSettings, todo_parts: int) -> _Layout:
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
    return _Layout(actors, 1.0 if gpus else 0.0, settings.ray_actor_cpus)


def part_crops(settings: EmbedSettings) -> int:
    """Crops per Ray batch, i.e. per part: about ``rows_per_part`` rows, whole encoder batches."""
    settings = seams.sized(settings, None)  # an unset batch size: the CPU default, as in run_embed
    per_part = max(1, settings.rows_per_part // settings.repeats)
    return settings.batch_size * max(1, round(per_part / settings.batch_size))


def check_store(store_dir: Path, expected: int) -> None:
    """Stop unless the store holds ``expected`` rows, each (split, image, crop, view) once."""
    tables = [pq.read_table(p, columns=list(store.ROW_KEY)) for p in store.feature_parts(store_dir)]
    index = pa.concat_tables(tables) if tables else pa.table({c: [] for c in store.ROW_KEY})
    unique = index.group_by(list(store.ROW_KEY)).aggregate([]).num_rows
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
    settings = seams.sized(settings, None)  # unset sizes: the CPU defaults (actors may sit on other machines)
    index = CropIndex.read(run)
    seams.check_slides_unchanged(index.path)
    mine = list(range(len(index.ids)))
    normaliser = stain.for_run(run, settings.stain_norm, settings.stain_target, settings.stain_min_tissue,
                               torch.device("cpu"))
    with session(settings.ray_address), _user_errors():
        ray = _ray()
        first = mine[:settings.batch_size]
        if encoder is None and ray.cluster_resources().get("GPU", 0):
            # Load and check the encoder where the actors will run (a GPU), to fix the store's key.
            probe = ray.remote(num_gpus=1, num_cpus=settings.ray_actor_cpus, max_retries=RETRIES)(_probe)
            resolved = ray.get(probe.remote(settings, augment, index.path, first, normaliser))
        else:  # CPU actors: this process resolves it as they will (the actors check that their key agrees)
            resolved, checked = _resolve(encoder, settings, augment, index.path, first, normaliser)
            encoder = checked if encoder is not None else None  # a given encoder goes to the actors as checked
        store_dir = Path(run) / store.FEATURES_DIR / resolved.slug
        run_id = uuid.uuid4().hex
        with seams.shard_lock(store_dir, (0, 1)):
            todo, result = seams.open_store(store_dir, resolved.key, index, mine, settings, resolved.name,
                                            resolved.dim, resolved.check, run_id=run_id)
            if todo:
                _embed_todo(ray, index, todo, settings, augment, store_dir, resolved, run_id, encoder, result,
                            normaliser)
                check_store(store_dir, result.rows)
            result.stain = stain.store_summary(store_dir) if normaliser else None
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
    ds = ray.data.from_arrow(_units(index, todo, per_part))
    ds = ds.map_batches(_decode, fn_kwargs={"crops_path": str(index.path)}, batch_format="numpy",
                        memory=unit_bytes)
    # Ray Data restarts a dead actor and retries its task by default (max_restarts, max_task_retries -1).
    ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs={"job": job, "encoder": encoder},
                        compute=ray.data.ActorPoolStrategy(size=layout.actors, max_tasks_in_flight_per_actor=2),
                        batch_size=per_part, batch_format="numpy", num_gpus=layout.gpus, num_cpus=layout.cpus)
    try:
        with _quiet("ray.data"):  # its plan, and the traceback of a task's error that the user gets as a message
            _count_parts(ds, result, len(todo), f"embed {resolved.name} (ray, {layout.actors} actor(s))")
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"the {layout.actors} encoder actor(s) did not all start within {ACTOR_START_S} s",
                        hint="check that the cluster has the GPUs/CPUs they need (`ray status`), or lower "
                             "--ray-actors") from None


def _count_parts(ds, result: EmbedResult, crops: int, what: str) -> None:
    """Follow the actors' output: one row per part written, with its rows and crops."""
    parts: set[str] = set()
    with progress("crops") as bar:
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
                seams.stop_for_tests(len(parts))

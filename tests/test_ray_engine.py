"""The Ray engine: the same store as the local engine, exactly once through a killed actor and a killed driver,
across two nodes; crops over Ray tasks; a clear message without Ray.

Ray binds to the machine's network address unless it runs in a network namespace that has loopback
alone, so its tests run only there: `make test` runs the suite in one (`unshare -n`, as root). They
share one two-node cluster (``ray.cluster_utils.Cluster``) of 1 CPU and 1 GPU each: the GPUs are
logical resources that place one encoder actor per node, and the actors still run the encoder on
the CPU, since torch finds no CUDA. In CI a Ray test that cannot run fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_crops import read_crops, small_data
from test_embed import settings, sorted_rows, write_crops

from synthetic_inputs import flag_patches, write_synthetic_features
from histoembed.core import feature_store, store
from histoembed.core.config import AugmentSettings
from histoembed.core.errors import UserError
from histoembed.stages.embed import read_store, run_embed
from histoembed.engines import ray as ray_engine
from histoembed.engines.base import STOP_AFTER_ENV


def loopback_only() -> bool:
    """Whether this process sees no network interface but loopback (a private namespace)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


WHY_NOT = ("Ray is not installed (pip install -e '.[ray]')" if importlib.util.find_spec("ray") is None else
           None if loopback_only() else
           "Ray would bind to this machine's network address; run `make test` (a loopback-only namespace)")
needs_ray = pytest.mark.skipif(WHY_NOT is not None and not os.environ.get("CI"), reason=WHY_NOT or "")

N_TRAIN, N_TEST, PER_IMAGE, REPEATS = 8, 3, 2, 2
TOTAL_ROWS = (N_TRAIN + N_TEST) * PER_IMAGE * REPEATS  # test crops get every view too (tta)


def ray_settings(encoder: Path, **kw):
    """Small Ray batches and parts, so a run writes several parts; GPU actors reserve no CPU (1 per node)."""
    return settings(encoder, engine="ray", batch_size=3, rows_per_part=6, ray_actor_cpus=0, **kw)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, 1 CPU and 1 (logical) GPU each, joined by this process."""
    if WHY_NOT is not None:
        pytest.fail(f"the Ray tests must run in CI: {WHY_NOT}")
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine (no network here anyway)
    node = dict(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)
    two = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    two.add_node(**node)
    two.wait_for_nodes()
    ray.init(address=two.address, log_to_driver=False)
    yield two
    ray.shutdown()
    two.shutdown()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_dinov2):
    """(rows, embeddings) of the local engine over the crops every test here embeds."""
    run = tmp_path_factory.mktemp("local")
    write_crops(run, n_train=N_TRAIN, n_test=N_TEST, per_image=PER_IMAGE)
    run_embed(run, settings(tiny_dinov2, repeats=REPEATS, batch_size=4), AugmentSettings())
    return sorted_rows(read_store(run))


def assert_same_store(run: Path, local_store) -> None:
    """The run's store equals the local engine's: same rows (so none twice, none missing), same features."""
    rows, emb = sorted_rows(read_store(run))  # read_store refuses duplicate rows
    assert rows == local_store[0]
    np.testing.assert_allclose(emb, local_store[1], atol=1e-5, rtol=0)


@needs_ray
def test_two_nodes_write_the_local_engine_s_store_and_normalise_stain_as_it_does(tmp_path, tiny_dinov2, cluster,
                                                                                   cli, monkeypatch):
    """One actor per node, both write parts; with --stain-norm macenko the actors normalise each batch as the local
    loop does (the driver computes the target once), and their parts' footers count the crops left unchanged as
    local parts do. One Ray run checks both (a Ray run costs 15-25 s on two cores)."""
    from test_stain import synth_and_crops

    local = synth_and_crops(cli, tmp_path, train=8, shift=1.0, outliers=True)  # a cartoon and a blank: unchanged
    on_ray = tmp_path / "run-ray"
    r = cli("crops", "--data", tmp_path / "data", "--run", on_ray, "--size", 64, "--k", 3, "--workers", 1)
    assert r.exit_code == 0, r.output
    common = ["--encoder", tiny_dinov2, "--repeats", REPEATS, "--workers", 0, "--stain-norm", "macenko"]
    r = cli("embed", "--run", local, *common)
    assert r.exit_code == 0, r.output
    local_rows = sorted_rows(read_store(local))
    # An actor holds on after its first part until there are two: the other node's actor wrote one.
    monkeypatch.setenv(ray_engine.ACTOR_HOOK_ENV, "1:wait:2")
    r = cli("embed", "--run", on_ray, *common, "--batch-size", 5, "--rows-per-part", 10, "--engine", "ray",
            "--ray-actor-cpus", 0)
    assert r.exit_code == 0, r.output
    assert f"embedded {len(local_rows[0])} views" in r.output
    assert "stain normalisation (macenko)" in r.output and "passed through unchanged" in r.output
    assert_same_store(on_ray, local_rows)
    ray_dir, local_dir = feature_store.find_feature_store(on_ray), feature_store.find_feature_store(local)
    parts = feature_store.feature_parts(ray_dir)
    assert all(p.name.startswith(ray_engine.PART_PREFIX) for p in parts)
    nodes = {store.read_meta(p)["ray_node"] for p in parts}
    assert nodes == {n["NodeID"] for n in __import__("ray").nodes()}  # one actor per node (a GPU each), both wrote
    meta = store.read_meta(parts[0])
    assert meta["engine"] == "ray" and meta["repeats"] == REPEATS
    assert feature_store.stain_summary(ray_dir) == feature_store.stain_summary(local_dir)
    assert meta["stain"] == store.read_meta(feature_store.feature_parts(local_dir)[0])["stain"]
    monkeypatch.delenv(ray_engine.ACTOR_HOOK_ENV)
    again = cli("embed", "--run", on_ray, *common, "--engine", "ray", "--ray-actor-cpus", 0)
    assert again.exit_code == 0 and "up to date" in again.output
    by_local = cli("embed", "--run", on_ray, *common)
    assert by_local.exit_code == 0 and "up to date" in by_local.output  # the engines share the store and its key


@needs_ray
def test_a_killed_driver_is_resumed_by_a_rerun_whose_killed_actor_is_restarted_and_rewrites_its_part(
        tmp_path, tiny_dinov2, cluster, local_store, monkeypatch):
    """Two failures, one after the other, on one store (each Ray run here costs 15-25 s on two cores): a driver
    killed mid-run, then the rerun that resumes it loses its one actor after that actor's 2nd part; Ray restarts
    the actor, its part is rewritten once and counted once, and the store ends as the local engine's."""
    write_crops(tmp_path, n_train=N_TRAIN, n_test=N_TEST, per_image=PER_IMAGE)
    cmd = [sys.executable, "-m", "histoembed", "embed", "--run", str(tmp_path), "--encoder", str(tiny_dinov2),
           "--repeats", str(REPEATS), "--workers", "0", "--batch-size", "3", "--rows-per-part", "6",
           "--engine", "ray", "--ray-address", cluster.address, "--ray-actors", "1", "--ray-actor-cpus", "0"]
    # The driver kills itself once 2 parts are reported; its actor stops after its 3rd part, so the kill
    # always comes mid-run, whatever the machine's load.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", STOP_AFTER_ENV: "2:SIGKILL", ray_engine.ACTOR_HOOK_ENV: "3:stall"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    store_dir = tmp_path / store.FEATURES_DIR / tiny_dinov2.name
    parts_then = feature_store.feature_parts(store_dir)
    assert 2 <= len(parts_then) <= 3
    rows_then = sum(pq.read_metadata(p).num_rows for p in parts_then)

    crops = (N_TRAIN + N_TEST) * PER_IMAGE
    per_part = ray_engine.part_crops(ray_settings(tiny_dinov2, repeats=REPEATS))
    assert crops - 3 * per_part > per_part   # the rerun has at least two parts to write: its actor dies after one
    marker = tmp_path / "actor-died"
    monkeypatch.setenv(ray_engine.ACTOR_HOOK_ENV, f"2:exit:{marker}")
    resumed = run_embed(tmp_path, ray_settings(tiny_dinov2, repeats=REPEATS, ray_actors=1), AugmentSettings())
    assert marker.exists()  # the actor's process did exit after writing its 2nd part
    assert resumed.rows == TOTAL_ROWS   # a rewritten part counted once
    # The killed driver's actor may still put its 3rd part in place after the snapshot above, until the rerun
    # takes the store over: the rerun then finds that part done too (the CI machine saw it).
    found = TOTAL_ROWS - resumed.new_rows
    late = max(pq.read_metadata(p).num_rows for p in parts_then) if len(parts_then) == 2 else 0
    assert found in {rows_then, rows_then + late}, (found, rows_then)
    assert_same_store(tmp_path, local_store)
    parts = feature_store.feature_parts(store_dir)
    assert set(parts_then) <= set(parts)  # finished parts were kept, not redone
    assert len(parts) >= -(-crops // per_part)
    assert not list(store_dir.glob(".part-*")), "a temporary was left behind"


@needs_ray
def test_crops_over_ray_tasks_equal_the_local_crops(tmp_path, cluster, cli, monkeypatch):
    data = small_data(tmp_path / "d", n=4)
    local = cli("crops", "--data", data, "--run", tmp_path / "local", "--size", 32, "--workers", 1)
    mapped = []
    real = ray_engine.map_ordered
    monkeypatch.setattr(ray_engine, "map_ordered", lambda fn, *args: mapped.append(fn) or real(fn, *args))
    spread = cli("crops", "--data", data, "--run", tmp_path / "ray", "--size", 32, "--engine", "ray")
    assert [fn.__name__ for fn in mapped] == ["_crop_one"]  # the images went out as Ray tasks
    assert local.exit_code == 0 and spread.exit_code == 0, spread.output
    assert read_crops(tmp_path / "ray") == read_crops(tmp_path / "local")
    key = store.read_meta(tmp_path / "ray" / store.CROPS_FILE)["key"]
    assert key == store.read_meta(tmp_path / "local" / store.CROPS_FILE)["key"]  # the engine is not in the key


@needs_ray
def test_an_unreadable_crop_stops_the_ray_run_with_a_clear_message(tmp_path, tiny_dinov2, cluster, cli):
    write_crops(tmp_path, n_train=3, n_test=0, per_image=2)
    path = tmp_path / store.CROPS_FILE
    table = pq.read_table(path)
    pngs = table["png"].to_pylist()
    pngs[4] = b"not a png"
    table = table.set_column(table.schema.get_field_index("png"), "png", pa.array(pngs, pa.binary()))
    store.write_table(table, path, meta=store.read_meta(path))
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--workers", 0, "--batch-size", 2,
            "--engine", "ray", "--ray-actors", 1, "--ray-actor-cpus", 0)   # one actor: the message is the point
    assert r.exit_code == 2 and "crop 0 of img_0002.png (train) is not a readable PNG" in r.output, r.output
    assert "Traceback" not in r.output


def test_an_actor_of_a_superseded_run_adds_no_part(tmp_path, tiny_dinov2):
    """The store's run id decides who may add parts: a re-run (or a local run) takes it from a killed driver's actors."""
    write_crops(tmp_path, n_train=2, n_test=0, per_image=1)
    first = run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    table = pq.read_table(feature_store.feature_parts(first.store_dir)[0])
    run_id = first.store_dir / ray_engine.RUN_ID_FILE
    assert not run_id.exists()  # the local engine removes it
    run_id.write_text("run-a")
    # what an encoder actor of run a calls to write its part
    feature_store.write_part(table, first.store_dir / "part-ray-mine.parquet", run_id="run-a")
    assert (first.store_dir / "part-ray-mine.parquet").exists()
    run_id.write_text("run-b")  # another run took the store over
    with pytest.raises(UserError, match="took over"):
        feature_store.write_part(table, first.store_dir / "part-ray-late.parquet", run_id="run-a")
    assert not list(first.store_dir.glob("*late*")) and not list(first.store_dir.glob(".part-*"))


def test_the_final_check_refuses_a_duplicate_or_missing_row(tmp_path, tiny_dinov2):
    write_crops(tmp_path, n_train=2, n_test=1, per_image=2)
    result = run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    store_dir = result.store_dir
    ray_engine.check_store(store_dir, result.rows)
    with pytest.raises(UserError, match="were expected"):
        ray_engine.check_store(store_dir, result.rows + 1)
    part = feature_store.feature_parts(store_dir)[0]
    (store_dir / "part-ray-copy.parquet").write_bytes(part.read_bytes())  # what a blind appender would do
    with pytest.raises(UserError, match="distinct"):
        ray_engine.check_store(store_dir, result.rows)
    with pytest.raises(UserError, match="duplicate"):
        read_store(tmp_path)


def test_without_ray_the_engine_says_how_to_install_it(tmp_path, tiny_dinov2, cli, monkeypatch):
    write_crops(tmp_path, n_train=1, n_test=0, per_image=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--engine", "ray")
    assert r.exit_code == 2 and "pip install 'histoembed[ray]'" in r.output, r.output
    data = small_data(tmp_path / "d", n=2)
    r = cli("crops", "--data", data, "--run", tmp_path / "r", "--engine", "ray")
    assert r.exit_code == 2 and "pip install 'histoembed[ray]'" in r.output, r.output
    assert not (tmp_path / "r" / store.CROPS_FILE).exists()


def test_ray_engine_refuses_a_hand_made_shard(tmp_path, tiny_dinov2):
    with pytest.raises(UserError, match="spreads them over the cluster itself"):
        run_embed(tmp_path, ray_settings(tiny_dinov2), AugmentSettings(), shard=(0, 2))


def test_both_engines_provide_the_engine_interface():
    """``engines.base.Engine`` names what a stage calls; each engine module has it, parameter for parameter
    (names, kinds, defaults), and ``pick`` hands out the one a setting names. Ray is not started."""
    import inspect

    from histoembed import engines
    from histoembed.engines import local
    from histoembed.engines.base import Engine

    wanted = {name: inspect.signature(getattr(Engine, name)) for name in ("session", "map_ordered", "run_embed")}
    for module in (local, ray_engine):
        for name, signature in wanted.items():
            params = list(signature.parameters.values())[1:]  # without self
            found = list(inspect.signature(getattr(module, name)).parameters.values())
            assert [(p.name, p.kind, p.default) for p in found] == [(p.name, p.kind, p.default) for p in params], \
                f"{module.__name__}.{name}"
    assert engines.pick("local") is local and engines.pick("ray") is ray_engine


class _FakeRay:
    def __init__(self, cpus: float, gpus: int, nodes: int):
        self.resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        self.alive = nodes

    def cluster_resources(self) -> dict:
        return self.resources

    def nodes(self) -> list[dict]:
        return [{"Alive": True}] * self.alive + [{"Alive": False}]


def test_actors_one_per_gpu_else_one_per_node_and_never_every_cpu(tiny_dinov2):
    s = settings(tiny_dinov2, engine="ray")
    assert ray_engine._layout(_FakeRay(16, 4, 2), s, 100) == ray_engine._ActorLayout(4, 1.0, 1.0)
    assert ray_engine._layout(_FakeRay(16, 0, 3), s, 100) == ray_engine._ActorLayout(3, 0.0, 1.0)
    assert ray_engine._layout(_FakeRay(16, 0, 3), s, 2).actors == 2  # no more actors than parts
    assert ray_engine._layout(_FakeRay(16, 0, 1), s.model_copy(update={"ray_actors": 5}), 100).actors == 5
    with pytest.raises(UserError, match="one per actor"):
        ray_engine._layout(_FakeRay(16, 2, 1), s.model_copy(update={"ray_actors": 3}), 100)
    with pytest.raises(UserError, match="wait forever"):
        ray_engine._layout(_FakeRay(2, 0, 2), s, 100)
    assert ray_engine.part_crops(s.model_copy(update={"rows_per_part": 4096, "repeats": 4})) == 1024
    assert ray_engine.part_crops(s.model_copy(update={"rows_per_part": 1, "batch_size": 7})) == 7


def ray_processes_of(marker: str) -> list[str]:
    """The processes whose command line, environment or open files mention ``marker`` (one instance's RAY_TMPDIR)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            seen = cmdline + Path(f"/proc/{pid}/environ").read_bytes() + b"".join(
                os.readlink(f"/proc/{pid}/fd/{fd}").encode() for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker.encode() in seen and int(pid) != os.getpid():
            found.append(pid + " " + cmdline.replace(b"\0", b" ").decode(errors="replace")[:80])
    return found


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_local_ray_instance_goes_with_its_terminated_or_killed_driver(tmp_path, tiny_dinov2):
    """SIGTERM: the driver shuts its instance down; SIGKILL: histoembed's watchdog ends what Ray's own fate
    sharing leaves (its agents wait 60 s for the dead GCS). Either way nothing of it is left (waited for within a
    bound of 120 s: the ends come from signals and the watchdog, the bound only stops a hung test).
    The two drivers run side by side, each with its own instance (RAY_TMPDIR): most of a local Ray's start
    and end is waiting, so the pair takes little more than one."""
    import tempfile
    import time

    procs = {}
    for sig in ("SIGTERM", "SIGKILL"):
        run = tmp_path / sig
        write_crops(run, n_train=N_TRAIN, n_test=N_TEST, per_image=PER_IMAGE)
        ray_tmp = tempfile.mkdtemp(prefix="he-ray-", dir="/tmp")   # short: Ray's socket paths are limited
        cmd = [sys.executable, "-m", "histoembed", "embed", "--run", str(run), "--encoder", str(tiny_dinov2),
               "--repeats", str(REPEATS), "--workers", "0", "--batch-size", "3", "--rows-per-part", "6",
               "--engine", "ray", "--ray-actors", "1", "--ray-actor-cpus", "0"]   # no --ray-address: a local instance
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
               STOP_AFTER_ENV: f"2:{sig}", ray_engine.ACTOR_HOOK_ENV: "3:stall"}   # the signal comes mid-run
        env.pop("RAY_ADDRESS", None)
        procs[sig] = (ray_tmp, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                env=env))
    for sig, (ray_tmp, proc) in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0, (sig, output)
    for sig, (ray_tmp, _) in procs.items():
        deadline = time.monotonic() + 120                 # a clean end takes a few seconds; a busy machine longer
        while (left := ray_processes_of(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"{sig}: left behind:\n" + "\n".join(left)


# ---------------------------------------------------------------- whole slides (issue 20)

@pytest.fixture(scope="module")
def slide_cohort(tmp_path_factory) -> Path:
    """Four small synthetic slides (3 train, 1 test), about 2000 px a side at 0.25 um/px."""
    from histoembed.tools.synthetic import make_slide_cohort

    root = tmp_path_factory.mktemp("slide-cohort")
    make_slide_cohort(root, n=4, seed=7, size=2000, n_test=1)
    return root


# 64 px patches at 0.5 um/px: 128 level-0 px read and shrunk; 3 patches a slide.
SLIDE_CROPS = ("--size", 64, "--mpp", 0.5, "--max-patches", 3)


@needs_ray
def test_slide_crops_over_ray_tasks_equal_the_local_crops(slide_cohort, cluster, cli, monkeypatch):
    data = slide_cohort / "manifest.csv"
    local = cli("crops", "--data", data, "--run", slide_cohort / "local", *SLIDE_CROPS, "--workers", 1)
    mapped = []
    real = ray_engine.map_ordered
    monkeypatch.setattr(ray_engine, "map_ordered", lambda fn, *args: mapped.append(fn) or real(fn, *args))
    spread = cli("crops", "--data", data, "--run", slide_cohort / "ray", *SLIDE_CROPS, "--engine", "ray")
    assert local.exit_code == 0 and spread.exit_code == 0, local.output + spread.output
    assert [fn.__name__ for fn in mapped] == ["_crop_one"]  # the slides went out as Ray tasks
    rows = read_crops(slide_cohort / "ray")
    assert rows == read_crops(slide_cohort / "local")
    assert len(rows) == 4 * 3 and {r["png"] for r in rows} == {None} and {r["level"] for r in rows} == {0}
    key = store.read_meta(slide_cohort / "ray" / store.CROPS_FILE)["key"]
    assert key == store.read_meta(slide_cohort / "local" / store.CROPS_FILE)["key"]


@needs_ray
def test_slide_patches_embedded_over_ray_give_the_local_engine_s_store(slide_cohort, tiny_dinov2, cluster, cli):
    """The Ray tasks read the patches from the slide files; the store equals the local engine's."""
    runs = {}
    for engine in ("local", "ray"):
        run = slide_cohort / f"embed-{engine}"
        r = cli("crops", "--data", slide_cohort / "manifest.csv", "--run", run, *SLIDE_CROPS, "--workers", 1)
        assert r.exit_code == 0, r.output
        runs[engine] = run
    common = ["--encoder", tiny_dinov2, "--repeats", REPEATS, "--workers", 0]
    r = cli("embed", "--run", runs["local"], *common)
    assert r.exit_code == 0, r.output
    r = cli("embed", "--run", runs["ray"], *common, "--batch-size", 3, "--rows-per-part", 12, "--engine", "ray",
            "--ray-actors", 1, "--ray-actor-cpus", 0)   # one actor (two nodes: the test above)
    assert r.exit_code == 0, r.output
    crops = 4 * 3
    assert f"embedded {crops * REPEATS} views" in r.output
    local = sorted_rows(read_store(runs["local"]))
    assert_same_store(runs["ray"], local)
    parts = feature_store.feature_parts(feature_store.find_feature_store(runs["ray"]))
    assert len(parts) > 1 and all(p.name.startswith(ray_engine.PART_PREFIX) for p in parts)
    again = cli("embed", "--run", runs["ray"], *common)  # the local engine finds the Ray store complete
    assert again.exit_code == 0 and "up to date" in again.output


@needs_ray
def test_a_ray_worker_opens_each_slide_once(slide_cohort, cluster):
    """One OpenSlide handle per slide per process: a Ray task decoding several units of patches of the same
    slides opens each slide once, and a later task in the same worker process opens none again."""
    import ray

    run = slide_cohort / "local"  # the crops of the first slide test, or cut here
    if not (run / store.CROPS_FILE).exists():
        from histoembed.core.config import CropSettings
        from histoembed.stages.crops import run_crops

        run_crops(slide_cohort / "manifest.csv", run, CropSettings(size=64, mpp=0.5, max_patches=3, workers=1))
    index = feature_store.CropIndex.read(run)
    units = ray_engine._part_units(index, list(range(len(index.ids))), 2)

    @ray.remote(num_cpus=1)
    def decode(units, crops_path):
        from histoembed.inputs import slides

        slides._PROCESS_HANDLES = None  # as in a fresh worker process (earlier tests' tasks may have run here)
        opened = []
        real = slides.open_slide
        slides.open_slide = lambda path: opened.append(str(path)) or real(path)
        try:
            shapes = [ray_engine._decode({c: u[c].to_numpy() for c in u.column_names}, crops_path)["pixels"].shape
                      for _ in range(2) for u in units]  # twice over: the second pass opens nothing
        finally:
            slides.open_slide = real
        return opened, shapes

    sources = pq.read_table(run / store.CROPS_FILE, columns=["source"])["source"].to_pylist()
    opened, shapes = ray.get(decode.remote(units, str(index.path)))
    assert shapes == [(len(u), 64, 64, 3) for u in units] * 2
    assert sorted(opened) == sorted(set(sources))  # each slide once, though its patches span several units


@needs_ray
def test_fit_over_ray_tasks_equals_the_local_fit(tmp_path, cluster, cli, monkeypatch):
    """Every (fold, head) a Ray task reading its bags from the store: the local fit's OOF file, metrics, models;
    a flagged slide patch left out in the tasks as in the local fit."""

    runs = {name: tmp_path / name for name in ("local", "ray")}
    write_synthetic_features(runs["local"], n_images=24, n_classes=2, crops=3, n_test=2)
    flag_patches(runs["local"], {("img_0000.png", 1): ["ink"]})
    shutil.copytree(runs["local"], runs["ray"])
    config = tmp_path / "histoembed.toml"
    config.write_text("[fit]\nthreads = 1\n[fit.abmil]\nepochs = 3\n[fit.xgb]\nn_estimators = 8\npca_dims = 4\n")
    common = ("--config", config, "--folds", 2, "--heads", "xgb,logreg,abmil", "--bootstrap", 0)
    mapped = []
    real = ray_engine.map_ordered
    monkeypatch.setattr(ray_engine, "map_ordered", lambda fn, *a, **k: mapped.append(fn) or real(fn, *a, **k))
    for name, run in runs.items():
        result = cli("fit", "--run", run, "--engine", name, *common)
        assert result.exit_code == 0, result.output
    assert [fn.__name__ for fn in mapped] == ["fold_task"]   # 2 folds x 3 heads went out as Ray tasks
    local, spread = (pq.read_table(r / store.OOF_FILE) for r in runs.values())
    assert local.column_names == spread.column_names
    for column in local.column_names:
        a, b = local[column].to_pylist(), spread[column].to_pylist()
        if column.startswith("logits") or column == "prob":
            np.testing.assert_allclose(np.array(a, float), np.array(b, float), atol=1e-5)
        else:
            assert a == b, column
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in runs.values())
    assert ma["key"] == mb["key"] and ma["heads"].keys() == mb["heads"].keys()
    assert ma["artifacts_left_out"]["per_slide"] == mb["artifacts_left_out"]["per_slide"] == {"img_0000.png": 1}
    assert all(abs(ma["heads"][h]["macro_f1"] - mb["heads"][h]["macro_f1"]) < 1e-9 for h in ma["heads"])
    files = [sorted(p.relative_to(r / "models") for p in (r / "models").rglob("*") if p.is_file()) for r in runs.values()]
    assert files[0] == files[1] and not list(runs["ray"].glob(".fit-ray-*"))

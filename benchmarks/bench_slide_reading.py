"""Slides at the reading limit (issue 32): the embed stage's patches/s against the slower of its two limits,
the bare read+resize rate of the same boxes (per process, x the stage's workers) and the bare forward.

    python benchmarks/bench_slide_reading.py --workers 1,2 --out /tmp/bench-reading

Everything is measured in one run on the same synthetic Aperio-like slides (``--slides`` of ``--side``² px at
0.25 um/px, JPEG tiles of 256 px), the same boxes (``histoembed crops`` at ``--mpp``, at most ``--max-patches``
per slide) and the same encoder (a tiny random Dinov2 on the CPU, one view, ``--batch-size``):

* ``bare_read``: one process, fresh handles, every box as the issue's reference recipe reads it with
  openslide-python's public API: ``read_region`` + composite onto white + ``cv2.resize`` (INTER_AREA), one
  call per patch, in the crops file's order. ``bare_read x W`` is the reading limit of W workers.
* ``reader``: the same boxes through histoembed's own reader (``CropBatches``, what the stage's workers run),
  in this process, no encoder: its rate against ``bare_read`` says what the reader itself gained.
* ``bare_read_W``: the same bare loop in W processes at once (process i takes batches i, i+W, ..., as the stage's
  workers do): what W readers really get from this machine's cores when other work shares them.
* ``floor``: OpenSlide's C ``openslide_read_region`` alone into a numpy buffer (no conversion, no resize),
  one call per patch: what no reader built on OpenSlide can beat.
* ``forward``: the encoder alone on uint8 batches of the stage's size, through ``forward.embed_views``.
* ``stage``: ``stages.embed.run_embed`` (the local engine: DataLoader workers read, this process runs the
  encoder and writes the store), wall time of the whole call, a new store each time (after one untimed call,
  so that imports are not counted).
* ``predict``: ``predict``'s slide path (``stages.predict._embed_slide``: the run's grid on the first slide, read
  and embedded chunk by chunk) with the same encoder; its limit is min(bare_read, forward), one process.

Each timing is taken ``--repeats`` times, interleaved, and the best kept (other work only ever slows a timing
down). CPU per patch is also counted (``*_cpu_ms``: this process and the workers it reaped, over all patches):
``bare_cpu_vs_stage_cpu`` is the bare loop's CPU per patch over the stage's (readers, encoder, writing): at
1 or more, W free cores give the stage at least W x the bare rate, whatever else shares the machine. The load
average is printed with each row: on a shared machine only the ratios within a row mean much. ``--profile``
also runs the stage in one process (``--workers 0``) under cProfile and prints the top.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import openslide
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histoembed.core import store  # noqa: E402
from histoembed.tools.synthetic import SlideSpec, write_slide  # noqa: E402

from bench_slides import tiny_encoder  # noqa: E402  (this folder is on the path of a script run from it)


def make_run(out: Path, n: int, side: int, mpp: float, max_patches: int) -> Path:
    """``n`` slides, a manifest and a run whose crops.parquet holds their patch boxes (made once)."""
    for i in range(n):
        if not (out / f"s{i}.svs").exists():
            write_slide(out / f"s{i}.tmp.svs", SlideSpec(10 + i, side, side, ("benign", "malignant")[i % 2]))
            os.replace(out / f"s{i}.tmp.svs", out / f"s{i}.svs")
    rows = "".join(f"s{i}.svs,,{('benign', 'malignant')[i % 2]},train\n" for i in range(n))
    (out / "manifest.csv").write_text("image,mask,label,split\n" + rows)
    run = out / "run"
    if not (run / store.CROPS_FILE).exists():
        subprocess.run([sys.executable, "-m", "histoembed", "crops", "--data", "manifest.csv", "--run", "run",
                        "--mpp", str(mpp), "--max-patches", str(max_patches), "--workers", "1"], cwd=out,
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run


def boxes(run: Path) -> tuple[list[dict], int]:
    crops = run / store.CROPS_FILE
    return (pq.read_table(crops, columns=["source", "level", "x0", "y0", "x1"]).to_pylist(),
            int(store.read_meta(crops)["settings"]["size"]))


def reference_patch(slide, r: dict, size: int) -> np.ndarray:
    """The issue's bare recipe: public read_region, composite onto white, cv2.resize."""
    side = max(1, round((r["x1"] - r["x0"]) / slide.level_downsamples[r["level"]]))
    rgba = np.asarray(slide.read_region((r["x0"], r["y0"]), r["level"], (side, side)))
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        rgb = np.ascontiguousarray(rgba[..., :3])
    else:
        a = alpha.astype(np.float32) / 255.0
        rgb = (rgba[..., :3].astype(np.float32) * a + 255.0 * (1 - a)).round().astype(np.uint8)
    if side == size:
        return rgb
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def bare_read(rows: list[dict], size: int) -> float:
    handles: dict[str, openslide.OpenSlide] = {}
    start = time.perf_counter()
    for r in rows:
        s = handles.get(r["source"]) or handles.setdefault(r["source"], openslide.OpenSlide(r["source"]))
        reference_patch(s, r, size)
    rate = len(rows) / (time.perf_counter() - start)
    for s in handles.values():
        s.close()
    return rate


def _bare_share(args: tuple[list[dict], int]) -> int:
    rows, size = args
    bare_read(rows, size)
    return len(rows)


def bare_read_parallel(rows: list[dict], size: int, workers: int, batch_size: int) -> float:
    import multiprocessing

    if workers <= 1:
        return bare_read(rows, size)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    shares = [([r for b in batches[w::workers] for r in b], size) for w in range(workers)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        n = sum(pool.map(_bare_share, shares))
    return n / (time.perf_counter() - start)


def floor_read(rows: list[dict]) -> float:
    from openslide import lowlevel

    handles: dict[str, openslide.OpenSlide] = {}
    start = time.perf_counter()
    for r in rows:
        s = handles.get(r["source"]) or handles.setdefault(r["source"], openslide.OpenSlide(r["source"]))
        side = max(1, round((r["x1"] - r["x0"]) / s.level_downsamples[r["level"]]))
        buf = np.zeros((side, side), np.uint32)
        lowlevel._read_region(s._osr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), r["x0"], r["y0"],
                              r["level"], side, side)
    rate = len(rows) / (time.perf_counter() - start)
    for s in handles.values():
        s.close()
    return rate


def reader_rate(run: Path, batch_size: int) -> float:
    from histoembed.engines.batches import CropBatches
    from histoembed.inputs import slides

    n = pq.read_metadata(run / store.CROPS_FILE).num_rows
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    slides.process_handles().close()   # fresh handles, as a new worker has
    start = time.perf_counter()
    got = sum(len(b) for _, b in CropBatches(run / store.CROPS_FILE, batches))
    return got / (time.perf_counter() - start)


def forward_rate(encoder, pixels: np.ndarray, batch_size: int) -> float:
    import torch

    from histoembed.engines import forward

    n = len(pixels)
    forward.embed_views(encoder, torch.from_numpy(pixels[:batch_size]), ["x"] * batch_size, range(batch_size),
                        [0], None, 0)  # warm-up
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            b = torch.from_numpy(pixels[i:i + batch_size])
            forward.embed_views(encoder, b, ["x"] * len(b), range(len(b)), [0], None, 0)
    return n / (time.perf_counter() - start)


def stage_rate(run: Path, enc: Path, workers: int, batch_size: int) -> float:
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.stages.embed import run_embed

    shutil.rmtree(run / store.FEATURES_DIR, ignore_errors=True)
    settings = EmbedSettings(encoder=str(enc), device="cpu", workers=workers, batch_size=batch_size, repeats=1)
    start = time.perf_counter()
    result = run_embed(run, settings, AugmentSettings())
    return result.rows / (time.perf_counter() - start)


def predict_rate(run: Path, encoder, batch_size: int) -> tuple[float, int]:
    from histoembed.core.config import CropSettings
    from histoembed.engines.forward import embed_crops
    from histoembed.stages.predict import _embed_slide

    meta = store.read_meta(run / store.CROPS_FILE)
    settings = CropSettings.model_validate(meta["settings"])
    source = Path(boxes(run)[0][0]["source"])
    start = time.perf_counter()
    feats, _ = _embed_slide(source, None, settings, meta, lambda pixels, first: embed_crops(
        encoder, pixels, batch_size=batch_size), batch_size)
    return len(feats) / (time.perf_counter() - start), len(feats)


def cpu_timed(fn, *args) -> tuple[float, float]:
    """(what ``fn`` returns, CPU seconds it took in this process and in the child processes it waited for)."""
    def used() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    before = used()
    out = fn(*args)
    return out, used() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-reading"))
    ap.add_argument("--slides", type=int, default=3)
    ap.add_argument("--side", type=int, default=12000, help="level-0 side of each slide")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--max-patches", type=int, default=192, help="per slide")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="1,2", help="stage's DataLoader workers, comma-separated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timings of each kind per round, interleaved; best kept")
    ap.add_argument("--profile", action="store_true", help="also profile the stage in one process (cProfile)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from histoembed.core import cpus
    from histoembed.inputs import slides
    from histoembed.models.encoders import load_encoder

    run = make_run(a.out, a.slides, a.side, a.mpp, a.max_patches)
    enc_path = tiny_encoder(a.out / "tiny-dinov2")
    rows, size = boxes(run)
    cpus.use_threads(0)
    encoder = load_encoder(str(enc_path), device="cpu")
    pixels = np.stack([slides.read_patch(slides.open_slide(rows[0]["source"]), r["x0"], r["y0"], r["level"],
                                         r["x1"] - r["x0"], size) for r in rows[:a.batch_size]])
    pixels = np.concatenate([pixels] * -(-len(rows) // len(pixels)))[:len(rows)]
    print(json.dumps({"patches": len(rows), "size": size, "level": rows[0]["level"],
                      "side0": rows[0]["x1"] - rows[0]["x0"], "cpus": cpus.usable_cpus()}), flush=True)
    stage_rate(run, enc_path, 1, a.batch_size)  # imports and first reads: not timed
    for rnd in range(a.rounds):
        for w in (int(v) for v in a.workers.split(",")):
            got = {"round": rnd, "workers": w, "load_avg_1m": round(os.getloadavg()[0], 2)}
            samples: dict[str, list[float]] = {}
            for _ in range(a.repeats):  # interleaved, best of each: a shared machine only ever slows a timing down
                for name, timed in (("bare_read", lambda: cpu_timed(bare_read, rows, size)),
                                    (f"bare_read_{w}",
                                     lambda w=w: (bare_read_parallel(rows, size, w, a.batch_size), 0)),
                                    ("floor", lambda: (floor_read(rows), 0)),
                                    ("reader", lambda: (reader_rate(run, a.batch_size), 0)),
                                    ("forward", lambda: (forward_rate(encoder, pixels, a.batch_size), 0)),
                                    ("stage", lambda w=w: cpu_timed(stage_rate, run, enc_path, w, a.batch_size))):
                    rate, cpu = timed()
                    samples.setdefault(name, []).append(rate)
                    if cpu:
                        samples.setdefault(f"{name}_cpu_ms", []).append(cpu * 1e3 / len(rows))
            got.update({k: round(max(v) if not k.endswith("_cpu_ms") else min(v), 2 if k.endswith("_ms") else 1)
                        for k, v in samples.items()})
            limit = min(got["bare_read"] * max(w, 1), got["forward"])
            here = min(got[f"bare_read_{w}"], got["forward"])
            got.update(limit=round(limit, 1), stage_vs_limit=round(got["stage"] / limit, 3),
                       stage_vs_parallel_limit=round(got["stage"] / here, 3),
                       reader_vs_bare=round(got["reader"] / got["bare_read"], 3),
                       bare_cpu_vs_stage_cpu=round(got["bare_read_cpu_ms"] / got["stage_cpu_ms"], 3),
                       load_avg_after=round(os.getloadavg()[0], 2))
            print(json.dumps(got), flush=True)
        got = {"round": rnd, "load_avg_1m": round(os.getloadavg()[0], 2)}
        one = [r for r in rows if r["source"] == rows[0]["source"]]
        reps = [(predict_rate(run, encoder, a.batch_size), bare_read(one, size)) for _ in range(a.repeats)]
        got["predict"], n = max(r[0][0] for r in reps), reps[0][0][1]
        got["bare_read"] = max(r[1] for r in reps)
        got["forward"] = forward_rate(encoder, pixels[:len(one)], a.batch_size)
        got = {k: round(v, 1) if isinstance(v, float) else v for k, v in got.items()}
        limit = min(got["bare_read"], got["forward"])
        got.update(predict_patches=n, limit=limit, predict_vs_limit=round(got["predict"] / limit, 3))
        print(json.dumps(got), flush=True)
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        stage_rate(run, enc_path, 0, a.batch_size)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""Peak memory (RSS) of `histoembed fit` on slide-like bags: many patches per image (issue 20, item 6).

Writes a feature store of whole-slide-sized bags, as `embed --store-dtype float16` would:
``--slides`` training slides (plus ``--test-slides`` test slides, which fit must not read) x
``--patches`` patches x ``--views`` views of ``--dim``-d features, in ``--parts`` part files,
with a crops.parquet that labels them. The features are generated per slide (vectorised; the
tests' ``write_synthetic_features`` (tests/synthetic_inputs.py) loops per row in Python and holds everything in
float64, which is too slow and too big at this size) with the same structure: a class signal in
a low-rank subspace, per-slide and per-patch variation, view noise.

Then each fit (``--heads``, default xgb,logreg,abmil; ``--folds``, few ``abmil`` epochs: the
figure measured is memory, not accuracy) runs in a fresh process, and its peak resident set
(``ru_maxrss`` of that child alone, from ``os.wait4``) is printed beside the store's size on
disk and its training rows' size as float16 and float32.

    python benchmarks/bench_fit_memory.py [--slides 120 --patches 2000 --views 2 --dim 384]
    python benchmarks/bench_fit_memory.py --baseline /tmp/old   # the same fit with another source tree first

``--baseline DIR`` runs the same fit with another version's tree first on the Python path
(``git archive COMMIT | tar -x -C DIR``), on the same store, for before/after figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RUN_INSTALLED = "import runpy; runpy.run_module('histoembed', run_name='__main__')"
RUN_FROM = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__module__', '')]; sys.path.insert(0, {tree!r}); "
            "import histoembed; assert histoembed.__file__.startswith({tree!r}), histoembed.__file__; "
            "runpy.run_module('histoembed', run_name='__main__')")
LABELS = ("benign", "malignant", "in-situ", "invasive")


def write_slide_store(run: Path, slides: int, test_slides: int, patches: int, views: int, dim: int,
                      classes: int, parts: int, dtype: str, signal: float, seed: int = 0) -> Path:
    """crops.parquet and ``features/synthetic-slides/part-*.parquet`` of slide-like bags; returns the store."""
    from histoembed.core import feature_store, store

    rng = np.random.default_rng(seed)
    rank = min(dim, 32)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].astype(np.float32)
    means = rng.normal(size=(classes, rank)) * signal * 3 / np.sqrt(rank)
    ids = [f"slides/slide_{i:04d}.svs" for i in range(slides + test_slides)]
    splits = ["train" if i < slides else "test" for i in range(len(ids))]
    truth = [i % classes if i < slides else int(rng.integers(classes)) for i in range(len(ids))]
    n = len(ids) * patches
    crops = pa.table({
        "image_id": pa.array(np.repeat(ids, patches), pa.string()),
        "split": pa.array(np.repeat(splits, patches), pa.string()),
        "label": pa.array(np.repeat([LABELS[t] if s == "train" else None for t, s in zip(truth, splits)],
                                    patches).tolist(), pa.string()),
        "crop_index": pa.array(np.tile(np.arange(patches, dtype=np.int32), len(ids))),
        **{name: pa.array(np.zeros(n, np.int32)) for name in ("x0", "y0", "x1", "y1")},
        "tissue_fraction": pa.array(np.ones(n, np.float32)),
        "strategy": pa.array(["slide-grid"] * n, pa.string()),
        "scale": pa.array(np.ones(n, np.float32)),
        "png": pa.array([b""] * n, pa.binary()),
    }, schema=store.CROPS_SCHEMA)
    crops_key = store.config_key("bench-slides", seed, slides, test_slides, patches)
    store.write_table(crops, run / store.CROPS_FILE, meta={"key": crops_key, "classes": list(LABELS[:classes])})
    del crops
    store_dir = run / store.FEATURES_DIR / "synthetic-slides"
    store_dir.mkdir(parents=True, exist_ok=True)
    key = store.config_key("bench-slides", slides, test_slides, patches, views, dim, classes, dtype, signal, seed)
    meta = {"key": key, "encoder": "synthetic-slides", "dim": dim, "pool": "synthetic", "seed": seed,
            "crops_key": crops_key, "repeats": views, "tta": True, "store_dtype": dtype}
    np_dtype = np.float16 if dtype == "float16" else np.float32
    schema = store.with_meta(feature_store.feature_schema(dim, dtype), meta)
    order = rng.permutation(len(ids))        # parts hold slides in no particular order, as shards do
    for p, chunk in enumerate(np.array_split(order, parts)):
        # One row group per slide view, as embed's writers write a batch at a time: a part is never held whole.
        with pq.ParquetWriter(store_dir / f"part-{p:05d}.parquet", schema, **feature_store.PART_OPTIONS) as out:
            for i in chunk:
                centre = means[truth[i]] + rng.normal(size=rank)
                patch = (centre + rng.normal(size=(patches, rank))).astype(np.float32) @ basis.T
                patch += rng.standard_normal((patches, dim), dtype=np.float32) * 0.5
                for v in range(views if splits[i] == "train" else 1):
                    noise = rng.standard_normal((patches, dim), dtype=np.float32) * (0.0 if v == 0 else 0.3)
                    emb = (patch + noise).astype(np_dtype)
                    out.write_table(pa.table({
                        "image_id": pa.array([ids[i]] * patches, pa.string()),
                        "split": pa.array([splits[i]] * patches, pa.string()),
                        "crop_index": pa.array(np.arange(patches, dtype=np.int32)),
                        "view": pa.array(np.full(patches, v, np.int16)),
                        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
                    }, schema=schema))
    return store_dir


def peak_rss(cmd: list[str]) -> tuple[int, float, float, int]:
    """(peak RSS in bytes, wall seconds, CPU seconds, exit status) of ``cmd`` run as a child of its own."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    err = child.stderr.read().decode(errors="replace")
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        print(err[-3000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, seconds, usage.ru_utime + usage.ru_stime, child.returncode


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", default="120", help="Training slides; several (100,300,1000) for the scaling.")
    parser.add_argument("--streams", default="auto",
                        help="[fit] stream of each fit: auto, always, never; several (never,always) side by side.")
    parser.add_argument("--memory-gb", type=float, default=None, help="[fit] memory_gb of each fit.")
    parser.add_argument("--test-slides", type=int, default=30, help="Test slides (one view; fit must not read them).")
    parser.add_argument("--patches", type=int, default=2000, help="Patches per slide.")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--parts", type=int, default=6, help="Part files of the store (shards).")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="The store's --store-dtype.")
    parser.add_argument("--signal", type=float, default=0.6)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--heads", default="xgb,logreg,abmil")
    parser.add_argument("--abmil-epochs", type=int, default=2, help="[fit.abmil] epochs (memory, not accuracy).")
    parser.add_argument("--set", action="append", default=[],
                        help="Another histoembed.toml line for the fit, e.g. --set '[fit.abmil]' --set 'max_instances = 512'.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the run here instead of a temporary folder.")
    parser.add_argument("--baseline", type=Path, default=None, help="Another version's source tree, fitted first.")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for slides in (int(n) for n in args.slides.split(",")):
            rows += fit_cohort(args, root, slides)
    print("\n| slides | rows | store on disk | fit | peak RSS | wall | wall per slide | OOF macro-F1 |")
    print("|---:|---:|---:|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def fit_cohort(args, root: Path, slides: int) -> list[list[str]]:
    """Write a store of ``slides`` training slides, fit it once per ``--streams`` (and ``--baseline``); table rows."""
    base = root / f"store-run-{slides}"
    shutil.rmtree(base, ignore_errors=True)
    start = time.perf_counter()
    store_dir = write_slide_store(base, slides, args.test_slides, args.patches, args.views, args.dim,
                                  args.classes, args.parts, args.dtype, args.signal)
    disk = sum(p.stat().st_size for p in store_dir.glob("part-*.parquet"))
    train_rows = slides * args.patches * args.views
    total = train_rows + args.test_slides * args.patches
    print(f"store: {slides} training + {args.test_slides} test slides x {args.patches} patches "
          f"({args.views} views for training, 1 for test) = {total:,} rows x {args.dim}-d {args.dtype}, "
          f"{args.parts} parts, {mib(disk)} on disk (written in {time.perf_counter() - start:.0f} s)", flush=True)
    print(f"training rows: {train_rows:,} = {mib(train_rows * args.dim * 2)} as float16, "
          f"{mib(train_rows * args.dim * 4)} as float32", flush=True)
    jobs = ([("baseline", args.baseline, "auto")] if args.baseline else []) + \
        [(f"stream {mode}", None, mode) for mode in args.streams.split(",")]
    out = []
    for name, tree, mode in jobs:
        config = root / "histoembed.toml"
        config.write_text(f"[fit]\nstream = \"{mode}\"\n"
                          + (f"memory_gb = {args.memory_gb}\n" if args.memory_gb else "")
                          + f"[fit.abmil]\nepochs = {args.abmil_epochs}\n" + "".join(f"{s}\n" for s in args.set))
        run = root / f"run-{name.replace(' ', '-')}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        cmd = [sys.executable, "-c", RUN_FROM.format(tree=str(tree.resolve())) if tree else RUN_INSTALLED,
               "fit", "--config", str(config), "--run", str(run), "--folds", str(args.folds),
               "--heads", args.heads, "--bootstrap", "0"]
        rss, seconds, cpu, rc = peak_rss(cmd)
        line = (f"{name}{' (' + str(tree) + ')' if tree else ''}: fit --heads {args.heads} --folds {args.folds}: "
                f"peak RSS {mib(rss)} ({rss / (train_rows * args.dim * 4):.2f}x the training rows as float32), "
                f"wall {seconds:.0f} s, CPU {cpu:.0f} s")
        f1 = "FAILED"
        if rc:
            print(line + f", FAILED (exit {rc})", flush=True)
        else:
            metrics = json.loads((run / "metrics.json").read_text())
            f1 = ", ".join(f"{h} {m['macro_f1']:.3f}" for h, m in metrics["heads"].items())
            print(line + f"; OOF macro-F1 {f1}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
        out.append([str(slides), f"{train_rows:,}", mib(disk), name, mib(rss), f"{seconds:.0f} s",
                    f"{seconds / slides * 1000:.0f} ms", f1])
    shutil.rmtree(base, ignore_errors=True)
    return out

if __name__ == "__main__":
    main()

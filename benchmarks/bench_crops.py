"""Throughput of the crops stage on generated 2048x2048 H&E-like images.

Reports images per second and images per second per core, with one worker and with all
cores, for the whole stage (decode PNG, Otsu, components, crops, resize, PNG encode,
Parquet write). Generated images are cached in --cache so repeated runs time only cropping.

    python benchmarks/bench_crops.py --images 16

With ``--baseline DIR`` (a copy of an older ``histoembed`` package, e.g. made with
``mkdir -p /tmp/old && git archive COMMIT histoembed | tar -x -C /tmp/old``) each setting is timed
in fresh processes, the baseline's and this tree's alternately (``--rounds`` rounds of
baseline, this, this, baseline), and the table gives both rates and their ratio, measured in
one run, plus whether both wrote the same crops.parquet rows:

    python benchmarks/bench_crops.py --images 16 --baseline /tmp/old --rounds 2
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

ROOT = Path(__file__).resolve().parent.parent


def make_images(root: Path, n: int, side: int, seed: int) -> Path:
    """n synthetic side x side training images in the reference layout, made once per (n, side, seed)."""
    from histoembed.tools.synthetic import make_dataset

    marker = root / f".made-{n}-{side}-{seed}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    make_dataset(root, n_train=n, n_test=0, seed=seed, size_range=(side, side), outliers=False)
    marker.touch()
    return root


def time_stage(data: Path, workers: int, repeats: int, strategy: str, keep: Path | None = None) -> tuple[float, int]:
    """Best wall time of ``repeats`` full runs of the stage, and the crops written (the last crops.parquet
    is copied to ``keep`` when given)."""
    from histoembed.core.config import CropSettings
    from histoembed.stages.crops import run_crops

    best, n_crops = float("inf"), 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            result = run_crops(data, Path(run), CropSettings(workers=workers, strategy=strategy))
            best = min(best, time.perf_counter() - start)
            n_crops = result.crops
            if keep is not None:
                shutil.copyfile(result.path, keep)
    return best, n_crops


def child(package: Path, data: Path, workers: int, repeats: int, strategy: str, keep: Path) -> dict:
    """``time_stage`` in a fresh process that imports ``histoembed`` from ``package``'s parent folder."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]); "
            "from bench_crops import time_stage; from pathlib import Path; "
            "s, n = time_stage(Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], Path(sys.argv[7])); "
            "import histoembed; print(json.dumps({'seconds': s, 'crops': n, 'from': histoembed.__file__}))")
    env = {**os.environ, "PYTHONPATH": str(package)}
    out = subprocess.run([sys.executable, "-c", code, str(package), str(Path(__file__).parent), str(data),
                          str(workers), str(repeats), strategy, str(keep)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same_rows(a: Path, b: Path) -> bool:
    """Whether two crops.parquet files hold the same rows (every column, PNG bytes included)."""
    import pyarrow.parquet as pq

    return pq.read_table(a).equals(pq.read_table(b))


def compare(args: argparse.Namespace, data: Path) -> None:
    from histoembed.stages.crops import n_workers

    cores = n_workers(0)
    sides = {"baseline": args.baseline.resolve(), "this": ROOT}
    print(f"baseline: {sides['baseline']}; this: {ROOT}; {args.rounds} round(s) of baseline, this, this, baseline; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print("| workers | baseline images/s (runs) | this images/s (runs) | **this / baseline** | images/s per core, "
          "this | same crops.parquet |")
    print("|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, cores}):
            seconds: dict[str, list[float]] = {"baseline": [], "this": []}
            for _ in range(args.rounds):
                for side in ("baseline", "this", "this", "baseline"):
                    r = child(sides[side], data, workers, args.repeats, args.strategy, Path(tmp) / f"{side}.parquet")
                    seconds[side].append(r["seconds"])
            rate = {k: args.images / min(v) for k, v in seconds.items()}
            runs = {k: ", ".join(f"{args.images / s:.1f}" for s in v) for k, v in seconds.items()}
            same = same_rows(Path(tmp) / "baseline.parquet", Path(tmp) / "this.parquet")
            print(f"| {workers} | {rate['baseline']:.2f} ({runs['baseline']}) | {rate['this']:.2f} ({runs['this']}) | "
                  f"**{rate['this'] / rate['baseline']:.2f}** | {rate['this'] / workers:.2f} | {same} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}; rates from the best of --repeats {args.repeats} runs "
          "in each process")


def main() -> None:
    from histoembed.stages.crops import n_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="Generated images.")
    ap.add_argument("--side", type=int, default=2048, help="Image side in pixels.")
    ap.add_argument("--repeats", type=int, default=2, help="Timed runs per setting; the best is reported.")
    ap.add_argument("--strategy", default="blobs", help="Crop strategy to time.")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "histoembed-bench-crops",
                    help="Folder for the generated images (reused when it matches).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the generated images.")
    ap.add_argument("--baseline", type=Path, help="Folder holding an older histoembed package to compare with.")
    ap.add_argument("--rounds", type=int, default=1, help="With --baseline: rounds of baseline, this, this, baseline.")
    args = ap.parse_args()

    t0 = time.perf_counter()
    data = make_images(args.cache, args.images, args.side, args.seed)
    print(f"data: {args.images} images of {args.side}x{args.side} in {data} "
          f"(ready in {time.perf_counter() - t0:.1f} s)")
    if args.baseline:
        compare(args, data)
        return
    cores = n_workers(0)
    print(f"{'workers':>8} {'seconds':>8} {'crops':>6} {'images/s':>9} {'images/s/core':>14}")
    for workers in sorted({1, cores}):
        seconds, n_crops = time_stage(data, workers, args.repeats, args.strategy)
        rate = args.images / seconds
        print(f"{workers:>8} {seconds:>8.2f} {n_crops:>6} {rate:>9.2f} {rate / workers:>14.2f}")


if __name__ == "__main__":
    main()

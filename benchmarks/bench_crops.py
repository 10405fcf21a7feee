"""Throughput of the crops stage on generated 2048x2048 H&E-like images.

Reports images per second and images per second per core, with one worker and with all
cores, for the whole stage (decode PNG, Otsu, components, crops, resize, PNG encode,
Parquet write). Generated images are cached in --cache so repeated runs time only cropping.

    python benchmarks/bench_crops.py --images 16
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def make_images(root: Path, n: int, side: int, seed: int) -> Path:
    """n synthetic side x side training images in the reference layout, made once per (n, side, seed)."""
    from histoembed.synthetic import make_dataset

    marker = root / f".made-{n}-{side}-{seed}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    make_dataset(root, n_train=n, n_test=0, seed=seed, size_range=(side, side), outliers=False)
    marker.touch()
    return root


def time_stage(data: Path, workers: int, repeats: int, strategy: str) -> tuple[float, int]:
    """Best wall time of ``repeats`` full runs of the stage, and the crops written."""
    from histoembed.core.config import CropSettings
    from histoembed.crops import run_crops

    best, n_crops = float("inf"), 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as run:
            start = time.perf_counter()
            result = run_crops(data, Path(run), CropSettings(workers=workers, strategy=strategy))
            best = min(best, time.perf_counter() - start)
            n_crops = result.crops
    return best, n_crops


def main() -> None:
    from histoembed.crops import n_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="Generated images.")
    ap.add_argument("--side", type=int, default=2048, help="Image side in pixels.")
    ap.add_argument("--repeats", type=int, default=2, help="Timed runs per setting; the best is reported.")
    ap.add_argument("--strategy", default="blobs", help="Crop strategy to time.")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "histoembed-bench-crops",
                    help="Folder for the generated images (reused when it matches).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the generated images.")
    args = ap.parse_args()

    t0 = time.perf_counter()
    data = make_images(args.cache, args.images, args.side, args.seed)
    print(f"data: {args.images} images of {args.side}x{args.side} in {data} "
          f"(ready in {time.perf_counter() - t0:.1f} s)")
    cores = n_workers(0)
    print(f"{'workers':>8} {'seconds':>8} {'crops':>6} {'images/s':>9} {'images/s/core':>14}")
    for workers in sorted({1, cores}):
        seconds, n_crops = time_stage(data, workers, args.repeats, args.strategy)
        rate = args.images / seconds
        print(f"{workers:>8} {seconds:>8.2f} {n_crops:>6} {rate:>9.2f} {rate / workers:>14.2f}")


if __name__ == "__main__":
    main()

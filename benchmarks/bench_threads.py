"""Two `histoembed fit` at once against one alone: do concurrent runs slow down in proportion?

On C usable CPUs, two runs that each size their thread pools to C oversubscribe them 2x.
Proportional would be about 2x the time of one run alone (twice the work on the same CPUs).
This times, in one process tree and one after the other:

1. one fit alone (default threads: the CPUs this process may use);
2. two fits at once, default threads each;
3. two fits at once, ``--threads`` = C / 2 each (what to pass when runs share a machine).

    python benchmarks/bench_threads.py [--images 300 --dim 512 --folds 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fits(runs: list[Path], threads: int | None, folds: int) -> float:
    """Wall seconds until every run's fit has finished (all started together)."""
    extra = ["--threads", str(threads)] if threads else []
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "histoembed", "fit", "--run", str(r), "--folds", str(folds),
                               "--bootstrap", "0", *extra], stdout=subprocess.DEVNULL) for r in runs]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"fit failed ({p.args})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()

    from histoembed.core.cpus import usable_cpus
    from histoembed.synthetic import write_synthetic_features

    cpus = usable_cpus()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(tmp) / f"run{i}" for i in range(2)]
        for r in runs:
            write_synthetic_features(r, n_images=args.images, n_classes=4, crops=5, views=4, dim=args.dim,
                                     signal=0.6, seed=0)

        def fresh() -> None:  # every timing fits from scratch
            for r in runs:
                for name in ("metrics.json",):
                    (r / name).unlink(missing_ok=True)

        fresh()
        alone = fits(runs[:1], None, args.folds)
        fresh()
        both = fits(runs, None, args.folds)
        fresh()
        split = fits(runs, max(1, cpus // 2), args.folds)
    print(f"usable CPUs: {cpus}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"features: {args.images} images x 5 crops x 4 views x {args.dim}-d, 4 classes; --folds {args.folds}")
    print("| | wall s | vs one alone |")
    print("|---|---:|---:|")
    print(f"| one fit alone (threads {cpus}) | {alone:.1f} | 1.00x |")
    print(f"| two fits at once, threads {cpus} each | {both:.1f} | {both / alone:.2f}x |")
    print(f"| two fits at once, --threads {max(1, cpus // 2)} each | {split:.1f} | {split / alone:.2f}x |")


if __name__ == "__main__":
    main()

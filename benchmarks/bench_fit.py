"""Time `histoembed fit --folds 10` end to end on generated features of the reference size.

700 images x 5 crops x 4 views of 1024-d features, 4 classes (the size of the reference
challenge with Phikon-v2 and --repeats 4). Target on the 2-core development machine: < 60 s.

    python benchmarks/bench_fit.py [--folds 10] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=700)
    parser.add_argument("--crops", type=int, default=5)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--signal", type=float, default=0.6, help="Class separation of the generated features.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the run here instead of a temporary folder.")
    args = parser.parse_args()

    from histoembed.synthetic import write_synthetic_features

    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp) / "run"
        start = time.perf_counter()
        write_synthetic_features(run, n_images=args.images, n_classes=args.classes, crops=args.crops,
                                 views=args.views, dim=args.dim, signal=args.signal, seed=0)
        generated = time.perf_counter() - start
        cmd = [sys.executable, "-m", "histoembed", "fit", "--run", str(run), "--folds", str(args.folds)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((run / "metrics.json").read_text())
        rows = args.images * args.crops * args.views
        print(f"\nfeatures: {args.images} images x {args.crops} crops x {args.views} views = {rows} rows "
              f"x {args.dim}-d, {args.classes} classes (generated in {generated:.1f} s)")
        print(f"command: {' '.join(cmd[1:])}")
        print(f"fit wall time: {seconds:.1f} s (end to end, including start-up)")
        for head, m in metrics["heads"].items():
            print(f"  {head:5s} OOF macro-F1 {m['macro_f1']:.3f}  "
                  f"[{m['macro_f1_ci'][0]:.3f}, {m['macro_f1_ci'][1]:.3f}]  NLL {m['nll']:.3f}")


if __name__ == "__main__":
    main()

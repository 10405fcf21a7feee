"""Time `histoembed fit --folds 10` end to end on generated features of the reference size.

700 images x 5 crops x 4 views of 1024-d features, 4 classes (the size of the reference
challenge with Phikon-v2 and --repeats 4). Targets on the 2-core development machine:
the default heads (mlp,xgb) < 60 s; all four heads (mlp,xgb,logreg,abmil) < 120 s.

Each head set is a fresh `histoembed fit` process on the same features; the machine's load
average is printed before and after each, because a shared machine slows every figure.

    python benchmarks/bench_fit.py [--folds 10] [--heads mlp,xgb --heads mlp,xgb,logreg,abmil] [--keep DIR]
    python benchmarks/bench_fit.py --baseline /tmp/old   # also time another version's source tree

``--baseline DIR`` times the same fit (default heads) with another version's source tree
first on the Python path (e.g. ``git archive COMMIT | tar -x -C DIR``), on the same features in
the same run, so a change in speed shows as a ratio that does not depend on the machine's load.
Each fit's CPU seconds (user + system, from the kernel) are printed beside its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


RUN_INSTALLED = "import runpy; runpy.run_module('histoembed', run_name='__main__')"
# An editable install puts a finder in sys.meta_path that wins over PYTHONPATH: drop it, then import the tree.
RUN_FROM = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path "
            "if 'editable' not in getattr(f, '__module__', '')]; sys.path.insert(0, {tree!r}); "
            "import histoembed; assert histoembed.__file__.startswith({tree!r}), histoembed.__file__; "
            "runpy.run_module('histoembed', run_name='__main__')")


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=700)
    parser.add_argument("--crops", type=int, default=5)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--heads", action="append", default=None,
                        help="A head set to time (repeat for several); default: mlp,xgb and mlp,xgb,logreg,abmil.")
    parser.add_argument("--signal", type=float, default=0.6, help="Class separation of the generated features.")
    parser.add_argument("--keep", type=Path, default=None, help="Write the runs here instead of a temporary folder.")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="Another version's source tree: its `fit` (default heads) is timed first, on the same features.")
    args = parser.parse_args()
    head_sets = args.heads or ["mlp,xgb", "mlp,xgb,logreg,abmil"]
    jobs = ([("baseline", None, args.baseline)] if args.baseline else []) + [(h, h, None) for h in head_sets]

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # one copy: tests/synthetic_inputs.py
    from synthetic_inputs import write_synthetic_features

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        base = root / "features-run"
        start = time.perf_counter()
        write_synthetic_features(base, n_images=args.images, n_classes=args.classes, crops=args.crops,
                                 views=args.views, dim=args.dim, signal=args.signal, seed=0)
        generated = time.perf_counter() - start
        rows = args.images * args.crops * args.views
        print(f"features: {args.images} images x {args.crops} crops x {args.views} views = {rows} rows "
              f"x {args.dim}-d, {args.classes} classes (generated in {generated:.1f} s); "
              f"{os.cpu_count()} CPUs")
        results = []
        for name, heads, tree in jobs:
            run = root / f"run-{name.replace(',', '-')}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            cmd = [sys.executable, "-c", RUN_FROM.format(tree=str(tree.resolve())) if tree else RUN_INSTALLED,
                   "fit", "--run", str(run), "--folds", str(args.folds)]
            cmd += ["--heads", heads] if heads else []
            env = None
            before, cpu0 = load(), resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            seconds = time.perf_counter() - start
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            metrics = json.loads((run / "metrics.json").read_text())
            results.append((name, seconds, cpu, before, load(), metrics))
        base_wall = results[0][1] if args.baseline else None
        for name, seconds, cpu, before, after, metrics in results:
            ratio = f", {seconds / base_wall:.2f}x the baseline's wall time" if base_wall else ""
            print(f"\n{'--heads ' + name if name != 'baseline' else 'baseline (' + str(args.baseline) + ')'}: "
                  f"fit wall time {seconds:.1f} s (end to end, including start-up), CPU {cpu:.1f} s{ratio}; "
                  f"load average (1, 5, 15 min) before {before}, after {after}")
            if "decision" not in metrics:
                continue
            for head, m in metrics["heads"].items():
                print(f"  {head:6s} OOF macro-F1 {m['macro_f1']:.3f}  "
                      f"[{m['macro_f1_ci'][0]:.3f}, {m['macro_f1_ci'][1]:.3f}]  "
                      f"NLL {m['nll_before_calibration']:.3f} -> {m['nll']:.3f}")
            d, c = metrics["decision"], metrics["conformal"]
            print(f"  argmax {d['argmax']['macro_f1']:.3f}, with offsets {d['offsets']['macro_f1']:.3f} "
                  f"(submission: {d['submission_uses']}); conformal coverage {c['coverage']:.3f} "
                  f"at alpha {c['alpha']}, mean set size {c['mean_set_size']:.2f}")


if __name__ == "__main__":
    main()

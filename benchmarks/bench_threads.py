"""Two `histoembed fit` at once against one alone: do concurrent runs slow down in proportion?

On C usable CPUs, two runs that each size their thread pools to C oversubscribe them 2x.
Proportional would be about 2x the time of one run alone (twice the work on the same CPUs);
issue 22's limit is 2.5x. No pinning: the runs see the machine as a user's runs do. Each
setting is timed as one fit alone and two fits at once, in rounds whose order is reversed every
other round (so a change in the machine's other load falls on every setting alike):

- ``passive``: the package's default, OpenMP threads that wait sleep (``OMP_WAIT_POLICY=PASSIVE``,
  set by ``histoembed/__init__.py`` unless the user set it);
- ``spin``: OpenMP's own default, as before that change (the variable removed again after the
  package's import, before torch and XGBoost load), threads spinning a while before they sleep;
- ``threads C/2``: the default policy with ``--threads`` = C / 2 each (two fits at once only).

    python benchmarks/bench_threads.py [--images 200 --dim 512 --folds 3 --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python -m histoembed` with libgomp's default wait policy: the package sets PASSIVE at import; take it
# out again before torch or XGBoost (and so libgomp) load.
SPIN = ("import os, runpy, histoembed; os.environ.pop('OMP_WAIT_POLICY', None); "
        "runpy.run_module('histoembed', run_name='__main__')")


def fits(runs: list[Path], folds: int, spin: bool = False, threads: int | None = None) -> float:
    """Wall seconds until every run's fit has finished (all started together)."""
    extra = ["--threads", str(threads)] if threads else []
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # what the package decides
    entry = ["-c", SPIN] if spin else ["-m", "histoembed"]
    for r in runs:
        (r / "metrics.json").unlink(missing_ok=True)  # every timing fits from scratch
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, *entry, "fit", "--run", str(r), "--folds", str(folds),
                               "--bootstrap", "0", *extra], stdout=subprocess.DEVNULL, env=env) for r in runs]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"fit failed ({p.args})")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of every timing (order reversed each round).")
    args = parser.parse_args()

    from histoembed.core.cpus import usable_cpus
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # one copy: tests/synthetic_inputs.py
    from synthetic_inputs import write_synthetic_features

    cpus = usable_cpus()
    half = max(1, cpus // 2)
    timings = {  # name: (runs at once, spin, threads)
        "one fit alone, passive (default)": (1, False, None),
        "one fit alone, spin (before)": (1, True, None),
        "two fits at once, passive (default)": (2, False, None),
        "two fits at once, spin (before)": (2, True, None),
        f"two fits at once, passive, --threads {half} each": (2, False, half),
    }
    seconds: dict[str, list[float]] = {k: [] for k in timings}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [Path(tmp) / f"run{i}" for i in range(2)]
        for r in runs:
            write_synthetic_features(r, n_images=args.images, n_classes=4, crops=5, views=4, dim=args.dim,
                                     signal=0.6, seed=0)
        for round_ in range(args.rounds):
            order = list(timings) if round_ % 2 == 0 else list(reversed(timings))
            for name in order:
                n, spin, threads = timings[name]
                seconds[name].append(fits(runs[:n], args.folds, spin, threads))
                print(f"  round {round_ + 1}: {name}: {seconds[name][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
            load.append(os.getloadavg()[0])
    print(f"usable CPUs: {cpus}; 1-minute load average before / after each round: "
          f"{' / '.join(f'{v:.1f}' for v in load)}")
    print(f"features: {args.images} images x 5 crops x 4 views x {args.dim}-d, 4 classes; --folds {args.folds}; "
          f"{args.rounds} round(s), median wall s")
    med = {k: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
           for k, v in seconds.items()}
    alone = {"passive": med["one fit alone, passive (default)"], "spin": med["one fit alone, spin (before)"]}
    print("| | wall s (runs) | vs one alone, same policy |")
    print("|---|---:|---:|")
    for name, v in seconds.items():
        base = alone["spin" if "spin" in name else "passive"]
        print(f"| {name} | {med[name]:.1f} ({', '.join(f'{s:.1f}' for s in v)}) | {med[name] / base:.2f}x |")


if __name__ == "__main__":
    main()

"""Peak memory of `histoembed fit --encoder A,B` on two generated 1,536-d stores of the reference size.

691 training + 477 test images x 10 crops x 4 views, two encoders of 1,536-d each (the same crops
and views), 4 classes. Each fit is a fresh process (the fit stage, ``histoembed.stages.fit.run_fit`` with the
settings ``histoembed fit ARGS`` resolves, without the drift check the command runs after it) that
reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

- one encoder (``--encoder a``): the baseline;
- both, ``--encoder-fusion logits``: one store in memory at a time (fit A's heads, keep their
  out-of-fold logits, let A's features go, then B), so the peak should be close to one encoder's;
- both, ``--encoder-fusion concat``: both stores side by side (3,072-d), for comparison.

Small heads and few folds keep it to a few minutes on two cores: the features, not the heads, set the peak.

    python benchmarks/bench_multienc.py [--folds 3] [--heads mlp,logreg] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The fit stage alone (histoembed.stages.fit.run_fit with the settings `histoembed fit ARGS` resolves), without the
# drift check the command runs after it, so the peak is the fit's.
CHILD = ("import resource, sys\n"
         "from histoembed.cli.app import show_settings\n"
         "from histoembed.core import config as cfg\n"
         "from histoembed.stages.fit import run_fit\n"
         "import tomllib\n"
         "settings = cfg.FitSettings.model_validate(tomllib.loads(show_settings('fit', {args!r}))['fit'])\n"
         "run_fit({run!r}, settings)\n"
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'EXIT', 0)")

TOML = """\
[fit]
bootstrap = 0
[fit.mlp]
hidden = 64
epochs = 3
patience = 2
batch_size = 512
"""


def make_run(run: Path, train: int, test: int, crops: int, views: int, dim: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # one copy: tests/synthetic_inputs.py
    from synthetic_inputs import write_synthetic_features

    common = {"n_images": train, "n_test": test, "n_classes": 4, "crops": crops, "views": views, "dim": dim,
              "seed": 0}
    write_synthetic_features(run, encoder="a", feature_seed=1, **common)
    write_synthetic_features(run, encoder="b", feature_seed=2, **common)


def fit(run: Path, config: Path, *args: str) -> tuple[float, float, int]:
    """(peak RSS in MiB, seconds, exit code) of one `histoembed fit` process."""
    argv = ["--config", str(config), *args]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(args=argv, run=str(run))], capture_output=True,
                         text=True)
    seconds = time.perf_counter() - started
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PEAK_RSS_KB")), None)
    if line is None:
        sys.exit(f"fit {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    _, kb, _, code = line.split()
    return int(kb) / 1024, seconds, int(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=691)
    ap.add_argument("--test", type=int, default=477)
    ap.add_argument("--crops", type=int, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--heads", default="mlp,logreg")
    ap.add_argument("--keep", type=Path, help="Write the run here and keep it (default: a temporary folder).")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench-multienc-"))
    run = root / "run"
    started = time.perf_counter()
    make_run(run, a.train, a.test, a.crops, a.views, a.dim)
    store_mib = sum(f.stat().st_size for f in (run / "features").rglob("*.parquet")) / 2**20
    rows = a.train * a.crops * a.views
    print(f"generated 2 stores of {a.train}+{a.test} images x {a.crops} crops x {a.views} views x {a.dim}-d "
          f"({store_mib:.0f} MiB of Parquet; training features {rows * a.dim * 4 / 2**20:.0f} MiB per store "
          f"in float32) in {time.perf_counter() - started:.0f} s", flush=True)
    config = root / "histoembed.toml"
    config.write_text(TOML)
    common = ["--folds", str(a.folds), "--heads", a.heads]
    results = {}
    for name, args in (("one encoder (a)", ["--encoder", "a"]),
                       ("a,b logits", ["--encoder", "a,b", "--encoder-fusion", "logits"]),
                       ("a,b concat", ["--encoder", "a,b", "--encoder-fusion", "concat"])):
        for f in ("metrics.json",):   # each fit from scratch
            (run / f).unlink(missing_ok=True)
        peak, seconds, code = fit(run, config, *common, *args)
        results[name] = {"peak_rss_mib": round(peak), "seconds": round(seconds, 1), "exit": code}
        print(f"{name:16s} peak RSS {peak:7.0f} MiB  {seconds:6.1f} s  exit {code}", flush=True)
    print(json.dumps(results))
    if a.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

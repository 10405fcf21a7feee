"""The demo: a synthetic dataset through every stage, on a CPU, in a few minutes.

``run_demo(out)`` writes ``out/data`` (the reference layout, generated) and runs qc,
crops, embed (the offline pretrained EfficientNet-Lite0, 2 views), fit (5 folds),
submit and report into ``out/run``. Every path is built from ``out``, so the demo does
the same thing from any working folder. Each stage skips work it has already done, so
a second run is quick.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from histoembed.stages import crops, drift, fit, qc, report, submit
from histoembed.core import store
from histoembed.core.config import Settings, override
from histoembed.core.errors import UserError
from histoembed.tools.synthetic import make_dataset

DEMO_ENCODER = "efficientnet-lite0"
DATA_PARAMS_FILE = "demo.json"


@dataclass
class DemoResult:
    data: Path
    run: Path
    report: Path
    submission: Path
    seconds: dict[str, float] = field(default_factory=dict)   # stage -> wall seconds


def demo_settings(settings: Settings | None = None, encoder: str = DEMO_ENCODER, repeats: int = 2,
                  folds: int = 5, seed: int = 0) -> Settings:
    """The demo's settings: the offline pretrained encoder (for QC thumbnails too), 2 views, 5 folds, one seed."""
    settings = settings or Settings()
    settings.qc = override(settings.qc, encoder=encoder)
    settings.embed = override(settings.embed, encoder=encoder, repeats=repeats, seed=seed)
    settings.fit = override(settings.fit, folds=folds, seed=seed)
    return settings


def make_demo_data(data: Path, n_train: int, n_test: int, seed: int) -> bool:
    """Generate the synthetic dataset unless ``data`` already holds one made with these numbers.

    Returns True when it generated.
    """
    params = {"n_train": n_train, "n_test": n_test, "seed": seed}
    marker = data / DATA_PARAMS_FILE
    if marker.exists() and json.loads(marker.read_text()) == params:
        return False
    if data.exists() and any(data.iterdir()) and not marker.exists():
        raise UserError("folder exists and was not made by the demo", path=data,
                        hint="choose another --out, or remove the folder")
    if marker.exists():  # other numbers: start again
        shutil.rmtree(data)
    make_dataset(data, n_train, n_test, seed, outliers=True)
    store.write_json(params, marker)
    return True


STAGES = ("qc", "crops", "embed", "fit", "submit", "report")


def run_pipeline(data: Path, run: Path, settings: Settings, say: Callable[[str], None] = lambda msg: None,
                 stages: tuple[str, ...] = STAGES) -> dict[str, float]:
    """The ``stages`` (default: all, in order) on ``data`` into ``run``; wall seconds per stage."""
    from histoembed.stages import embed  # torch: loaded only when the pipeline runs

    every = [
        ("qc", lambda: qc.run_qc(data, run, settings.qc)),
        ("crops", lambda: crops.run_crops(data, run, settings.crops)),
        ("embed", lambda: embed.run_embed(run, settings.embed, settings.augment)),
        ("fit", lambda: (fit.run_fit(run, settings.fit), drift.run_drift(run, settings.drift))),  # as `histoembed fit`
        ("submit", lambda: submit.run_submit(data, run)),
        ("report", lambda: report.write_report(run, data)),
    ]
    seconds = {}
    for name, stage in every:
        if name not in stages:
            continue
        say(f"{name} ...")
        start = time.perf_counter()
        stage()
        seconds[name] = time.perf_counter() - start
        say(f"{name} done in {seconds[name]:.1f} s")
    return seconds


def run_demo(out: Path, n_train: int = 120, n_test: int = 40, seed: int = 0,
             settings: Settings | None = None, say: Callable[[str], None] = lambda msg: None) -> DemoResult:
    """Generate ``out/data`` and run every stage into ``out/run``."""
    out = Path(out).resolve()
    data, run = out / "data", out / "run"
    settings = settings or demo_settings(seed=seed)
    start = time.perf_counter()
    say(f"generating {n_train} training and {n_test} test images in {data} ...")
    make_demo_data(data, n_train, n_test, seed)
    seconds = {"data": time.perf_counter() - start}
    seconds.update(run_pipeline(data, run, settings, say))
    return DemoResult(data, run, run / store.REPORT_FILE, run / store.SUBMISSION_FILE, seconds)

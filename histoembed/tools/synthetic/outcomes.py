"""``synth --task survival|regression``: outcomes with a known answer for a synthetic dataset (issue 29).

The dataset is drawn as for classification (images or ``--slides``); its class, a tissue property the images
show, then drives the outcome, and the label column is replaced by the outcome columns:

- survival: ``time`` and ``event``. An item of class rank k (classes sorted by name) has its event after an
  exponential time of mean ``SURVIVAL_MEAN / HAZARD_RATIO ** k``; a quarter of the items are censored, at a
  uniform share of that time (``event`` 0). A risk that ranks the classes has a C-index well above 0.5.
- regression: ``target`` = k + Gaussian noise (sd ``TARGET_NOISE``): R² of a model that sees the class ~ 0.8.

With ``signal`` off (the control) the outcomes are drawn from a class chosen at random for each item, so they
do not depend on what the images show: the C-index's interval should hold 0.5 and R² sit near 0 or below.
``outcomes.json`` records the rule and each item's class rank.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError

SURVIVAL_MEAN = 24.0   # months for the lowest class rank
HAZARD_RATIO = 3.0     # per class rank
CENSORED = 0.25
TARGET_NOISE = 0.3


def _outcome(task: str, rank: int, rng: np.random.Generator) -> dict[str, str]:
    if task == "survival":
        t = float(rng.exponential(SURVIVAL_MEAN / HAZARD_RATIO ** rank)) + 0.1
        if rng.random() < CENSORED:
            return {"time": f"{t * rng.uniform(0.2, 1.0):.3f}", "event": "0"}
        return {"time": f"{t:.3f}", "event": "1"}
    return {"target": f"{rank + rng.normal(0, TARGET_NOISE):.4f}"}


def plant_outcomes(out: Path, task: str, signal: bool = True, seed: int = 0) -> dict:
    """Replace the label column of ``out``'s listing (manifest.csv, else train_labels.csv) by the outcomes of
    ``task``; test rows get empty outcomes. Returns what ``outcomes.json`` records."""
    if task not in ("survival", "regression"):
        raise UserError(f"--task {task!r}: synth plants survival or regression outcomes")
    out = Path(out)
    path = out / "manifest.csv" if (out / "manifest.csv").exists() else out / "train_labels.csv"
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    train = [r for r in rows if r.get("split", "train") == "train"]
    classes = sorted({r["label"] for r in train if r.get("label")})
    rng = np.random.default_rng([seed, 29])
    columns = ["time", "event"] if task == "survival" else ["target"]
    ranks = {}
    for r in rows:
        label = r.pop("label", None)
        if r.get("split", "train") != "train" or not label:
            r.update(dict.fromkeys(columns, ""))
            continue
        rank = classes.index(label) if signal else int(rng.integers(len(classes)))
        r.update(_outcome(task, rank, rng))
        ranks[r.get("image") or r.get("sample_index")] = rank
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [h for h in header if h != "label"] + columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with store.atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    record = {"task": task, "signal": signal, "file": path.name, "classes": classes,
              "rule": (f"time ~ Exponential(mean {SURVIVAL_MEAN} / {HAZARD_RATIO}^rank), {CENSORED:.0%} censored "
                       "at a uniform share of it" if task == "survival" else
                       f"target = rank + Normal(0, {TARGET_NOISE})")
              + ("; rank = the class's position in classes" if signal else
                 "; rank drawn at random (no-signal control)"),
              "rank": ranks}
    store.write_json(record, out / "outcomes.json")
    return record

"""Which slide patches fit and inference leave out for their artifact flags (``crops.parquet``'s ``flags``).

One rule for every reader of the features, so fit, submit and predict agree: a patch is used when each of its
flags is one the fit keeps (``FitSettings.keep_artifacts``, stored with the fitted models); an image (slide)
whose every patch would go keeps them all, and is named, since a prediction from flagged patches beats none and
a training slide must not vanish silently. Flat images' crops have no flags and are always used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.inputs import artifacts


@dataclass
class LeftOut:
    """What the flags left out of one split's features."""

    patches: int = 0                                   # crops (patches) left out
    slides: int = 0                                    # slides that lost at least one
    by_cause: dict[str, int] = field(default_factory=dict)   # patches with each flag (a patch may have several)
    per_slide: dict[str, int] = field(default_factory=dict)  # image_id -> patches left out
    kept_whole: list[str] = field(default_factory=list)      # slides whose every patch is flagged: all kept

    def as_dict(self) -> dict:
        return {"patches": self.patches, "slides": self.slides, "by_cause": self.by_cause,
                "per_slide": self.per_slide, "kept_whole": self.kept_whole}


def left_out_crops(run: str | Path, split: str, keep: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], LeftOut]:
    """(image_id -> the crop indices its readers leave out, what was left out), by the module docstring's rule:
    what ``usable_rows`` applies to rows in memory and the streamed fit to one slide's rows at a time. Empty for a
    crops file without flags (of images, or of an older version)."""
    path = Path(run) / store.CROPS_FILE
    left = LeftOut()
    if not path.exists() or "flags" not in pq.read_schema(path).names:   # no crops file: its reader says so
        return {}, left
    flagged, counts = _flagged_and_counts(path, split, set(keep))
    causes: Counter = Counter()
    for name, crops in flagged.items():
        if len(crops) >= counts.get(name, 0):
            left.kept_whole.append(name)
            continue
        left.per_slide[name] = len(crops)
        causes.update(f for flags in crops.values() for f in flags if f not in keep)
    left.patches, left.slides = sum(left.per_slide.values()), len(left.per_slide)
    left.by_cause = {k: causes[k] for k in artifacts.FLAG_NAMES if causes[k]}
    return {name: np.array(sorted(flagged[name]), np.int64) for name in left.per_slide}, left


def _flagged_and_counts(path: Path, split: str, kept: set[str]) -> tuple[dict[str, dict[int, list[str]]], Counter]:
    """(image_id -> {crop_index: flags} of ``split``'s patches with a flag not in ``kept``, image_id -> its crops),
    in one pass a batch at a time; only the flagged patches become Python objects (a cohort's crops file holds
    millions of patches, issue 37)."""
    flagged: dict[str, dict[int, list[str]]] = {}
    counts: Counter = Counter()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1 << 16,
                                                   columns=["image_id", "split", "crop_index", "flags"]):
        t = pa.Table.from_batches([batch])
        t = t.filter(pc.equal(t["split"], split))
        for pair in pc.value_counts(t["image_id"]).to_pylist():
            counts[pair["values"]] += pair["counts"]
        t = t.filter(pc.greater(pc.fill_null(pc.list_value_length(t["flags"]), 0), 0))
        for image_id, crop, flags in zip(*(t[c].to_pylist() for c in ("image_id", "crop_index", "flags"))):
            if not set(flags) <= kept:
                flagged.setdefault(image_id, {})[int(crop)] = flags
    return flagged, counts


def usable_rows(image_id: np.ndarray, crop_index: np.ndarray, run: str | Path, split: str,
                keep: Sequence[str] = ()) -> tuple[np.ndarray, LeftOut]:
    """(a bool per feature row: its patch is used, what was left out) for rows of ``split`` given by their
    ``image_id`` and ``crop_index``."""
    drop, left = left_out_crops(run, split, keep)
    use = np.ones(len(image_id), bool)
    if drop:
        sets = {name: set(crops.tolist()) for name, crops in drop.items()}
        for r, (name, crop) in enumerate(zip(image_id.tolist(), crop_index.tolist())):
            if name in sets and int(crop) in sets[name]:
                use[r] = False
    return use, left


def describe(left: LeftOut, keep: Sequence[str] = ()) -> str | None:
    """``left`` in words for the console (None when nothing was left out or kept whole)."""
    if not left.patches and not left.kept_whole:
        return None
    causes = ", ".join(f"{k} {v}" for k, v in left.by_cause.items())
    text = (f"artifacts: {left.patches} flagged patches of {left.slides} slide(s) left out ({causes})"
            + (f", {', '.join(keep)} kept" if keep else "") + " (--keep-artifacts KIND,KIND keeps them)")
    if left.kept_whole:
        text += (f"; every patch of {len(left.kept_whole)} slide(s) is flagged, so all are kept: "
                 + ", ".join(left.kept_whole[:5]) + (" ..." if len(left.kept_whole) > 5 else ""))
    return text

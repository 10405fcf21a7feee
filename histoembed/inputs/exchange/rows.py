"""A read feature file as the slide rows of ``crops.parquet``: what ``histoembed import`` writes so that the
later stages find the imported patches where ``crops`` would have put its own.

A slide's row (``store.crops_schema(slides=True, ...)``) says which image and label the patch belongs to, its
level-0 box, the pyramid level and scale it is read at, the slide's path and ``patch_digest``, the patch's
identity. The features a store holds for a slide patch are keyed by that digest (``store.crop_hashes``), so an
imported patch's digest takes the feature file's content stamp beside the slide's: a changed file, like a changed
slide, makes the features stale.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.cropping import patch_digest
from histoembed.inputs.dataset import Sample
from histoembed.inputs.exchange.record import FeatureFile

STRATEGY = "import-{kind}"  # the rows' strategy column: import-trident, import-clam, import-stamp


def patch_level(level_downsamples, side0: int, size: int) -> int:
    """The pyramid level a patch of ``side0`` level-0 pixels is read at for ``size`` pixels: the coarsest level
    not coarser than the patch needs (OpenSlide's get_best_level_for_downsample, from the downsamples alone)."""
    factor = side0 / size
    fits = [i for i, d in enumerate(level_downsamples) if d <= factor + 1e-9]
    return max(fits, default=0)


def embedded_mpp(record: FeatureFile, level0_mpp: float, size: int) -> float:
    """Microns per pixel of the patches as embedded: what the file says, else the level-0 side over the size."""
    return float(record.mpp) if record.mpp else level0_mpp * record.patch_size_level0 / size


def slide_rows(record: FeatureFile, sample: Sample, *, level: int, level0_mpp: float, stamp: str | None,
               size: int | None = None, groups: bool = False) -> pa.Table:
    """``record``'s patches as rows of ``crops.parquet`` for ``sample`` (its slide), in the file's order, so that
    crop ``i`` is feature row ``i``. ``stamp`` is the content stamp of the slide and the feature file together
    (``patch_digest`` is built from it); ``size`` the patch side in pixels when the file does not say it."""
    size = size or record.patch_size
    if not size:
        raise UserError("the file does not say the patches' size in pixels", path=record.path,
                        hint="give it (the pixels each patch was embedded at, e.g. 224)")
    boxes = np.asarray(record.boxes, np.int64)
    if boxes.size and (boxes.max() >= 2**31 or boxes.min() < -(2**31)):
        raise UserError("patch coordinates beyond 2^31 pixels", path=record.path)
    mpp = embedded_mpp(record, level0_mpp, size)
    n = len(boxes)
    columns = {
        "image_id": [sample.image_id] * n, "split": [sample.split] * n, "label": [sample.label] * n,
        "crop_index": np.arange(n, dtype=np.int32),
        **{name: boxes[:, i].astype(np.int32) for i, name in enumerate(("x0", "y0", "x1", "y1"))},
        "tissue_fraction": [None] * n,  # not in the file: the tool that cut the patches judged the tissue
        "strategy": [STRATEGY.format(kind=record.kind)] * n, "scale": np.ones(n, np.float32), "png": [None] * n,
        "level": np.full(n, level, np.int32), "mpp": np.full(n, mpp, np.float32),
        "source": [str(sample.image.resolve())] * n,
        "patch_digest": [patch_digest(stamp, level, tuple(int(v) for v in b), size, mpp) for b in boxes.tolist()],
    }
    if groups:
        columns["group"] = [sample.group] * n
    schema = store.crops_schema(slides=True, groups=groups)
    # The artifact flags and scores (crops' own patch scoring) are not in a feature file: null, i.e. not scored.
    return pa.Table.from_arrays([pa.array(columns.get(f.name, [None] * n), type=f.type) for f in schema],
                                schema=schema)

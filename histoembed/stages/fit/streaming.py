"""The training set of a cohort larger than memory (issue 37): bags read from the store slide by slide.

When the training rows as float32 would take more than a quarter of the fit's memory budget
(``[fit] memory_gb``, default half of the machine's memory; ``[fit] stream`` forces either way),
``fit`` never reads the store whole: ``load_streamed`` reads only the store's index (which image's
rows lie where) and the per-image facts of ``crops.parquet`` (labels, QC, groups, one fingerprint
of each image's crops), then ``StoredBags`` reads each slide once for the means and the sums the heads
standardise with, checking it as ``check_complete`` and ``read_features`` would, and again when a
head needs its rows, leaving out the slides' flagged patches as ``patch_flags`` says. The test split is
never read. The numbers are those of the in-memory path:
the same rows, in the same order, through the same arithmetic (``models.heads.stored``).

Small stores stay in memory (the whole test suite fits many times; reading slide by slide costs
a little per slide). Survival and regression stream as classification does, and so does each encoder of
``--encoder A,B`` (logits fusion); scale fusion ``concat`` and encoder fusion ``concat`` are fitted in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed.core import feature_store, memory, store
from histoembed.core.config import FitSettings
from histoembed.core.errors import UserError
from histoembed.core.feature_store import bags as slides
from histoembed.inputs import patch_flags
from histoembed.models.heads import stored
from histoembed.models.heads.stored import StoredBags
from histoembed.stages.fit.training import TrainingSet, load_training_set, qc_flags, read_labels, select_images

GIB = 1 << 30


def wanted(store_dir: Path, settings: FitSettings) -> bool:
    """Whether this fit streams its bags (see the module docstring)."""
    if settings.stream == "never" or settings.scale_fusion != "crops":
        return False
    if settings.stream == "always":
        return True
    rows, dim = 0, 0
    for part in feature_store.feature_parts(store_dir):
        try:
            md = pq.ParquetFile(part).metadata
            dim = pq.read_schema(part).field("embedding").type.list_size
        except (OSError, pa.ArrowInvalid, KeyError):
            return False    # read_features names the broken part
        rows += md.num_rows
    return rows * dim * 4 > memory.memory_budget(settings.memory_gb) // 4


@dataclass
class Streamed:
    """What ``load_streamed`` found before any embedding was read; ``bags()`` reads them."""

    run: Path
    ts: TrainingSet
    index: slides.SlideIndex
    budget: int
    left_out: dict[str, np.ndarray]   # image_id -> crops its bags leave out (flagged slide patches)

    def bags(self) -> StoredBags:
        """Every training slide read once (means, sums, checks): the heads' bags, read again when needed."""
        index, ts = self.index, self.ts
        biggest = max(ts.image_ids, key=index.rows)
        need = index.rows(biggest) * index.dim * 4
        if need > self.budget // 4:
            raise UserError(f"training slide {biggest}'s bag alone holds {index.rows(biggest):,} rows of "
                            f"{index.dim} features ({need / GIB:.2f} GiB as float32), more than a quarter of the "
                            f"fit's memory budget ({self.budget / GIB:.2f} GiB)", path=index.store_dir,
                            hint="raise [fit] memory_gb in histoembed.toml (or cut fewer patches per slide)")
        expected = slides.crop_fingerprints(self.run, "train", digests=index.has_hash)
        views = feature_store.views_of("train", int(index.meta.get("repeats", 1)), bool(index.meta.get("tta", True)))
        source = stored.open_source(index, ts.image_ids, self.budget, self.left_out)
        source.scan(lambda rows: slides.check_slide(rows, expected.get(rows.image_id), views, index.store_dir,
                                                    "train"))
        return source.bags()


def load(run: Path, encoder: str | None, settings: FitSettings, labels: dict[str, str] | None = None,
         keep_dtype: bool = True, may_stream: bool = True) -> tuple[TrainingSet, Streamed | None]:
    """The training set, with the bags to stream when the store is too big for memory (``wanted``), else with its
    rows in memory (``load_training_set``; ``labels`` and ``keep_dtype`` as there)."""
    run = Path(run)
    if may_stream and wanted(feature_store.find_feature_store(run, encoder), settings):
        streamed = load_streamed(run, encoder, settings, labels)
        return streamed.ts, streamed
    return load_training_set(run, encoder, settings.include_flagged, settings.scale_fusion, keep_dtype=keep_dtype,
                             keep_artifacts=settings.keep_artifacts, labels=labels), None


def load_streamed(run: Path, encoder: str | None, settings: FitSettings,
                  labels: dict[str, str] | None = None) -> Streamed:
    """The training set from the store's index and crops.parquet, one row per image (no embedding read).
    ``labels``: as for ``load_training_set`` (survival and regression give their items)."""
    run = Path(run)
    store_dir = feature_store.find_feature_store(run, encoder)
    if labels is None:
        read_labels(run)
    qc_flags(run)
    index = slides.slide_index(store_dir, "train")
    if not index.pieces:
        raise UserError("the feature store has no training rows", path=store_dir,
                        hint="run `histoembed embed` on a run whose crops include the train split")
    crops_path = run / store.CROPS_FILE
    hint = "run `histoembed embed` (it resumes a partial store and replaces what is stale)"
    if not index.has_hash and index.meta.get("crops_key") != store.read_meta(crops_path).get("key"):
        raise UserError(f"the features were embedded from other crops than {store.CROPS_FILE} holds now "
                        "(crops changed since `histoembed embed`)", path=crops_path, hint=hint)
    images, crop_scales, digest = crops_facts(crops_path)
    missing = sorted(set(images) - set(index.pieces))
    if missing:
        raise UserError(f"the features are partial: {len(missing)} training image(s) of {store.CROPS_FILE} have "
                        f"no rows, e.g. {missing[0]}", path=store_dir, hint=hint)
    extra = sorted(set(index.pieces) - set(images))
    if extra:
        raise UserError(f"the features hold train image {extra[0]}, which {store.CROPS_FILE} does not",
                        path=crops_path, hint=hint)
    ids = index.image_ids
    n = len(ids)
    one_per_image = feature_store.Features(np.array(ids, object), np.array(["train"] * n, object),
                                           np.zeros(n, np.int32), np.zeros(n, np.int16),
                                           np.zeros((n, 0), np.float32), index.meta)
    ts = select_images(run, store_dir, one_per_image, settings.include_flagged, crop_scales, digest, labels)
    ts.features = feature_store.Features(np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int32),
                                         np.zeros(0, np.int16), np.zeros((0, index.dim), np.float32), index.meta)
    ts.row_image = np.zeros(0, np.int64)
    left_out, ts.artifacts = patch_flags.left_out_crops(run, "train", settings.keep_artifacts)
    return Streamed(run, ts, index, memory.memory_budget(settings.memory_gb), left_out)


def crops_facts(crops_path: Path) -> tuple[list[str], list[float], str]:
    """(training images, their crops' distinct scales, ``store.train_crops_digest``) of crops.parquet, read one
    65,536 rows at a time: each crop's digest is held as 16 bytes, never as a Python string."""
    store.read_table(crops_path, "crops file", columns=["split"], hint="run `histoembed crops`", stage="crops")
    pf = pq.ParquetFile(crops_path)
    names = pf.schema_arrow.names
    columns = ["image_id", "split", "crop_index", "png"] + [c for c in ("patch_digest", "scale") if c in names]
    crops: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    scales: set[float] = set()
    for batch in pf.iter_batches(batch_size=1 << 16, columns=columns):
        t = pa.Table.from_batches([batch])
        t = t.filter(pc.equal(t["split"], "train"))
        if "scale" in t.column_names:
            scales.update(float(x) for x in pc.unique(t["scale"]).to_pylist())
        else:
            scales.add(1.0)
        given = t["patch_digest"].to_pylist() if "patch_digest" in t.column_names else [None] * t.num_rows
        digests = np.array([(store.crop_digest(png) if png is not None else d).encode()
                            for png, d in zip(t["png"].to_pylist(), given)], dtype=bytes)
        ids = t["image_id"].to_numpy(zero_copy_only=False)
        crop = t["crop_index"].to_numpy()
        for image in np.unique(ids) if len(ids) else []:
            mine = ids == image
            crops.setdefault(str(image), []).append((crop[mine], digests[mine]))
    # store.config_key([digests sorted by (image, crop)]), fed to the hash image by image.
    h = hashlib.sha256(b"[[")
    first = True
    for image in sorted(crops):
        crop = np.concatenate([c for c, _ in crops[image]])
        digests = np.concatenate([d for _, d in crops[image]])[np.argsort(crop, kind="stable")]
        for d in digests:
            h.update((b'"' if first else b', "') + d + b'"')
            first = False
    h.update(b"]]")
    return list(crops), sorted(scales) or [1.0], h.hexdigest()[:16]

"""``histoembed export --format geojson``: per slide, a QuPath GeoJSON of the tissue ``crops`` found and of the
patches, each with what the run's models say about it, so a pathologist sees where the model looked.

Measurements (QuPath lists them per object and colours by any: Measure > Show measurement maps):

* on every patch (detection), ``Attention <head>``: the weight of each fold-averaged head that gives attention
  (attention-MIL) on the patch's clean view, a share of the slide's bag (a slide's patches sum to 1);
* on every patch and on the tissue, the slide's own probabilities: ``OOF probability <class>`` for a training
  slide (out-of-fold, from ``oof.parquet``), ``Predicted probability <class>`` for a test slide
  (``test_predictions.parquet``).

What a run lacks (no fitted models, no attention head, no submit yet) is left out and said in the result's notes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from histoembed.core import feature_store, store
from histoembed.core.errors import UserError
from histoembed.inputs.cropping import slide_tissue
from histoembed.inputs.exchange import geojson_out
from histoembed.models.inference import Ensemble, load_ensemble
from histoembed.tools.export import (
    ExportResult,
    SlidePatches,
    content_key,
    crop_settings,
    flat_images,
    json_key,
    run_samples,
    run_slides,
)

SPLIT_PROBABILITIES = {"train": (store.OOF_FILE, "OOF probability"),
                       "test": (store.TEST_PREDICTIONS_FILE, "Predicted probability")}


def slide_probabilities(run: Path, notes: list[str]) -> dict[str, dict[str, float]]:
    """``split/image_id`` -> {measurement name: probability}: out-of-fold for training slides, predicted for
    test slides, where the run has them."""
    out: dict[str, dict[str, float]] = {}
    for split, (name, label) in SPLIT_PROBABILITIES.items():
        path = run / name
        if not path.exists():
            notes.append(f"no {label.lower()} of the {split} slides: {name} not found (run `histoembed "
                         f"{'fit' if split == 'train' else 'submit'}`)")
            continue
        table = pq.read_table(path)
        classes = list(store.read_meta(path).get("classes") or [])
        if "prob" in table.column_names:       # oof.parquet: one list per image
            probs = np.asarray(table["prob"].to_pylist(), np.float64)
        else:                                  # test_predictions.parquet: one column per class
            probs = np.stack([table[f"prob_{c}"].to_numpy() for c in classes], axis=1)
        for sp, image_id, row in zip(table["split"].to_pylist(), table["image_id"].to_pylist(), probs):
            out[f"{sp}/{image_id}"] = {f"{label} {c}": float(p) for c, p in zip(classes, row)}
    return out


def attention_of(run: Path, notes: list[str], encoder: str | None) -> tuple[Ensemble | None, list[str], object]:
    """(the fold ensemble, its members that give attention, the clean view of its features), or what is missing
    said in ``notes`` (and no ensemble)."""
    if not (run / store.MODELS_DIR).exists():
        notes.append("no attention: no fitted models (run `histoembed fit --heads abmil,...`)")
        return None, [], None
    ensemble = load_ensemble(run)
    members = ensemble.members_that("gives_attention")
    why = ("the run fuses several encoders" if ensemble.encoders else
           f"--scale-fusion {ensemble.scale_fusion} reads per-scale means" if ensemble.scale_fusion != "crops" else
           "no fitted head gives attention (fit with --heads abmil,...)" if not members else None)
    if why:
        notes.append(f"no attention: {why}")
        return None, [], None
    features = feature_store.read_features(feature_store.find_feature_store(run, encoder or ensemble.encoder))
    for split in ("train", "test"):
        feature_store.check_complete(features, run, split)
    return ensemble, members, features.subset(features.view == 0)


def slide_features(s: SlidePatches, probabilities: dict, ensemble: Ensemble | None, members: list[str],
                   clean) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(per-patch measurements in ``s.crop_index`` order, the slide's own measurements)."""
    own = probabilities.get(s.key, {})
    per_patch = {k: np.full(len(s.crop_index), v) for k, v in own.items()}
    if ensemble is None:
        return per_patch, own
    mine = clean.subset(clean.keys() == s.key)
    if not np.array_equal(np.asarray(mine.crop_index, np.int64), s.crop_index):
        raise UserError(f"the clean features of {s.key} are not those of its patches in {store.CROPS_FILE}",
                        hint="run `histoembed embed` again")
    for member in members:
        per_patch[f"Attention {member}"] = np.asarray(ensemble.crop_attention(mine, member), np.float64)
    return per_patch, own


def export_geojson(run: Path, out: Path, encoder: str | None) -> ExportResult:
    """One ``<slide stem>.geojson`` per slide of ``run`` in ``out`` (see the module docstring)."""
    settings, meta = crop_settings(run)
    slide_list = run_slides(run)
    result = ExportResult(out, "geojson", notes=flat_images(run))
    samples, note = run_samples(meta, slide_list)
    if note:
        result.notes.append(note)
    probabilities = slide_probabilities(run, result.notes)
    ensemble, members, clean = attention_of(run, result.notes, encoder)
    out.mkdir(parents=True, exist_ok=True)
    for s in slide_list:
        per_patch, own = slide_features(s, probabilities, ensemble, members, clean)
        sample = samples.get(s.key)
        if sample is None:
            result.left_out.append(f"{s.key}: not in the data the crops were cut from")
            continue
        try:
            t = slide_tissue(sample, settings, meta.get("slide_mpp"), bool(meta.get("force_slide_mpp")))
        except UserError as e:
            result.left_out.append(f"{s.key}: {e}")
            continue
        path = out / f"{s.stem}.geojson"
        key = content_key("geojson", s.boxes, t.tissue, list(t.size0), sorted(per_patch),
                          *[per_patch[k] for k in sorted(per_patch)])
        if path.exists() and json_key(path) == key:
            result.unchanged.append(path)
            continue
        tissue = geojson_out.tissue_annotations(t.tissue, t.size0, s.stem)
        for feature in tissue:
            feature["properties"].setdefault("measurements", {}).update(own)
        patches = geojson_out.patch_detections(s.boxes, per_patch, slide=s.stem)
        geojson_out.write_geojson(path, tissue + patches, extra={"histoembed": {"key": key, "slide": s.key}})
        result.written.append(path)
    return result

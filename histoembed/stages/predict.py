"""Predict new images or slides with a finished run: the run's own crops, encoder, views and fold ensemble.

Everything that shaped the training features is read back from the run (crop settings
from ``crops.parquet``, encoder, pooling, views, augmentation, seed and stain normalisation
from the feature store), so a new image is embedded exactly as the training images were.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import feature_store, store
from histoembed.core.config import AugmentSettings, CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs import artifacts
from histoembed.inputs.cropping import crop_image, slide_patches, slide_tissue
from histoembed.inputs.provenance import run_data
from histoembed.inputs import slides
from histoembed.inputs.dataset import MAX_PIXELS, Sample, read_image_and_mask
from histoembed.models.inference import check_same_crops, kept_artifacts, load_ensemble


@dataclass
class Prediction:
    image: Path
    label: str
    probs: dict[str, float]   # class -> calibrated, fused, fold-averaged probability
    crops: int
    fallback: str | None      # why the crops fell back to grid-over-tissue, if they did


def resolve_images(run: Path, images: list[str | Path], masks: list[Path | None] | None = None,
                   data: Path | None = None, split: str = "test",
                   verify_data: bool = False) -> tuple[list[Path], list[Path | None] | None]:
    """Image files (and masks) for ``images``: paths as they are, or names of images in the run's data.

    A bare name that is not a file is looked up in ``split`` of the data the run's crops were cut from
    (or ``data``), which must be unchanged since; the mask beside it is used when no masks are
    given. Names repeat across splits in the reference layout, hence ``split``. ``verify_data`` hashes every
    data file again for that check (else a file of unchanged size and modification time is trusted).
    """
    for image in images:
        if not Path(image).is_file() and Path(image).name != str(image):  # a path, not a bare name
            raise UserError("file not found", path=Path(image))
    if all(Path(i).is_file() for i in images):
        return [Path(i) for i in images], masks
    data_path, ds = run_data(run, data, verify=verify_data)
    by_key = ds.by_key()
    paths, found_masks = [], []
    for image in images:
        if Path(image).is_file():
            paths.append(Path(image))
            found_masks.append(None)
            continue
        sample = by_key.get((split, str(image)))
        if sample is None:
            raise UserError(f"no such file, and no {split} image named {str(image)!r} in {data_path}", path=image,
                            hint="give a file path, or a name as in the data folder (--split train for a "
                                 "training image)")
        paths.append(sample.image)
        found_masks.append(sample.mask)
    return paths, (masks if masks else found_masks)


def predict_images(run: Path, images: list[Path], masks: list[Path | None] | None = None, tta: bool = True,
                   device: str = "auto", batch_size: int = 64, max_pixels: int | None = None,
                   image_ids: list[str | None] | None = None) -> list[Prediction]:
    """Class probabilities for each image (with its mask, or tissue found by colour when it has none).

    A whole slide (one OpenSlide reads as a slide) gets the run's patches: tissue on a thumbnail, the grid
    at the run's ``--mpp``, ``--size``, ``--overlap``, ``--min-tissue`` and ``--max-patches``, each patch
    read from the slide as ``embed`` reads it. ``image_ids``: the name each image's augmented views are
    keyed by (None: its file name); the run's own name of an image gives its views exactly.
    """
    from histoembed.engines.forward import embed_crops
    from histoembed.maths import stain                   # torch: loaded only when predicting
    from histoembed.models.encoders import load_encoder

    run = Path(run)
    masks = masks or [None] * len(images)
    if len(masks) != len(images):
        raise UserError(f"{len(images)} image(s) but {len(masks)} mask(s)", hint="give one --mask per image, in order")
    ensemble = load_ensemble(run)
    crop_meta = store.read_meta(run / store.CROPS_FILE)
    if "settings" not in crop_meta:
        raise UserError("the crops file has no crop settings", path=run / store.CROPS_FILE,
                        hint="run `histoembed crops` with this version, then embed and fit")
    crop_settings = CropSettings.model_validate(crop_meta["settings"])
    # New images must be cut, embedded and classified as the models' training images were: with every
    # encoder the run was fitted on (fit --encoder A,B), each as its store was embedded.
    metas = [(slug, store.read_meta(feature_store.feature_parts(feature_store.find_feature_store(run, name))[0]))
             for slug, name in _run_encoders(ensemble)]
    check_same_crops(run, ensemble)
    embedders = [(slug, meta, load_encoder(meta["encoder"], meta.get("pool", "cls"), device,
                                           meta.get("precision", "auto"))) for slug, meta in metas]

    image_ids = image_ids or [None] * len(images)
    out = []
    for image, mask, name in zip(images, masks, image_ids):
        image_id = name or Path(image).name   # seeds the views' augmentation, as a crop of that name was
        crops, fallback = [], None
        if not slides.is_slide(image):
            rgb, m = read_image_and_mask(image, mask, max_pixels or MAX_PIXELS)
            crops, fallback = crop_image(rgb, m, crop_settings)
            if not crops:
                raise UserError("no tissue crop could be cut from this image", path=image,
                                hint="pass its tissue mask with --mask")
        by_encoder = {}
        for slug, features_meta, encoder in embedders:
            views = int(features_meta.get("repeats", 1)) if tta and features_meta.get("tta", True) else 1
            augment = AugmentSettings.model_validate(features_meta["augment"]) if "augment" in features_meta else None
            normaliser = stain.from_meta(features_meta.get("stain"))   # the stain the training crops had

            def embed(pixels: np.ndarray, first: int = 0) -> np.ndarray:
                return embed_crops(encoder, pixels, views=views, augment=augment,  # noqa: B023 - called at once
                                   seed=int(features_meta.get("seed", 0)), image_ids=[image_id] * len(pixels),
                                   crop_index=range(first, first + len(pixels)), batch_size=batch_size,
                                   normaliser=normaliser)

            if crops:
                emb, n_crops = embed(np.stack([c.pixels for c in crops])), len(crops)
                scale = np.repeat(np.array([c.scale for c in crops], np.float32), views)
                crop_ids = np.arange(n_crops, dtype=np.int32)
            else:  # a whole slide: its patches, read as embed reads them, flagged ones left out as fit left them
                emb, crop_ids = _embed_slide(Path(image), mask, crop_settings, crop_meta, embed, batch_size,
                                             kept_artifacts(ensemble))
                n_crops, scale = len(crop_ids), np.ones(len(emb), np.float32)
            n = len(emb)
            by_encoder[slug] = feature_store.Features(
                np.array([image_id] * n, object), np.array(["test"] * n, object), np.repeat(crop_ids, views),
                np.tile(np.arange(views, dtype=np.int16), n_crops), emb, features_meta, scale=scale)
        pred = ensemble.predict(by_encoder if ensemble.encoders else by_encoder[None])
        if ensemble.outcome:   # survival: {"risk": r}, regression: {"prediction": y}
            value = float(pred.value[0])
            out.append(Prediction(Path(image), f"{value:.4g}", {ensemble.classes[0]: value}, n_crops, fallback))
            continue
        probs = pred.probs[0]
        out.append(Prediction(Path(image), ensemble.classes[int(pred.pred[0])],
                              dict(zip(ensemble.classes, probs.tolist())), n_crops, fallback))
    return out


SLIDE_CHUNK = 512  # patches read at a time; memory holds two chunks (one embedded, the next read), never a slide


def _embed_slide(path: Path, mask: Path | None, settings: CropSettings, crop_meta: dict, embed,
                 batch_size: int, keep: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(features, crop index of each patch embedded) of a slide's patches, cut as the run's crops were (its slide
    scale rules too: ``crop_meta``) and read as ``embed`` reads them; patches with an artifact flag not in
    ``keep`` are left out, as crops flags them and fit left them out (all kept when every patch is flagged).
    The next chunk is read (neighbours as one region, ``slides.read_patches``) in a thread while this one goes
    through the encoder."""
    sample = Sample(path.name, "test", path, mask, None, slide=True)
    tissue = slide_tissue(sample, settings, crop_meta.get("slide_mpp"), bool(crop_meta.get("force_slide_mpp")))
    boxes, geo, _ = slide_patches(sample, settings, tissue=tissue)  # names a slide without tissue or plausible mpp
    chunk = max(SLIDE_CHUNK, batch_size)
    parts, scores = [], []
    with slides.open_slide(path) as slide, ThreadPoolExecutor(1) as reader:
        def read(first: int):
            origins = [(x0, y0) for (x0, y0, _, _), _ in boxes[first:first + chunk]]
            return reader.submit(slides.read_patches, slide, origins, geo.level, geo.side0, settings.size)

        pending = read(0)
        for first in range(0, len(boxes), chunk):
            try:
                pixels = pending.result()
            except Exception as e:  # noqa: BLE001 - OpenSlideError on a corrupt tile
                raise UserError(f"slide cannot be read ({e})", path=path,
                                hint="the slide is damaged or truncated; re-copy it") from None
            if first + chunk < len(boxes):
                pending = read(first + chunk)
            if settings.score_patches:
                scores += [artifacts.score_patch(p, settings.mpp, tissue.fold_cut) for p in pixels]
            parts.append(embed(pixels, first))
    emb = np.concatenate(parts)
    use = np.ones(len(boxes), bool)
    if scores:
        flags, _ = artifacts.artifact_flags({k: np.array([r[k] for r in scores]) for k in artifacts.SCORE_COLUMNS})
        use = np.array([artifacts.usable(f, keep) for f in flags])
        if not use.any():
            use[:] = True
    return emb[np.repeat(use, len(emb) // len(boxes))], np.flatnonzero(use).astype(np.int32)


def _run_encoders(ensemble) -> list[tuple[str | None, str]]:
    """(slug, encoder name) of every encoder the run uses; slug None for a one-encoder run."""
    if not ensemble.encoders:
        return [(None, ensemble.encoder)]
    return [(e["slug"], e["encoder"]) for e in ensemble.encoders]

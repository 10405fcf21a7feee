"""`histoembed predict`: classify new images with a fitted run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, RunDataOpt, RunOpt, VerifyDataOpt, command, setting
from histoembed.core import config as cfg
from histoembed.core import settings_file
from histoembed.core import store
from histoembed.core.config import Device
from histoembed.core.console import console, noun, table
from histoembed.core.errors import UserError
from histoembed.inputs.slides import is_slide
from histoembed.stages.predict import predict_images, resolve_images


@command("predict")
def predict(
    images: Annotated[list[str], typer.Argument(
        help="Image files (PNG, JPEG, TIFF) or whole slides (SVS, NDPI, MRXS, pyramidal TIFF, ...) to classify, or "
             "names of images in the run's data (e.g. img_0003.png: the test image of that name, with its mask; "
             "--split train for a training image). A slide gets the run's patches (--mpp, --size, ...).")],
    run: RunOpt = Path("run"),
    data: RunDataOpt = None,
    split: Annotated[str, typer.Option(
        "--split", help="Which split an image name refers to (train or test): both splits may use the same "
                        "names.")] = "test",
    mask: Annotated[list[Path] | None, typer.Option(
        "--mask", help="Tissue mask of each image, in the same order (repeat the option); without masks, "
                       "tissue is found by colour.")] = None,
    tta: Annotated[bool, typer.Option(
        "--tta/--no-tta", help="Average over the same augmented views the run embedded (--no-tta: clean view only).")]
        = True,
    device: Annotated[Device, typer.Option(
        "--device", help="auto (CUDA when present), cpu or cuda: where the encoder runs.")] = "auto",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the predictions as CSV (image, label, one probability column per class).")]
        = None,
    config: ConfigOpt = None,
    max_pixels: Annotated[int | None, setting("data.max_pixels")] = None,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Classify new images or whole slides with a fitted run: same crops or patches, encoder, views and fold ensemble."""
    if split not in ("train", "test"):
        raise UserError(f"--split {split!r} is not train or test")
    for path in mask or []:
        if not path.is_file():
            raise UserError("file not found", path=path)
    limit = cfg.override(settings_file.load_settings(config).data, max_pixels=max_pixels).max_pixels
    paths, masks = resolve_images(run, images, list(mask) if mask else None, data=data, split=split,
                                  verify_data=verify_data)
    names = [None if Path(i).is_file() else str(i) for i in images]  # a name from the run's data keys its views
    preds = predict_images(run, paths, masks, tta=tta, device=device, max_pixels=limit, image_ids=names)
    classes = list(preds[0].probs)
    slides = sum(is_slide(p.image) for p in preds)
    kinds = (len(preds) - slides, slides)
    if classes in (["risk"], ["prediction"]):   # survival or regression: one value per image, as submit writes it
        table("Predictions", [noun(*kinds), classes[0], noun(*kinds, piece=True, number="s")],
              [[p.image.name, p.probs[classes[0]], p.crops] for p in preds])
    else:
        table("Predictions", [noun(*kinds), "label", *classes, noun(*kinds, piece=True, number="s")],
              [[p.image.name, p.label, *p.probs.values(), p.crops] for p in preds])
    for p in preds:
        if p.fallback:
            console.print(f"{p.image.name}: {p.fallback}; crops came from tissue found by colour", soft_wrap=True)
    if out is not None:
        with store.atomic_path(out) as tmp, tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "label", *[f"prob_{c}" for c in classes]])
            w.writerows([str(p.image), p.label, *[f"{v:.6f}" for v in p.probs.values()]] for p in preds)
        console.print(f"wrote {out}", soft_wrap=True)

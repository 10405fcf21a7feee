"""`histoembed synth`: write a synthetic H&E dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.tools import synthetic
from histoembed.cli.app import command
from histoembed.core.console import console
from histoembed.core.errors import UserError


@command("synth")
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the dataset into (reference layout).")]
        = Path("data"),
    train: Annotated[int | None, typer.Option("--train", min=1, help="Training images (labelled); default 40.")]
        = None,
    test: Annotated[int | None, typer.Option(
        "--test", min=0, help="Test images (unlabelled; named img_0000.png on, like the training images); "
                              "default 16.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice; the same seed gives the same files.")]
        = 0,
    min_size: Annotated[int, typer.Option("--min-size", min=32, help="Smallest image side in pixels.")] = 256,
    max_size: Annotated[int, typer.Option("--max-size", min=32, help="Largest image side in pixels.")] = 512,
    outliers: Annotated[bool, typer.Option(
        "--outliers/--no-outliers",
        help="Plant cartoons pasted over other images' masks, a green-ink smear and an empty mask in the training "
             "split, and test images that copy training images (all listed in planted.json).")] = True,
    mask_twins: Annotated[int | None, typer.Option(
        "--mask-twins", min=1, help="Cartoons pasted over another training image's mask file: 1, or 60 with "
                                    "--full-scale).")] = None,
    near_duplicates: Annotated[int | None, typer.Option(
        "--near-duplicates", min=0, help="Test images that are near copies of a training image: 1, or 10 "
                                         "with --full-scale).")] = None,
    full_scale: Annotated[bool, typer.Option(
        "--full-scale", help="The reference challenge's size: 691 training images with its label counts, 477 test "
                             "images, sizes spread like its PNGs (0.2-3.6 MB), 60 mask twins.")] = False,
    size_scale: Annotated[float, typer.Option(
        "--size-scale", min=0.01, max=4.0, help="With --full-scale: multiply every image side by this "
                                                "(0.1 gives small images for quick trials).")] = 1.0,
    stain_shift: Annotated[float, typer.Option(
        "--stain-shift", min=0.0, max=3.0, metavar="STRENGTH",
        help="Plant a stain shift of this strength (0: none; 1: as strong as between labs): half of each class's "
             "training images get darker, bluer haematoxylin (eosin as is), every test image paler "
             "haematoxylin and darker, more orange eosin; the tissue drawn is the same as without it. "
             "planted.json lists each image's stain group.")] = 0.0,
    class_signal: Annotated[synthetic.ClassSignal, typer.Option(
        "--class-signal", help="Where the class shows: morphology (the tumour's look, by class); tumour (one look "
                               "for all, the class as a colour tint inside the mask's blobs); context (one look for "
                               "all, the class as a tinted ring around each blob, outside every default crop: "
                               "what `crops --scales 1,2` recovers).")] = "morphology",
    slides: Annotated[int, typer.Option(
        "--slides", min=0, help="Write a cohort of this many synthetic whole slides instead (pyramidal tiled "
                                "SVS, JPEG tiles, 3 levels, MPP 0.25 in the description; about a quarter test "
                                "slides; labels benign/malignant; patients in a group column) under OUT/slides/ "
                                "with OUT/manifest.csv.")] = 0,
    slide_size: Annotated[int, typer.Option(
        "--slide-size", min=512, help="With --slides: level-0 side of each slide in pixels (at 0.25 um/px; "
                                      "20000 is 5 mm).")] = 20000,
    slide_format: Annotated[str, typer.Option(
        "--slide-format", help="With --slides: svs (Aperio-like, JPEG tiles) or tiff (generic tiled pyramidal "
                               "TIFF, zlib tiles, resolution in the TIFF tags).")] = "svs",
    partial_masks: Annotated[bool, typer.Option(
        "--partial-masks", help="Mask files mark a patch of tissue away from the tumour and miss the tumour "
                                "(with its class signal): what `crops --mask-mode union` recovers.")] = False,
    artifacts: Annotated[bool, typer.Option(
        "--artifacts", help="With --slides: draw into every slide a marker stroke of each colour (blue, green, red, "
                            "black) from the glass into the tissue, a band out of focus, a fold and an air bubble, "
                            "and write where they are beside it (SLIDE.artifacts.json, level-0 pixels).")] = False,
) -> None:
    """Write a synthetic H&E dataset (images, tumour masks, labels) for trying the pipeline."""
    if slides:
        if slide_format not in ("svs", "tiff"):
            raise UserError(f"--slide-format {slide_format!r}: expected svs or tiff")
        if slides < 4:
            raise UserError(f"--slides {slides}: a cohort needs at least 4 slides (training slides of both "
                            "classes and test slides)")
        if (out / "manifest.csv").exists() or (out / "slides").exists():
            raise UserError("folder already holds a slide cohort", path=out,
                            hint="choose another --out, or remove the folder first")
        done = synthetic.make_slide_cohort(out, slides, seed, slide_size, fmt=slide_format, n_test=test,
                                           spec_type=synthetic.ArtifactSlideSpec if artifacts else None)
        console.print(f"wrote {done['train']} training and {done['test']} test slides to {out / 'slides'}"
                      + (" with planted artifacts (where: SLIDE.artifacts.json beside each)" if artifacts else "")
                      + f"; manifest: {done['manifest']}", soft_wrap=True)
        return
    if artifacts:
        raise UserError("--artifacts draws into whole slides: pass --slides N too")
    if full_scale:
        if train is not None or test is not None:
            raise UserError("--full-scale sets 691 training and 477 test images; leave out --train and --test")
        train, test = synthetic.REFERENCE_TRAIN, synthetic.REFERENCE_TEST
        mask_twins = synthetic.REFERENCE_MASK_TWINS if mask_twins is None else mask_twins
        near_duplicates = 10 if near_duplicates is None else near_duplicates
    elif size_scale != 1.0:
        raise UserError("--size-scale applies to --full-scale; use --min-size/--max-size otherwise")
    train = 40 if train is None else train
    test = 16 if test is None else test
    mask_twins = 1 if mask_twins is None else mask_twins
    near_duplicates = 1 if near_duplicates is None else near_duplicates
    if min_size > max_size:
        raise UserError(f"--min-size {min_size} is larger than --max-size {max_size}")
    if outliers and near_duplicates > test:
        raise UserError(f"--near-duplicates {near_duplicates} is more than the {test} test image(s)")
    need = synthetic.min_train(mask_twins, near_duplicates)
    if outliers and train < need:
        raise UserError(f"planting outliers needs at least {need} training images (got --train {train})",
                        hint=f"pass --train {need} or more, fewer --mask-twins/--near-duplicates, or --no-outliers")
    if (out / "train_data").exists() or (out / "test_data").exists():
        raise UserError("folder already holds a dataset", path=out,
                        hint="choose another --out, or remove the folder first")
    summary = synthetic.make_dataset(out, train, test, seed, size_range=(min_size, max_size), outliers=outliers,
                                     mask_twins=mask_twins, near_duplicates=near_duplicates,
                                     reference_size_scale=size_scale if full_scale else None,
                                     stain_shift=stain_shift, class_signal=class_signal,
                                     partial_masks=partial_masks)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    console.print(f"wrote {len(summary['train'])} training and {len(summary['test'])} test images to {out}")
    console.print(f"labels: {counts}")
    if summary["class_signal"] != "morphology" or summary["partial_masks"]:
        console.print(f"class signal: {summary['class_signal']}"
                      + ("; masks miss the tumour (--partial-masks)" if summary["partial_masks"] else ""),
                      soft_wrap=True)
    if summary["planted"]:
        planted = ", ".join(f"{k} ({v})" for k, v in list(summary["planted"].items())[:12])
        more = " ..." if len(summary["planted"]) > 12 else ""
        console.print(f"planted outliers (training): {planted}{more}", soft_wrap=True)
        console.print(f"planted {len(summary['mask_twins'])} mask twin(s) and {len(summary['near_duplicates'])} "
                      "test near-duplicate(s) of training images; all listed in planted.json", soft_wrap=True)
    if summary["stain_shift"]:
        groups = summary["stain_shift"]["train"].values()
        console.print(f"planted a stain shift of strength {stain_shift:g}: {sum(g == 'train-b' for g in groups)} "
                      "training image(s) in stain group train-b, the other tissue images train-a, test images "
                      "group test; listed in planted.json", soft_wrap=True)

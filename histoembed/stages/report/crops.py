"""The crops on a few images, as boxes on the source pixels and as the squares the encoder sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.inputs.dataset import read_image
from histoembed.stages.report.html import display_name, draw_boxes, esc, fig_img, figure, missing, png_uri, section
from histoembed.stages.report.load import LoadedRun

N_CROP_IMAGES = 4


def crops_section(run: LoadedRun) -> str:
    title = "Crops on a few images"
    if run.crops is None:
        return section("crops", title, missing(f"no {store.CROPS_FILE} in the run (run `histoembed crops`)"))
    if not run.samples():
        return section("crops", title, missing("the source images (pass --data to draw the crops on them)"))
    samples = run.samples()
    slide_keys = run.slide_keys()
    ids = [i for i in run.crops["key"].drop_duplicates() if i in samples and i not in slide_keys]
    chosen = run.pick_images(ids, N_CROP_IMAGES)
    if not chosen and slide_keys:
        return section("crops", title, "<p>Every item of this run is a whole slide: its patches are drawn on its "
                                       'thumbnail in <a href="#slides">Whole slides</a>.</p>')
    if not chosen:
        return section("crops", title, missing("no image of the crops table is in the data folder"))
    fig = figure(3.2 * len(chosen), 3.4)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, key in zip(axes, chosen):
        rows = run.crops[run.crops["key"] == key].sort_values("crop_index")
        ones = rows[rows["scale"] == 1.0]   # context crops (crops --scales) share each box's centre
        rgb = read_image(samples[key].image)
        draw_boxes(ax, rgb, ones[["x0", "y0", "x1", "y1"]].to_numpy(),
                   labels=[str(k) for k in ones["crop_index"]])
        label = rows["label"].iloc[0]
        ax.set_title(f"{display_name(key)}\n{label if isinstance(label, str) else 'test'} · {len(rows)} crops",
                     fontsize=9)
    strip = _crop_strip(run.folder, chosen[0])
    context = (" Context crops (scale above 1) are not drawn: each is the square of a drawn crop grown about "
               "its centre, and comes after the scale-1 crops in the strip below." if (run.crops["scale"] > 1).any()
               else "")
    body = ("<p>Boxes in source pixels (after margin and clipping), numbered by crop index." + context + "</p>"
            + fig_img(fig, "crops drawn on images") + strip)
    return section("crops", title, body)


def _crop_strip(folder: Path, key: str) -> str:
    """The square crops of one image (``split/image_id``) as the encoder sees them (the PNG bytes in the table)."""
    split, image_id = key.split("/", 1)
    crops = pq.read_table(folder / store.CROPS_FILE, columns=["image_id", "crop_index", "png"],
                          filters=(pc.field("image_id") == image_id) & (pc.field("split") == split))
    order = np.argsort(crops["crop_index"].to_numpy())
    imgs = []
    for k in order[:12]:
        png = crops["png"][int(k)].as_py()
        imgs.append(f'<img class="crop" alt="crop {int(crops["crop_index"][int(k)].as_py())}" '
                    f'src="{png_uri(png)}">')
    return f"<p>The crops of {esc(display_name(key))} as written (square, padded):</p><div>{''.join(imgs)}</div>"

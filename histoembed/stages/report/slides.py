"""Whole slides: each slide's thumbnail with the tissue found and the patch grid, and the attention over its
patches beside it (from ``models.maps``) when a head gives attention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histoembed.core import store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs.cropping import slide_tissue
from histoembed.inputs.dataset import Sample
from histoembed.models.maps import CropMaps, heads_that
from histoembed.stages.report.html import display_name, esc, fig_img, figure, missing, section, table
from histoembed.stages.report.load import LoadedRun

MAX_SLIDES = 12     # slides drawn in the whole-slides section (the first ones of the crops table)
SLIDE_PANEL_PX = 900  # longest side of a slide's thumbnail as drawn


def _crop_settings(folder: Path):
    """The crops stage's settings, from ``crops.parquet``'s footer (defaults for what it does not say)."""
    meta = store.read_meta(folder / store.CROPS_FILE)
    given = meta.get("settings") or {}
    known = {k: v for k, v in given.items() if k in CropSettings.model_fields}
    scale = (meta.get("slide_mpp"), bool(meta.get("force_slide_mpp")))
    try:
        return CropSettings(**known), scale
    except ValueError:
        return CropSettings(), scale


def _slide_attention(run: LoadedRun, keys: list[str]) -> tuple[dict, str]:
    """({slide key: ({crop index: attention, largest 1}, called class, its probability)}, a note on the maps):
    the weights of the head that gives attention over each slide's patches (clean view, averaged over folds)."""
    heads = ",".join(heads_that("gives_attention"))
    if not (run.folder / store.MODELS_DIR).exists():
        return {}, f"No attention maps: no fitted models (run `histoembed fit --heads {heads},...`)."
    try:
        ensemble = run.fold_ensemble()
    except UserError as e:
        return {}, f"No attention maps: {e.problem}."
    if ensemble.encoders:
        return {}, (f"No attention maps: per-patch attention of one encoder: this run fuses the members of "
                    f"{len(ensemble.encoders)} encoders ({ensemble.encoder}).")
    if ensemble.member_that("gives_attention") is None:
        return {}, f"No attention maps: the run was fitted without the attention-MIL head (--heads {heads},...)."
    if ensemble.scale_fusion != "crops":
        return {}, (f"No attention maps: with --scale-fusion {ensemble.scale_fusion} the heads read per-scale "
                    "means, not single patches.")
    try:
        features = run.features(ensemble.encoder)
    except UserError as e:
        return {}, f"No attention maps: {e.problem}."
    maps = CropMaps(ensemble, features, attention=True)
    out = {}
    for key in keys:
        crop_map = maps.of(key)
        if crop_map is not None:
            out[key] = ({int(c): float(w) for c, w in zip(crop_map.crop_index, crop_map.weight)},
                        ensemble.classes[crop_map.called], crop_map.prob)
    return out, ("Right: the attention-MIL head's weight on each patch (its clean view, averaged over folds), "
                 "relative to the slide's most attended patch: which tissue the head looked at to make the call. "
                 "Training slides were seen by most folds' heads, so their maps are optimistic; test slides are "
                 "not.")


CAUSE_COLOURS = {"ink": "#d000d0", "fold": "#e00000", "blur": "#ff9900", "background": "#7f7f7f"}  # first wins


def _flag_colours(flags) -> list[str | None]:
    """Each patch's colour: its first cause's (ink, fold, blur, background), None when usable or unscored."""
    out = []
    for f in flags:
        f = list(f) if f is not None else []
        out.append(next((c for cause, c in CAUSE_COLOURS.items() if cause in f), None))
    return out


def artifact_table(crops) -> str:
    """Per slide: its patches, the usable share and each cause's share (crops.parquet's flags)."""
    rows = []
    for key, g in crops[crops["flags"].notna()].groupby("key", sort=False):
        flags = [list(f) for f in g["flags"]]
        n = len(flags)
        rows.append([display_name(key), n, f"{sum(not f for f in flags) / n:.0%}"]
                    + [f"{sum(c in f for f in flags) / n:.0%}" for c in CAUSE_COLOURS])
    if not rows:
        return ""
    return ("<p>Artifact flags per slide (<code>crops</code> reads and scores every patch; <code>fit</code>, "
            "<code>submit</code> and <code>predict</code> leave flagged patches out unless "
            "<code>fit --keep-artifacts</code> keeps their kind):</p>"
            + table(["slide", "patches", "usable", *CAUSE_COLOURS], rows))


def slide_figure(key: str, label, t, boxes: np.ndarray, crop_index: np.ndarray, attention: tuple | None,
                 flags=None) -> str:
    """One slide: its thumbnail with the tissue outline and the patch grid (flagged patches filled by cause, the
    pen ink kept off the tissue outlined), and the attention heat map beside it."""
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.patches import Rectangle

    thumb, tissue = t.thumb, t.tissue
    h, w = thumb.shape[:2]
    shrink = min(1.0, SLIDE_PANEL_PX / max(h, w))
    if shrink < 1.0:   # drawn smaller than crops saw it: the outline and boxes are scaled with it
        thumb = np.asarray(Image.fromarray(thumb).resize((max(1, round(w * shrink)), max(1, round(h * shrink))),
                                                         Image.Resampling.BOX))
        tissue = np.asarray(Image.fromarray(tissue.astype(np.uint8) * 255).resize(thumb.shape[1::-1])) > 127
    f = t.scale * shrink        # drawn px per level-0 px
    xy = boxes * f
    panels = 2 if attention is not None else 1
    width = 4.6
    fig = figure(width * panels + (0.6 if panels > 1 else 0), width * thumb.shape[0] / thumb.shape[1] + 0.5)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.imshow(thumb)
    if tissue.any():
        ax.contour(tissue.astype(np.float32), levels=[0.5], colors="#00b050", linewidths=1.2)
    ink = t.marks.ink if t.marks is not None else np.zeros(t.tissue.shape, bool)
    if ink.any():
        ink = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).resize(thumb.shape[1::-1])) > 127
        ax.contour(ink.astype(np.float32), levels=[0.5], colors=CAUSE_COLOURS["ink"], linewidths=0.8,
                   linestyles="dashed")
    colours = _flag_colours(flags if flags is not None else [None] * len(xy))
    ax.add_collection(PatchCollection([Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in xy],
                                      facecolor=[to_rgba(c, 0.5) if c else (0, 0, 0, 0) for c in colours],
                                      edgecolor=[to_rgba(c or "#0077ff") for c in colours], linewidths=0.6))
    ax.set_axis_off()
    truth = f" · {label}" if isinstance(label, str) else ""
    n_flagged = sum(c is not None for c in colours)
    said = f" · {n_flagged} flagged" if n_flagged else ""
    ax.set_title(f"{display_name(key)}{truth}\n{len(boxes)} patches{said} · tissue outlined", fontsize=9)
    if attention is not None:
        weights, called, p = attention
        cmap, norm = colormaps["inferno"], Normalize(0, 1)
        heat = np.full(thumb.shape[:2], np.nan)
        for (x0, y0, x1, y1), c in zip(np.round(xy).astype(int), crop_index):
            if int(c) in weights:
                region = heat[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
                np.fmax(region, weights[int(c)], out=region)  # overlapping patches: the larger weight
        ax = axes[1]
        ax.imshow(thumb.mean(axis=2), cmap="gray", vmin=0, vmax=255)
        im = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, norm=norm, alpha=0.75, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"attention (largest = 1)\ncalled {called} (p {p:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
    return fig_img(fig, f"slide {display_name(key)}: tissue, patch grid" + (" and attention" if attention else ""))


def slides_section(run: LoadedRun) -> str:
    """The first MAX_SLIDES slides of the crops table, each drawn by ``slide_figure``."""
    title = "Whole slides: tissue, patch grid and attention"
    slide_keys = run.slide_keys()
    if not slide_keys:
        return section("slides", title, "<p class='small'>No whole slide in this run.</p>")
    order = [k for k in run.crops["key"].drop_duplicates() if k in slide_keys]
    chosen = order[:MAX_SLIDES]
    settings, (slide_mpp, force_mpp) = _crop_settings(run.folder)
    samples = run.samples()
    attention, note = _slide_attention(run, chosen)
    parts = [f"<p>Each slide's thumbnail at {settings.thumb_mpp:g} &micro;m per pixel as <code>crops</code> saw it: "
             "the tissue it found (or the slide's mask) outlined in green, its patches "
             f"({settings.size} px at {settings.mpp:g} &micro;m/px, boxes in level-0 pixels scaled to the thumbnail) "
             "in blue; patches flagged for an artifact filled by cause (ink magenta, fold red, blur orange, "
             "background grey), the pen ink kept off the tissue outlined in dashed magenta. " + esc(note) + "</p>"]
    if "flags" in run.crops:
        parts.append(artifact_table(run.crops[run.crops["key"].isin(slide_keys)]))
    if len(order) > len(chosen):
        parts.append(f"<p>The first {len(chosen)} of {len(order)} slides (in the order of "
                     f"{store.CROPS_FILE}) are drawn.</p>")
    if not samples:
        parts.append("<p class='small'>The data folder is not known: slides are read from the paths in "
                     f"{store.CROPS_FILE} and masks are not drawn (pass --data).</p>")
    for key in chosen:
        rows = run.crops[run.crops["key"] == key].sort_values("crop_index")
        split, image_id = key.split("/", 1)
        sample = samples.get(key) or Sample(image_id, split, Path(rows["source"].iloc[0]), None,
                                            rows["label"].iloc[0], slide=True)
        try:
            t = slide_tissue(sample, settings, slide_mpp, force_mpp)
        except UserError as e:
            parts.append(missing(f"{display_name(key)}: {e.problem}"))
            continue
        parts.append(slide_figure(key, rows["label"].iloc[0], t, rows[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                  rows["crop_index"].to_numpy(), attention.get(key),
                                  rows["flags"].tolist() if "flags" in rows else None))
    return section("slides", title, "\n".join(parts))


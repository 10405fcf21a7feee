"""Which tissue drove the call: a few images with their crops coloured by how much each weighed.

The maps come from ``models.maps`` (the fitted ensemble's attention, or its per-crop scores); this module
picks the images, says what is missing when a run cannot be mapped, and draws.
"""

from __future__ import annotations

import math

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import read_image
from histoembed.models.maps import CropMaps, heads_that_see_crops
from histoembed.stages.report.html import draw_boxes, fig_img, figure, missing, section
from histoembed.stages.report.load import LoadedRun

N_MAP_IMAGES = 6
TITLE = "Which tissue drove the call: crop-level predictions"


def _crop_maps(run: LoadedRun) -> CropMaps | str:
    """The fitted ensemble's maps over the run's features, or what is missing for them (in the page's words)."""
    if not (run.folder / store.MODELS_DIR).exists():
        return "fitted models (run `histoembed fit`)"
    try:
        ensemble = run.fold_ensemble()
        if ensemble.encoders:
            return (f"per-crop maps of one encoder: this run fuses the members of {len(ensemble.encoders)} "
                    f"encoders ({ensemble.encoder})")
        features = run.features(ensemble.encoder)
    except UserError as e:
        return str(e)
    if ensemble.scale_fusion != "crops":
        return (f"per-crop predictions: with --scale-fusion {ensemble.scale_fusion} the heads read per-scale image "
                "means, not single crops")
    if ensemble.member_that("gives_attention") is None and ensemble.member_that("scores_crops") is None:
        return f"a head with a per-crop view ({' or '.join(heads_that_see_crops())}) among the fitted heads"
    return CropMaps(ensemble, features)


def _chosen_images(run: LoadedRun, mapped: set[str]) -> list[str]:
    """Up to N_MAP_IMAGES images with a map and pixels: half test images, the rest training ones (one per
    class first); slides are left to the whole-slides section."""
    samples = run.samples()
    have = mapped - run.slide_keys()
    test_ids = [i for i in run.crops.loc[run.crops["split"] == "test", "key"].drop_duplicates()
                if i in have and i in samples]
    train_ids = run.pick_images([i for i in run.crops.loc[run.crops["split"] == "train", "key"].drop_duplicates()
                                 if i in have and i in samples], N_MAP_IMAGES)
    half = N_MAP_IMAGES // 2
    return test_ids[:half] + train_ids[: N_MAP_IMAGES - min(half, len(test_ids))]


def _maps_figure(run: LoadedRun, maps: CropMaps, chosen: list[str]) -> str:
    """The chosen images with their crops filled by the map's weight, titled with the image's call."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    samples = run.samples()
    cmap, norm = colormaps["viridis"], Normalize(0, 1)
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = figure(4.0 * ncols + 0.8, 3.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, key in zip(axes, chosen):
        crop_map = maps.of(key)
        boxes = run.crops[run.crops["key"] == key].set_index("crop_index")
        keep = [i for i, c in enumerate(crop_map.crop_index) if int(c) in boxes.index]
        xyxy = boxes.loc[[int(crop_map.crop_index[i]) for i in keep], ["x0", "y0", "x1", "y1"]].to_numpy()
        colors = [cmap(norm(crop_map.weight[i])) for i in keep]
        draw_boxes(ax, read_image(samples[key].image), xyxy, colors=colors,
                   labels=[f"{crop_map.weight[i]:.2f}" for i in keep])
        truth = samples[key].label
        ax.set_title(f"{key.split('/', 1)[1]} ({'test' if truth is None else 'true: ' + truth})\n"
                     + (f"{maps.ensemble.classes[0]} {crop_map.prob:.2f}" if maps.ensemble.outcome else
                        f"called {maps.ensemble.classes[crop_map.called]} (p {crop_map.prob:.2f})"), fontsize=9)
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.7,
                 label="crop's attention (largest = 1)" if maps.attention else
                 "crop's own risk / prediction (image's range)" if maps.ensemble.outcome else
                 "crop's probability of the called class")
    return fig_img(fig, "per-image crop prediction maps")


def maps_section(run: LoadedRun) -> str:
    if run.crops is None or not run.samples():
        return section("maps", TITLE, missing(f"{store.CROPS_FILE} and the source images (pass --data)"))
    maps = _crop_maps(run)
    if isinstance(maps, str):
        return section("maps", TITLE, missing(maps))
    chosen = _chosen_images(run, maps.images())
    if not chosen and run.slide_keys():
        return section("maps", TITLE, "<p>Every item of this run is a whole slide: its patches' attention is "
                                      'drawn over its thumbnail in <a href="#slides">Whole slides</a>.</p>')
    if not chosen:
        return section("maps", TITLE, missing("images with both crops and clean-view features"))
    what = ("Each crop's clean view weighted by the attention-MIL head (averaged over folds): boxes coloured by "
            "the crop's attention relative to the image's most attended crop, i.e. which tissue the head looked "
            "at to make the call." if maps.attention else
            "Each crop's clean view through every fold's temperature-scaled MLP head (XGBoost and the linear "
            "probe see only image means, so they have no per-crop view); boxes coloured by that crop's "
            "probability of the class the whole image was called.")
    body = (f"<p>{what} Training images were seen by most folds' heads, so their maps are optimistic; test "
            "images are not.</p>" + _maps_figure(run, maps, chosen))
    return section("maps", TITLE, body)

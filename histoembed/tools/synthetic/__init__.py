"""Synthetic data for the demo, the tests and the benchmarks, by what it makes.

- ``render``: H&E-like tissue drawn from stain concentrations (morphology by class, stain groups, ink,
  cartoons);
- ``signals``: planted crop problems (the class in the tumour or in a ring around it, masks that miss it);
- ``images``: the image dataset in the reference challenge's layout (:func:`make_dataset`,
  :func:`reference_scale`);
- ``slides``: a cohort of pyramidal whole slides and its manifest (:func:`make_slide_cohort`);
- ``artifacts``: slides with planted marker strokes, a blurred band, a fold and a bubble, and where they are
  (:class:`ArtifactSlideSpec`, ``synth --slides N --artifacts``).

Everything depends on the seed alone. Feature stores with a known signal, which only the tests and the
benchmarks use, are written by ``tests/synthetic_inputs.py``.
"""

from histoembed.tools.synthetic.images import (
    PLANTED_FILE,
    REFERENCE_COUNTS,
    REFERENCE_MASK_TWINS,
    REFERENCE_PIXELS,
    REFERENCE_SPREAD,
    REFERENCE_TEST,
    REFERENCE_TRAIN,
    class_counts,
    make_dataset,
    min_train,
    reference_scale,
    reference_sizes,
)
from histoembed.tools.synthetic.render import (
    E_OD,
    H_OD,
    LABELS,
    MORPHOLOGY,
    SPREAD,
    STAIN_GROUPS,
    Morphology,
    add_ink,
    cartoon_image,
    near_copy,
    render,
    shifted_stains,
    stain_groups,
    tissue_image,
    tumour_mask,
)
from histoembed.tools.synthetic.signals import (
    CLASS_SIGNALS,
    CLASS_TINT,
    DEFAULT_MARGIN,
    NEUTRAL_LABEL,
    RING,
    TINT_STRENGTH,
    ClassSignal,
    context_ring,
    partial_mask,
    signal_image,
    tint,
)
from histoembed.tools.synthetic.artifacts import ArtifactSlideSpec, Planted
from histoembed.tools.synthetic.slides import (
    DOWNSAMPLES,
    SLIDE_LABELS,
    SLIDE_MPP,
    SlideSpec,
    make_slide_cohort,
    write_slide,
    write_slides,
)

__all__ = [
    "ArtifactSlideSpec", "Planted", "CLASS_SIGNALS", "CLASS_TINT", "DEFAULT_MARGIN", "DOWNSAMPLES", "E_OD", "H_OD", "LABELS", "MORPHOLOGY",
    "NEUTRAL_LABEL", "PLANTED_FILE", "REFERENCE_COUNTS", "REFERENCE_MASK_TWINS", "REFERENCE_PIXELS",
    "REFERENCE_SPREAD", "REFERENCE_TEST", "REFERENCE_TRAIN", "RING", "SLIDE_LABELS", "SLIDE_MPP", "SPREAD",
    "STAIN_GROUPS", "TINT_STRENGTH", "ClassSignal", "Morphology", "SlideSpec", "add_ink", "cartoon_image",
    "class_counts", "context_ring", "make_dataset", "make_slide_cohort", "min_train", "near_copy",
    "partial_mask", "reference_scale", "reference_sizes", "render", "shifted_stains", "signal_image",
    "stain_groups", "tint", "tissue_image", "tumour_mask", "write_slide",
    "write_slides",
]

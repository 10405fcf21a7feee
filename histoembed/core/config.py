"""Typed settings for every stage, with their defaults in one place.

Settings come from, in rising priority: these defaults, a ``histoembed.toml`` (one table
per stage: ``[data]``, ``[crops]``, ``[augment]``, ``[embed]``, ``[qc]``, ``[fit]``, ``[fit.mlp]``,
``[fit.xgb]``, ``[fit.logreg]``, ``[fit.abmil]``, ``[fit.ridge]``, ``[fit.coxnet]``), and command-line options. Each stage stores the settings that produced
its output, so a re-run with the same settings can skip its work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from histoembed.core.errors import UserError

# ImageNet mean, the colour Phikon-v2 and most encoders treat as "nothing here".
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104)

FloatRange = tuple[float, float]
Strategy = Literal["blobs", "grid", "roi-window", "center"]
Pool = Literal["auto", "cls", "mean", "cls+mean"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "fp8"]
StoreDtype = Literal["float32", "float16"]
Offsets = Literal["auto", "on", "off"]
MaskMode = Literal["given", "tissue", "union"]
ScaleFusion = Literal["crops", "concat"]
EncoderFusion = Literal["logits", "concat"]
Artifact = Literal["background", "ink", "fold", "blur"]   # a slide patch's artifact flags (inputs/artifacts.py)
ARTIFACTS: tuple[str, ...] = ("background", "ink", "fold", "blur")
TaskName, RegressionLoss = Literal["auto", "classification", "survival", "regression"], Literal["squared", "huber"]
SelectBy = Literal["macro_f1", "auroc", "average_precision", "balanced_accuracy", "kappa", "nll"]
StreamBags = Literal["auto", "always", "never"]
MAX_SCALE = 8.0
Engine = Literal["local", "ray"]
StainNorm = Literal["none", "macenko", "reinhard"]


# Marks a setting that changes how a stage runs but never what it writes (workers, batch size,
# device, rows per part, threads): stage keys leave these out, so changing one re-runs nothing.
NO_OUTPUT_CHANGE = {"changes_output": False}


RAY_ADDRESS_HELP = ("With --engine ray: the cluster to join (auto: the one `ray start` runs on this machine; "
                    "HOST:PORT of its head; ray://HOST:PORT for Ray Client). Not set: a Ray instance starts on this "
                    "machine for the run (or the RAY_ADDRESS environment variable's cluster is joined).")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def output_settings(settings: BaseModel) -> dict:
    """The settings that decide a stage's output, as a dict (nested tables included)."""
    out = {}
    for name, info in type(settings).model_fields.items():
        if (info.json_schema_extra or {}).get("changes_output") is False:
            continue
        value = getattr(settings, name)
        out[name] = output_settings(value) if isinstance(value, BaseModel) else value
    return out


def runtime_only(settings: type[BaseModel]) -> set[str]:
    """Names of the settings marked as never changing the output."""
    return {name for name, info in settings.model_fields.items()
            if (info.json_schema_extra or {}).get("changes_output") is False}


class DataSettings(_Settings):
    """How images and whole slides are read, by every stage that reads them (qc, crops, predict)."""

    max_pixels: int = Field(64_000_000, ge=1, description="Images whose header says more pixels than this "
                            "(width x height) are skipped before decoding, as likely decompression bombs; "
                            "raise it for real large images (about 20 bytes of memory per pixel).")
    slide_mpp: float | None = Field(None, gt=0, description="Whole slides: microns per level-0 pixel for slides "
                                    "whose file does not state a plausible one (openslide.mpp-x/y missing, or "
                                    "outside 0.05-20 um/px such as a TIFF's default 72 dpi); a slide that states "
                                    "one keeps its own. Unset: such a slide stops the stage, named.")
    force_slide_mpp: bool = Field(False, description="Whole slides: use --slide-mpp for every slide, even those "
                                  "that state their own microns per pixel (a scanner known to write a wrong one).")


class CropSettings(_Settings):
    strategy: Strategy = Field(
        "blobs", description="blobs: the largest mask components (reference recipe); grid: tiles over the whole "
        "image; roi-window: tiles over each component's box; center: one crop per component.")
    k: int = Field(10, ge=1, description="Largest mask components kept per image (blobs, center).")
    min_area: int = Field(100, ge=1, description="Smallest mask component kept, in source pixels.")
    margin: float = Field(0.1, ge=0, le=2, description="Each box edge moves out by this fraction of the box's width/height.")
    size: int = Field(224, ge=16, description="Side of the square crops written, in pixels.")
    fill: tuple[int, int, int] = Field(MEAN_FILL, description="Padding colour R,G,B (the default is the ImageNet mean).")
    fill_outside_mask: bool = Field(False, description="Also paint pixels outside the mask with the fill colour.")
    tile: int = Field(0, ge=0, description="Tile side in source pixels for grid, roi-window, center and fallbacks (0: the crop size).")
    min_tissue: float = Field(0.5, ge=0, le=1, description="Grid tiles (and whole-slide patches) are kept when at least this fraction is tissue.")
    max_crops: int = Field(64, ge=1, description="At most this many crops per image (grid, roi-window, fallback).")
    mask_mode: MaskMode = Field(
        "given", description="Where blobs are found: given (the mask file), tissue (tissue found by colour, the mask "
        "ignored), union (the mask's components, then those of the tissue it leaves out, k in all: a mask that "
        "misses tissue still gets crops from all of it); min_area applies alike.")
    scales: tuple[float, ...] = Field(
        (1.0,), min_length=1, description="Crop scales (comma-separated): 1 is the crop as cut; 2 also cuts each "
        "crop's square grown to twice its side about its centre (the context around the blob; beyond the image: "
        "the fill colour), resized to the same size. Stored in the scale column; see fit's scale_fusion.")
    mpp: float = Field(0.5, gt=0, description="Whole slides: microns per pixel of the patches (0.5: 20x, 0.25: "
                       "40x); each patch is read from the best pyramid level and resized to size x size.")
    overlap: float = Field(0.0, ge=0, lt=1, description="Whole slides: overlap of neighbouring patches, as a "
                           "fraction of the patch side (the grid's step is side x (1 - overlap)).")
    max_patches: int = Field(0, ge=0, description="At most this many patches per whole slide, an evenly spaced "
                             "subsample of the tissue patches in reading order (0: all); it caps an image's crops "
                             "too (with max_crops; a big one-level TIFF is an image), each --scales adding its "
                             "context crop of the same places.")
    allow_upsample: bool = Field(False, description="Whole slides: allow an --mpp finer than a slide's own (each "
                                 "patch enlarged from fewer pixels); refused by default, naming the slide.")
    mask_classes: tuple[str, ...] = Field(
        (), description="Whole slides with a QuPath GeoJSON mask: keep only the annotations of these classes "
        "(comma-separated, e.g. Tumor,Stroma; case ignored; a derived class such as 'Tumor: Positive' counts as "
        "Tumor); empty: every annotation. A mask image ignores it.")
    thumb_mpp: float = Field(8.0, gt=0, description="Whole slides: microns per pixel of the thumbnail tissue is "
                             "found on (saturation Otsu, closing, holes filled).")
    min_tissue_area: float = Field(10_000.0, ge=0, description="Whole slides: tissue pieces smaller than this "
                                   "many square microns are dropped (dust, pen dots).")
    score_patches: bool = Field(True, description="Whole slides: read every patch and flag its artifacts (blur, ink, "
                                "fold, background; crops.parquet's flags). Off: none is read or flagged.")
    min_usable: float = Field(0.0, ge=0, le=1, description="Whole slides: name each slide whose share of unflagged "
                              "patches is under this: a warning, or the slide left out with --strict (0: never).")
    workers: int = Field(0, ge=0, description="Worker processes (0: all cores; 1: in this process).",
                         json_schema_extra=NO_OUTPUT_CHANGE)
    engine: Engine = Field("local", description="local: worker processes on this machine; ray: one Ray task per "
                           "image or slide over a Ray cluster (needs `pip install histoembed[ray]`; the data folder "
                           "must be on a file system every node sees). Same crops either way.",
                           json_schema_extra=NO_OUTPUT_CHANGE)
    ray_address: str | None = Field(None, description=RAY_ADDRESS_HELP, json_schema_extra=NO_OUTPUT_CHANGE)

    @field_validator("scales")
    @classmethod
    def _scales_ascending_and_distinct(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        """Sorted, so ``1,2`` and ``2,1`` are one setting (and one stage key)."""
        if any(not 1.0 <= s <= MAX_SCALE for s in scales):
            raise ValueError(f"each scale must lie in [1, {MAX_SCALE:g}]")
        if len(set(scales)) != len(scales):
            raise ValueError("scales must be distinct")
        if 1.0 not in scales:
            raise ValueError("scales must include 1 (the crops as cut; each larger scale is cut around them)")
        return tuple(sorted(float(s) for s in scales))


class AugmentSettings(_Settings):
    """The reference recipe; view 0 is always the clean crop."""

    flip_p: float = Field(0.5, ge=0, le=1, description="Probability of each of the horizontal and vertical flips.")
    rotation_deg: float = Field(15.0, ge=0, le=180, description="Rotation drawn from +-this many degrees.")
    brightness: float = Field(0.05, ge=0, le=1, description="Brightness factor drawn from 1 +- this.")
    contrast: float = Field(0.05, ge=0, le=1, description="Contrast factor drawn from 1 +- this.")
    saturation: float = Field(0.05, ge=0, le=1, description="Saturation factor drawn from 1 +- this.")
    hue: float = Field(0.04, ge=0, le=0.5, description="Hue shift drawn from +- this (fraction of a turn).")
    stain_alpha: FloatRange = Field((0.8, 1.2), description="HED stain scale, U(lo, hi) per channel.")
    stain_beta: FloatRange = Field((-0.1, 0.1), description="HED stain shift, U(lo, hi) per channel.")
    macenko_p: float = Field(0.0, ge=0, le=1, description="Probability of a Macenko stain perturbation (each "
                             "crop's own stain vectors; 0: off, the reference recipe).")
    macenko_alpha: FloatRange = Field((0.8, 1.2), description="Macenko perturbation: scale of each stain's "
                                      "concentrations, U(lo, hi) per stain.")
    macenko_beta: FloatRange = Field((-0.1, 0.1), description="Macenko perturbation: shift of each stain's "
                                     "concentrations, U(lo, hi) per stain.")
    elastic_p: float = Field(0.5, ge=0, le=1, description="Probability of an elastic deformation.")
    elastic_alpha: float = Field(25.0, ge=0, description="Elastic displacement scale in pixels.")
    elastic_sigma: float = Field(7.0, gt=0, description="Gaussian smoothing of the displacement field, pixels.")
    blur_p: float = Field(0.15, ge=0, le=1, description="Probability of a Gaussian blur.")
    blur_sigma: FloatRange = Field((0.1, 1.5), description="Blur sigma in pixels, U(lo, hi).")
    noise_p: float = Field(0.5, ge=0, le=1, description="Probability of additive Gaussian noise.")
    noise_sigma: FloatRange = Field((0.01, 0.03), description="Noise sigma on the [0, 1] scale, U(lo, hi).")
    erase_p: float = Field(0.25, ge=0, le=1, description="Probability of random erasing.")
    erase_scale: FloatRange = Field((0.02, 0.12), description="Erased area as a fraction of the crop.")


class EmbedSettings(_Settings):
    encoder: str = Field("phikon-v2", description="Encoder: a registry name (`histoembed encoders` lists them: "
                         "phikon-v2, uni2-h, virchow2, ...), an hf-hub:org/name timm id, a Hugging Face "
                         "transformers id or a local model folder. `embed` takes several (repeat --encoder, or a "
                         "comma list): the same crops and views through each, one store per encoder.")
    pool: Pool = Field(
        "auto", description="Token pooling for ViT encoders: auto (the registry entry's rule, e.g. cls+mean for "
        "Virchow2 and Midnight; cls elsewhere), cls, mean of the patch tokens (registers left out), or both.")
    repeats: int = Field(4, ge=1, description="Views per crop: view 0 is the clean crop, views 1..r-1 are augmented.")
    tta: bool = Field(True, description="Embed test crops with the same augmented views (test-time augmentation); "
                      "off: view 0 only.")
    batch_size: int | None = Field(
        None, ge=1, description="Crops per forward pass. Not set: 64 on the CPU; on CUDA chosen from the GPU's free "
        "memory and the encoder's size (up to 256; the stage says what it chose).", json_schema_extra=NO_OUTPUT_CHANGE)
    device: Device = Field("auto", description="auto (CUDA when present), cpu or cuda: where augmentation and the "
                           "encoder run.", json_schema_extra=NO_OUTPUT_CHANGE)
    precision: Precision = Field(
        "auto", description="auto: the encoder's CUDA precision (bf16 autocast unless its entry says otherwise) on "
        "CUDA, fp32 on the CPU. fp8: float8 weights and activations in the linear layers, bf16 elsewhere (GPUs of "
        "compute capability 8.9 or more: H100, H200, L4, L40; it runs on a CPU too, slower, for checking); "
        "checked against fp32 like every precision below it.")
    compile: bool = Field(
        False, description="Compile the encoder's forward with torch.compile, for one fixed batch shape (the last "
        "batch is padded with copies of its last crop, whose rows are dropped); checked against eager fp32 on the "
        "first batch. Costs a compilation (tens of seconds) per run; off by default until measured faster "
        "(benchmarks/gpu.sh).", json_schema_extra=NO_OUTPUT_CHANGE)
    check_precision: bool | None = Field(
        None, description="Compare the chosen precision with fp32 on the first batch of real crops (cosine per crop, "
        "NaN/Inf) and stop when it falls below precision_threshold. Default: on when a GPU runs below fp32; works on "
        "the CPU too (with precision bf16).", json_schema_extra=NO_OUTPUT_CHANGE)
    precision_threshold: float = Field(0.999, gt=0, le=1, description="Lowest cosine to fp32 a crop may have.",
                                       json_schema_extra=NO_OUTPUT_CHANGE)
    # The precision the encoder runs at after the check (and any fallback) is part of the embed key itself.
    fallback_fp32: bool = Field(False, description="When the precision check fails, embed in fp32 instead of stopping.",
                                json_schema_extra=NO_OUTPUT_CHANGE)
    store_dtype: StoreDtype = Field("float32", description="Embedding type in the store (float16: half the disk).")
    workers: int | None = Field(
        None, ge=0, description="Processes decoding crop PNGs (0: in the main process). Not set: 2 on the CPU; on "
        "CUDA enough to feed the encoder, from its size and the CPUs this process may use.",
        json_schema_extra=NO_OUTPUT_CHANGE)
    rows_per_part: int = Field(4096, ge=1, description="Rows per Parquet part: an interrupted run loses at most one part.",
                               json_schema_extra=NO_OUTPUT_CHANGE)
    threads: int = Field(0, ge=0, description="CPU threads of the encoder on a CPU (0: the CPUs this process may "
                         "use, from its affinity and cgroup quota).", json_schema_extra=NO_OUTPUT_CHANGE)
    seed: int = Field(0, description="Seed of every augmentation draw.")
    engine: Engine = Field("local", description="local: this process and its decode workers; ray: decode in Ray "
                           "tasks and embed in a pool of Ray actors over a cluster (needs `pip install "
                           "histoembed[ray]`; the run folder must be on a file system every node sees). The store "
                           "is the same either way.", json_schema_extra=NO_OUTPUT_CHANGE)
    ray_address: str | None = Field(None, description=RAY_ADDRESS_HELP, json_schema_extra=NO_OUTPUT_CHANGE)
    ray_actors: int = Field(0, ge=0, description="With --engine ray: encoder actors (0: one per GPU of the cluster, "
                            "or one per node when it has no GPU). Each GPU actor holds one GPU.",
                            json_schema_extra=NO_OUTPUT_CHANGE)
    ray_actor_cpus: float = Field(1.0, ge=0, description="With --engine ray: CPUs each encoder actor reserves; the "
                                  "cluster's other CPUs decode crops (one task per CPU). A CPU actor's encoder "
                                  "still uses `threads` threads.", json_schema_extra=NO_OUTPUT_CHANGE)
    stain_norm: StainNorm = Field(
        "none", description="Stain normalisation of every crop before its views are made, on the encoder's device: "
        "none, macenko (stain vectors and concentrations, Macenko 2009) or reinhard (LAB mean and deviation). Crops "
        "whose stain cannot be estimated (too little tissue, a blank or a cartoon) pass through unchanged and are "
        "counted.")
    stain_target: str | None = Field(
        None, description="Reference image whose stain crops are normalised to; default: the training crops' "
        "median stain, computed once per run (run/features/stain-METHOD.json). The stain, not the path, is part of "
        "the store key.", json_schema_extra=NO_OUTPUT_CHANGE)
    stain_min_tissue: float = Field(
        0.1, ge=0, le=1, description="Crops with less than this share of stained pixels (padding aside) pass through "
        "stain normalisation unchanged.")


class QCSettings(_Settings):
    """Thresholds of the QC stage; the measurements that chose them are in the QC issue note."""

    green_hue: FloatRange = Field((35.0, 85.0), description="OpenCV hue range (0-180) of green ink.")
    brown_hue: FloatRange = Field((5.0, 20.0), description="OpenCV hue range of brown (DAB-like) pixels.")
    yellow_hue: FloatRange = Field((20.0, 35.0), description="OpenCV hue range of yellow pixels.")
    blue_hue: FloatRange = Field((85.0, 112.0), description="OpenCV hue range of blue/cyan pixels (sky, water).")
    min_saturation: int = Field(40, ge=0, le=255, description="Pixels below this saturation are not coloured.")
    dark_value: int = Field(50, ge=0, le=255, description="Pixels below this HSV value are near-black.")
    ink_saturation: int = Field(60, ge=0, le=255, description="Green pixels need at least this saturation to be ink.")
    tissue_hue: FloatRange = Field((112.0, 180.0), description="Hue range of H&E pink/purple (lo > hi wraps at 180).")
    ink_fraction: float = Field(0.01, ge=0, le=1, description="Flag ink when this fraction of pixels is ink.")
    non_tissue_fraction: float = Field(0.25, ge=0, le=1, description="Flag non_tissue when green+brown+yellow+blue pixels exceed this fraction.")
    max_dark_fraction: float = Field(0.10, ge=0, le=1, description="Flag non_tissue when this fraction of pixels is near-black.")
    max_flat_fraction: float = Field(0.6, ge=0, le=1, description="Flag non_tissue when this share of the non-background is flat colour.")
    max_ink_fraction: float = Field(0.5, ge=0, le=1, description="Flag non_tissue when green 'ink' covers this much (not a smear).")
    min_tissue_in_mask: float = Field(0.05, ge=0, le=1, description="Flag blank when less of the mask than this is tissue.")
    encoder: str = Field("efficientnet-lite0", description="Encoder of the image (or slide) thumbnails for the outlier score.")
    knn_k: int = Field(5, ge=1, description="Neighbours for the embedding outlier score.")
    outlier_z: float = Field(6.0, gt=0, description="Flag outlier above this robust z-score of the kNN embedding distance.")
    duplicate_cosine: float = Field(0.98, gt=0, le=1, description="Near-duplicates: centred cosine of mean embeddings at least this.")
    hash_distance: int = Field(24, ge=0, le=256, description="Near-duplicates: perceptual-hash (256-bit) Hamming distance at most this.")
    repair_ink: bool = Field(True, description="Inpaint ink and remove it from the mask when cropping.")
    workers: int = Field(0, ge=0, description="Worker processes for the colour pass (0: all cores, up to 8).",
                         json_schema_extra=NO_OUTPUT_CHANGE)


class MLPSettings(_Settings):
    model_config = ConfigDict(title="MLP")
    hidden: int = Field(256, ge=1, description="Hidden units per layer.")
    depth: int = Field(1, ge=0, description="Hidden layers (0: a linear head).")
    dropout: float = Field(0.3, ge=0, lt=1, description="Dropout after each hidden layer and on the input.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    epochs: int = Field(40, ge=1, description="Most epochs (early stopping on the inner split usually ends sooner).")
    warmup_epochs: int = Field(2, ge=0, description="Linear warm-up before the cosine decay.")
    batch_size: int = Field(512, ge=1, description="Crop-views per step (smaller for small sets: at least 8 steps an epoch).")
    patience: int = Field(4, ge=1, description="Epochs without inner-validation improvement before stopping.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: bool = Field(True, description="Weight the loss by inverse class frequency.")
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp Beta(alpha, alpha); 0 turns MixUp off.")


class XGBSettings(_Settings):
    model_config = ConfigDict(title="XGBoost")
    n_estimators: int = Field(300, ge=1, description="Most boosting rounds (early stopping on the inner split usually ends sooner).")
    max_depth: int = Field(4, ge=1, description="Tree depth.")
    learning_rate: float = Field(0.1, gt=0, description="Shrinkage per round.")
    subsample: float = Field(0.8, gt=0, le=1, description="Row subsample per tree.")
    colsample_bytree: float = Field(0.4, gt=0, le=1, description="Feature subsample per tree.")
    max_bin: int = Field(64, ge=2, description="Histogram bins per feature.")
    pca_dims: int = Field(128, ge=0, description="PCA (fitted inside each fold) to this many dims first (0: off).")
    early_stopping_rounds: int = Field(20, ge=1, description="Rounds without inner-validation improvement.")
    min_child_weight: float = Field(1.0, ge=0, description="Smallest summed instance weight in a leaf.")
    class_weights: bool = Field(True, description="Weight samples by inverse class frequency.")


class LogRegSettings(_Settings):
    c_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0), min_length=1, description="Inverse L2 strengths tried (on standardised inputs); the inner split's NLL picks one.")
    max_iter: int = Field(200, ge=1, description="Most L-BFGS iterations per fit.")
    class_weights: bool = Field(True, description="Weight samples by inverse class frequency.")


class ABMILSettings(_Settings):
    hidden: int = Field(128, ge=1, description="Width of each crop's hidden vector.")
    attention: int = Field(64, ge=1, description="Width of the gated attention layer.")
    dropout: float = Field(0.25, ge=0, lt=1, description="Dropout on the input and the hidden vectors.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    epochs: int = Field(30, ge=1, description="Most epochs (early stopping usually ends sooner).")
    warmup_epochs: int = Field(2, ge=0, description="Linear warm-up before the cosine decay.")
    batch_size: int = Field(64, ge=1, description="Bags (image views) per step (smaller for small sets).")
    patience: int = Field(4, ge=1, description="Epochs without inner-validation improvement before stopping.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: bool = Field(True, description="Weight the loss by inverse class frequency.")
    max_instances: int = Field(0, ge=0, description="Most patches of a bag per training step: a larger bag (a slide) "
                               "trains on a seeded sample of this many each step; prediction reads them all "
                               "(0: every patch).")


class CoxNetSettings(_Settings):
    l1_ratio: float = Field(0.5, gt=0, le=1, description="Elastic-net mix of scikit-survival's CoxNet (1: lasso).")
    n_alphas: int = Field(20, ge=1, description="Penalties along the path; the inner split's partial likelihood picks one.")


class FitSettings(_Settings):
    folds: int = Field(10, ge=2, description="Cross-validation folds (stratified by label, QC duplicate groups kept together).")
    seed: int = Field(0, description="Seed of folds, initialisation and shuffling.")
    seeds: int = Field(1, ge=1, description="Repeated cross-validation: rerun the folds with this many seeds (seed, "
                       "seed+1, ...) and report the mean and spread of every metric over the repeats; the first seed's "
                       "models, decisions and intervals are kept (what submit uses does not change).")
    include_flagged: bool = Field(False, description="Train on training images (or slides) that `histoembed qc` flagged.")
    keep_artifacts: tuple[Artifact, ...] = Field((), description="Whole slides: artifact flags whose patches are "
        "used anyway (comma-separated: blur, ink, fold, background); other flagged patches are left out of fit, submit "
        "and predict alike.")
    inner_val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of the training folds kept for early stopping.")
    weight_grid: int = Field(21, ge=2, description="Fusion weights tried on [0, 1].")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of every 95% interval in metrics.json (macro-F1, "
                           "AUROC, average precision, balanced accuracy, kappa): patients when the manifest has a "
                           "group column, else images (0: none).")
    heads: tuple[str, ...] = Field(
        ("mlp", "xgb"), min_length=1, description="Heads to cross-validate and fuse (comma-separated on the command "
        "line): mlp, xgb (the reference recipe), logreg (linear probe on image means), abmil (gated attention-MIL "
        "over crops); survival also coxnet (penalised linear Cox), regression also ridge.")
    offsets: Offsets = Field(
        "auto", description="Per-class offsets on the fused log-probabilities for the submission: on, off, or auto "
        "(on when their cross-fitted macro-F1 beats plain argmax). Both scores are always reported.")
    select_by: SelectBy = Field(
        "macro_f1", description="The metric the fusion weights and class offsets maximise on the other folds' "
        "out-of-fold predictions (cross-fitted): macro_f1 (the reference challenge's score), balanced_accuracy, kappa "
        "(quadratic weighted; needs class_order or ordinal), auroc, average_precision or nll. Offsets read decisions: "
        "with auroc, average_precision or nll they are chosen by macro-F1.")
    class_order: tuple[str, ...] | None = Field(
        None, description="The classes as ordered grades, lowest first (e.g. G1,G2,G3): metrics.json then reports the "
        "quadratic weighted kappa. Must list every training class once.")
    ordinal: bool = Field(False, description="The classes are ordered grades in label order (sorted, numbers by value: "
                          "2 before 10) unless class_order gives the order: metrics.json reports the quadratic "
                          "weighted kappa.")
    alpha: float = Field(0.1, gt=0, lt=1, description="Conformal prediction sets cover the true class with probability 1 - alpha.")
    class_conditional: bool = Field(False, description="Conformal thresholds per class (each class covered at 1 - alpha; larger sets).")
    scale_fusion: ScaleFusion = Field(
        "crops", description="How crops of several scales (crops --scales) reach the heads: crops (a context crop is "
        "one more crop of its image) or concat (per image and view, each scale's mean crop embedding, concatenated "
        "in ascending scale: one row of scales x D).")
    encoder: str | None = Field(
        None, description="The feature store(s) under run/features to fit on: one encoder name, id or folder as given "
        "to `embed` (needed when there are several stores), or several separated by commas (A,B): every head is "
        "fitted on each encoder's store, on the same folds, and all (encoder, head) members are fused.")
    encoder_fusion: EncoderFusion = Field(
        "logits", description="With several encoders: logits (fuse the members' calibrated logits with cross-fitted "
        "simplex weights) or concat (each head reads the encoders' embeddings side by side, each encoder centred "
        "and scaled to unit mean variance, as one input).")
    threads: int = Field(0, ge=0, description="CPU threads of the heads, torch and XGBoost (0: the CPUs this process "
                         "may use, from its affinity and cgroup quota).", json_schema_extra=NO_OUTPUT_CHANGE)
    task: TaskName = Field("auto", description="What the heads predict: classification (label column), survival (time and event columns) or regression (target column); auto: classification when the training images have labels, else what the data's columns give.")
    time_column: str = Field("time", description="Survival: the column (manifest or train_labels.csv) of each training item's time (positive, any unit).")
    event_column: str = Field("event", description="Survival: the column with 1 (the event was observed) or 0 (censored at that time).")
    target_column: str = Field("target", description="Regression: the column with each training item's number.")
    strict: bool = Field(False, description="Survival and regression: stop at a row with a bad time, event or target rather than skip it (skipped rows are listed).")
    regression_loss: RegressionLoss = Field("squared", description="Regression loss of the MLP, attention-MIL and XGBoost heads: squared error or Huber.")
    memory_gb: float | None = Field(
        None, gt=0, description="Memory the fit may use, in GB (not set: half of this machine's memory, or of the "
        "cgroup's limit). Above it the training bags are read from the store slide by slide, never all at once; "
        "a single slide whose bag alone does not fit is refused.", json_schema_extra=NO_OUTPUT_CHANGE)
    engine: Engine = Field(
        "local", description="local: every fold's heads in this process; ray: each (fold, head), of each encoder, a "
        "Ray task on the cluster `embed --engine ray` uses, reading its bags from the store (the run folder must be "
        "on a file system every node sees). Same out-of-fold file, metrics and models either way.",
        json_schema_extra=NO_OUTPUT_CHANGE)
    ray_address: str | None = Field(None, description=RAY_ADDRESS_HELP, json_schema_extra=NO_OUTPUT_CHANGE)
    stream: StreamBags = Field(
        "auto", description="Read the training bags from the store slide by slide: auto (when the training rows as "
        "float32 would take more than a quarter of memory_gb), always, or never (all rows in memory). The "
        "numbers are the same either way.", json_schema_extra=NO_OUTPUT_CHANGE)
    mlp: MLPSettings = MLPSettings()
    xgb: XGBSettings = XGBSettings()
    logreg: LogRegSettings = LogRegSettings()
    abmil: ABMILSettings = ABMILSettings()
    ridge: LogRegSettings = LogRegSettings()   # ridge regression: the L2 strength is 1 / C (c_grid)
    coxnet: CoxNetSettings = CoxNetSettings()


class DriftSettings(_Settings):
    folds: int = Field(5, ge=2, description="Cross-validation folds of the train-versus-test classifier.")
    repeats: int = Field(5, ge=1, description="Shuffles of the folds; each image's score is its mean out-of-fold score.")
    pca_dims: int = Field(32, ge=1, description="At most this many PCA dimensions before the train-versus-test "
                          "logistic regression (fewer with few images: about one per ten).")
    c: float = Field(1.0, gt=0, description="Inverse L2 strength of the train-versus-test logistic regression (fixed, "
                     "never tuned, so its AUC is honest).")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples of images for the AUC's 95% interval (0: none).")
    seed: int = Field(0, description="Seed of the folds and the bootstrap.")
    stain_crops: int = Field(4, ge=1, description="Crops per image whose stain densities are measured.")
    include_flagged: bool = Field(False, description="Keep images that `histoembed qc` flagged (non-tissue pastes, "
                                  "blanks) in the comparison.")


class Settings(_Settings):
    data: DataSettings = DataSettings()
    crops: CropSettings = CropSettings()
    augment: AugmentSettings = AugmentSettings()
    embed: EmbedSettings = EmbedSettings()
    qc: QCSettings = QCSettings()
    fit: FitSettings = FitSettings()
    drift: DriftSettings = DriftSettings()


def override(settings: _Settings, **values) -> _Settings:
    """A validated copy with ``values`` applied; None leaves a setting as it is, a dict overrides a sub-table."""
    try:
        return settings.model_validate(_merge(settings.model_dump(), values))
    except ValidationError as e:
        lines = [f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors()]
        raise UserError("invalid option: " + "; ".join(lines)) from None


def _merge(base: dict, values: dict) -> dict:
    merged = dict(base)
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merged[k] = _merge(base[k], v)
        elif v is not None:
            merged[k] = v
    return merged



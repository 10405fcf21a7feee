"""The run's files, the dataset and its class balance, and what quality control flagged."""

from __future__ import annotations

from collections import Counter

import numpy as np

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import read_image, read_slide_thumbnail
from histoembed.stages.report.html import esc, fig_img, figure, missing, section, table, thumb_img
from histoembed.stages.report.load import LoadedRun

MAX_QC_THUMBS = 48


def _sample_rgb(sample) -> np.ndarray:
    """An image's pixels, or a slide's thumbnail (longest side about 1024 px, read tile by tile)."""
    return read_slide_thumbnail(sample)[0] if sample.slide else read_image(sample.image)


def overview(run: LoadedRun) -> str:
    rows = []
    for name in (store.CROPS_FILE, store.QC_FILE, store.OOF_FILE, store.METRICS_FILE,
                 store.CALIBRATION_FILE, store.SUBMISSION_FILE, store.TEST_PREDICTIONS_FILE):
        p = run.folder / name
        rows.append([name, "yes" if p.exists() else "no",
                     f"{p.stat().st_size / 1024:.0f} KiB" if p.exists() else ""])
    feats = sorted(d.name for d in (run.folder / store.FEATURES_DIR).glob("*") if d.is_dir()) \
        if (run.folder / store.FEATURES_DIR).exists() else []
    rows.append([f"{store.FEATURES_DIR}/", "yes" if feats else "no", ", ".join(feats)])
    folds = sorted(p.name for p in (run.folder / store.MODELS_DIR).glob("fold-*")) \
        if (run.folder / store.MODELS_DIR).exists() else []
    rows.append([f"{store.MODELS_DIR}/", "yes" if folds else "no", f"{len(folds)} folds" if folds else ""])
    body = table(["file", "present", "detail"], rows)
    if run.notes:
        body += "<p>Problems reading the run:</p><ul>" + "".join(f"<li>{esc(n)}</li>" for n in run.notes) + "</ul>"
    return section("overview", "Run", body)


def dataset_section(run: LoadedRun) -> str:
    parts = []
    labels_by_split: dict[str, list] = {}
    if run.dataset is not None:
        for s in run.dataset.samples:
            labels_by_split.setdefault(s.split, []).append(s.label)
        source = f"the data folder {run.data}"
    elif run.crops is not None:
        per_image = run.crops.drop_duplicates("key")
        for split, label in zip(per_image["split"], per_image["label"]):
            labels_by_split.setdefault(split, []).append(label)
        source = f"{store.CROPS_FILE} (images that have crops)"
    else:
        return section("dataset", "Dataset and class balance",
                       missing(f"no data folder given and no {store.CROPS_FILE} in the run"))
    rows = [[split, len(v)] for split, v in sorted(labels_by_split.items())]
    parts.append(f"<p>Counted from {esc(source)}.</p>" + table(["split", "images"], rows))
    if run.dataset is not None and run.dataset.problems:
        parts.append(f'<p>{len(run.dataset.problems)} item(s) skipped by the dataset checks: listed under '
                     f'<a href="#skipped">Skipped</a>.</p>')

    train = Counter(l for l in labels_by_split.get("train", []) if l is not None)
    have_crops = run.crops is not None and len(run.crops)
    fig = figure(10 if have_crops else 6, 3.2)
    axes = fig.subplots(1, 2 if have_crops else 1, squeeze=False)[0]
    classes = run.classes or sorted(train)
    counts = [train.get(c, 0) for c in classes]
    axes[0].bar(range(len(classes)), counts, color="#4c72b0")
    axes[0].set_xticks(range(len(classes)), classes, rotation=20, ha="right")
    axes[0].set_ylabel("training images")
    axes[0].set_title("Class balance (train)")
    for i, n in enumerate(counts):
        axes[0].text(i, n, str(n), ha="center", va="bottom", fontsize=9)
    if have_crops:
        per_image = run.crops.groupby(["split", "image_id"]).size()
        for split, color in (("train", "#4c72b0"), ("test", "#dd8452")):
            if split in per_image.index.get_level_values(0):
                v = per_image.loc[split].to_numpy()
                axes[1].hist(v, bins=np.arange(0.5, v.max() + 1.5), alpha=0.6, color=color, label=split)
        axes[1].set_xlabel("crops per image")
        axes[1].set_ylabel("images")
        axes[1].set_title("Crops per image")
        axes[1].legend()
    parts.append(fig_img(fig, "class balance and crops per image"))
    if have_crops:
        n = run.crops.groupby("key").size()
        strat = run.crops.drop_duplicates("key")["strategy"].value_counts()
        by_scale = run.crops["scale"].value_counts().sort_index()
        scales = (" Crops per scale (1: as cut; 2: twice the context around it): "
                  + ", ".join(f"scale {s:g} {v}" for s, v in by_scale.items()) + "." if len(by_scale) > 1 else "")
        parts.append(f"<p>{len(run.crops)} crops from {len(n)} images; per image min {n.min()}, "
                     f"median {int(n.median())}, max {n.max()}. Strategy per image: "
                     + ", ".join(f"{esc(k)} {v}" for k, v in strat.items()) + f".{scales}</p>")
    return section("dataset", "Dataset and class balance", "\n".join(parts))


def _problem_of(run: LoadedRun, image_id: str, skipped: list[tuple[str, str]]) -> str:
    """Why ``crops`` skipped the test image ``image_id``, or what is known without a record of it."""
    sample = run.samples().get(f"test/{image_id}")
    for path, why in skipped:
        if (sample is not None and path == str(sample.image)) or path == image_id \
                or path.replace("\\", "/").endswith("/" + image_id):
            return why
    return "no crop of it reached the features"


def skipped_section(run: LoadedRun) -> str:
    """Every item ``crops`` skipped (data checks, unreadable files, slides without tissue), with its reason, and
    the test rows ``submit`` predicted with the training-class prior because they have no crop."""
    title = "Skipped items and class-prior predictions"
    skipped = run.skipped
    if skipped is None and run.dataset is not None:
        skipped = [(str(p.path), p.problem) for p in run.dataset.problems]
    parts = []
    if skipped is None:
        parts.append(missing(f"what `crops` skipped (no {store.CROPS_FILE} in the run, or one written without "
                             "its record: re-run `histoembed crops`)"))
    elif skipped:
        parts.append(f"<p>{len(skipped)} item(s) skipped: no crop of them was embedded, fitted or scored.</p>")
        parts.append(table(["file", "reason"], [[p, why] for p, why in skipped]))
    else:
        parts.append("<p>No item was skipped: every image and slide listed in the data has crops.</p>")
    if run.left_out:
        parts.append(f"<p>{len(run.left_out)} training image(s) left out of the crops because QC flagged them "
                     f"(see <a href=\"#qc\">QC</a>): {esc(', '.join(run.left_out))}.</p>")
    if run.fallbacks is None:
        parts.append(missing(f"which test rows got the class prior (no {store.TEST_PREDICTIONS_FILE}: "
                             "run `histoembed submit`)"))
    elif run.fallbacks:
        parts.append(f'<p class="warn">{len(run.fallbacks)} test row(s) of the submission have no crop and were '
                     "given the training-class prior (the most frequent training class), not a prediction "
                     "from their pixels:</p>")
        parts.append(table(["test image", "why it has no crop"],
                           [[i, _problem_of(run, i, skipped or [])] for i in run.fallbacks]))
    else:
        parts.append("<p>Every test row of the submission was predicted from its crops (none got the class "
                     "prior).</p>")
    return section("skipped", title, "\n".join(parts))


def qc_section(run: LoadedRun) -> str:
    title = "Quality control"
    if run.qc is None:
        return section("qc", title, missing(f"no {store.QC_FILE} in the run (run `histoembed qc`)"))
    qc = run.qc
    flags = [c for c in ("non_tissue", "ink", "blank", "outlier") if c in qc.columns]
    rows = [[f, int(qc[f].fillna(False).astype(bool).sum())] for f in flags]
    if "duplicate_group" in qc.columns:
        rows.append(["in a near-duplicate group", int(qc["duplicate_group"].notna().sum())])
    flagged = qc[qc["flagged"].fillna(False).astype(bool)]
    body = [f"<p>{len(qc)} images checked, {len(flagged)} flagged. Flagged training images are left "
            "out of training by default; test images are always predicted.</p>",
            table(["flag", "images"], rows)]
    body += _qc_pairs(qc)
    if len(flagged) == 0:
        return section("qc", title, "\n".join(body))
    samples = run.samples()
    if not samples:
        body.append(missing("thumbnails of flagged images (pass --data to show them)"))
    cards = []
    for _, row in flagged.head(MAX_QC_THUMBS).iterrows():
        s = samples.get(f'{row["split"]}/{row["image_id"]}')
        thumb = ""
        if s is not None:
            try:
                thumb = thumb_img(_sample_rgb(s), row["image_id"])
            except UserError as e:
                thumb = f'<p class="missing">{esc(e.problem)}</p>'
        cards.append(f'<figure class="card">{thumb}<figcaption><b>{esc(row["image_id"])}</b> '
                     f'({esc(row["split"])})<br>{esc(row.get("reason") or "")}</figcaption></figure>')
    if len(flagged) > MAX_QC_THUMBS:
        cards.append(f"<p>... and {len(flagged) - MAX_QC_THUMBS} more.</p>")
    body.append('<div class="cards">' + "".join(cards) + "</div>")
    return section("qc", title, "\n".join(body))


def _qc_pairs(qc) -> list[str]:
    """Tables of training mask twins and of test images that nearly duplicate a training image (leakage)."""
    out = []
    if "mask_twin" in qc.columns:
        pairs = sorted({tuple(sorted((i, j))) for i, twins in zip(qc["image_id"], qc["mask_twin"])
                        if twins is not None for j in twins})
        if pairs:
            flagged = set(qc.loc[(qc["split"] == "train") & qc["flagged"].fillna(False).astype(bool), "image_id"])
            out.append(f"<p>{len(pairs)} pair(s) of training images share a byte-identical mask file: a picture "
                       "pasted over a tissue image reuses that image's mask. The member the colour checks call "
                       "non-tissue is flagged.</p>")
            out.append(table(["image", "image", "flagged"],
                             [[a, b, ", ".join(x for x in (a, b) if x in flagged) or "neither"] for a, b in pairs]))
    if "near_train" in qc.columns:
        leaks = qc[qc["near_train"].notna()]
        if len(leaks):
            out.append(f'<p class="warn"><b>Possible leakage:</b> {len(leaks)} test image(s) nearly duplicate a '
                       "training image. They are kept and predicted; a score on them says little about new "
                       "images.</p>")
            out.append(table(["test image", "training image", "hash distance (of 256 bits)", "cosine"],
                             [[t, n, int(d), float(c) if c == c and c is not None else float("nan")]
                              for t, n, d, c in zip(leaks["image_id"], leaks["near_train"],
                                                    leaks["near_train_hash_distance"], leaks["near_train_cosine"])]))
    return out

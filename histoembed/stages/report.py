"""The run report: one self-contained HTML page with every plot inlined.

``write_report(run, data)`` reads what the stages left under ``run/`` (crops, QC flags,
out-of-fold predictions, metrics, calibration, the fitted models) and writes
``run/report.html``. Plots are drawn with matplotlib (Agg canvas, no display needed) and
embedded as base64 PNG, as are the thumbnails, so the file can be mailed or archived on
its own. A section whose inputs are missing says so instead of failing, so the report
can be written after any stage.

The report does no maths of its own: every number (macro-F1 and its interval, per-fold
scores, confusion matrix, per-class F1, ECE, NLL, fusion weights and the weight curve) is read
from ``metrics.json`` and ``calibration.json``; the reliability curves are
:func:`metrics.reliability` of :func:`decisions.calibrated_probabilities`, the probabilities ``fit`` scored.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from histoembed import __version__
from histoembed.core import feature_store, store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs.cropping import slide_tissue
from histoembed.inputs.provenance import DataChanged, run_data
from histoembed.models.drift import read_drift
from histoembed.models.heads.decisions import calibrated_probabilities
from histoembed.inputs.dataset import Sample, load_dataset, read_image, read_slide_thumbnail
from histoembed.maths.metrics import reliability
from histoembed.models.inference import check_one_set, load_ensemble

PLOT_DPI = 96
COLORS = {"mlp": "#4c72b0", "xgb": "#55a868", "logreg": "#8172b3", "abmil": "#937860", "fused": "#c44e52"}
MAX_QC_THUMBS = 48
N_CROP_IMAGES = 4
N_MAP_IMAGES = 6
THUMB_PX = 160
MAX_SLIDES = 12     # slides drawn in the whole-slides section (the first ones of the crops table)
SLIDE_PANEL_PX = 900  # longest side of a slide's thumbnail as drawn


# ---------------------------------------------------------------- reading the run

@dataclass
class _Oof:
    """Out-of-fold predictions as arrays (rows: training images)."""

    image_id: np.ndarray
    fold: np.ndarray
    y: np.ndarray                 # class index
    classes: list[str]
    z: dict[str, np.ndarray]      # head -> [N, C] raw logits, in fusion order
    prob: np.ndarray | None       # fused, calibrated
    pred: np.ndarray              # class index (plain argmax)
    pred_offsets: np.ndarray | None = None   # class index with the class offsets
    sets: list[list[str]] | None = None      # conformal sets
    view_spread: np.ndarray | None = None


@dataclass
class _Run:
    run: Path
    data: Path | None
    notes: list[str] = field(default_factory=list)
    crops = None            # pandas DataFrame without png, or None
    qc = None               # pandas DataFrame or None
    oof: _Oof | None = None
    metrics: dict | None = None
    calibration: dict | None = None
    dataset = None          # dataset.Dataset or None
    classes: list[str] = field(default_factory=list)


def _list_column(table, name) -> np.ndarray | None:
    """A fixed-size-list column of oof.parquet as [N, C] float64, or None when it is absent."""
    return store.embedding_matrix(table[name]).astype(np.float64) if name in table.column_names else None


def _read_oof(path: Path) -> _Oof:
    table = store.read_table(path, "out-of-fold predictions", hint="run `histoembed fit` first", stage="fit")
    meta = store.read_meta(path)
    labels = table["label"].to_pylist()
    classes = list(meta.get("classes") or sorted(set(labels)))
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[c] for c in labels], dtype=np.int64)
    prob = _list_column(table, "prob")

    def classes_of(name):
        return np.array([index.get(p, -1) for p in table[name].to_pylist()], dtype=np.int64) \
            if name in table.column_names else None

    heads = meta.get("heads") or [c[len("logits_"):] for c in table.column_names if c.startswith("logits_")]
    return _Oof(image_id=np.array(table["image_id"].to_pylist(), dtype=object),
                fold=table["fold"].to_numpy().astype(np.int64), y=y, classes=classes,
                z={h: _list_column(table, f"logits_{h}") for h in heads if f"logits_{h}" in table.column_names},
                prob=prob, pred=classes_of("prediction"), pred_offsets=classes_of("prediction_offsets"),
                sets=table["set"].to_pylist() if "set" in table.column_names else None,
                view_spread=table["view_spread"].to_numpy() if "view_spread" in table.column_names else None)


def _load(run: Path, data: Path | None, verify_data: bool = False) -> _Run:
    r = _Run(run=run, data=data)
    crops_path = run / store.CROPS_FILE
    if crops_path.exists():
        cols = [c for c in store.CROPS_SCHEMA.names if c != "png" and c != "scale"]
        try:
            names = pq.read_schema(crops_path).names
        except (OSError, ValueError):  # the reader below says why
            names = []
        cols += [name for name, _ in store.SLIDE_FIELDS if name in names]
        try:
            r.crops = store.read_table(crops_path, "crops table", columns=cols, stage="crops").to_pandas()
            scales = store.crop_scales(run)  # a file from before scales holds scale-1 crops only
            r.crops["scale"] = [scales[k] for k in zip(r.crops["split"], r.crops["image_id"], r.crops["crop_index"])]
            r.crops["key"] = r.crops["split"] + "/" + r.crops["image_id"]  # names repeat across splits
        except UserError as e:
            r.notes.append(str(e))
    qc_path = run / store.QC_FILE
    if qc_path.exists():
        try:
            r.qc = store.read_table(qc_path, "QC table", stage="qc").to_pandas()
        except UserError as e:
            r.notes.append(str(e))
    manifest = run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE
    if manifest.exists():  # never draw models of one fit beside metrics of another
        check_one_set(run, store.read_json(manifest, "fitted-models manifest").get("key"))
    for name, attr in ((store.METRICS_FILE, "metrics"), (store.CALIBRATION_FILE, "calibration")):
        if (run / name).exists():
            try:
                setattr(r, attr, store.read_json(run / name, name))
            except UserError as e:
                r.notes.append(str(e))
    if (run / store.OOF_FILE).exists():
        try:
            r.oof = _read_oof(run / store.OOF_FILE)
        except (UserError, KeyError) as e:
            r.notes.append(f"{run / store.OOF_FILE}: cannot be used ({e})")
    if crops_path.exists():  # the data folder the crops were cut from (or --data), if it is unchanged
        try:
            r.data, r.dataset = run_data(run, data, verify=verify_data)
        except DataChanged:
            raise  # crops, features and models describe other images: a page of them would mislead
        except UserError as e:
            r.notes.append(str(e))
    if data is not None and r.dataset is None:
        try:
            r.dataset = load_dataset(data, check_sizes=False)
        except UserError as e:
            r.notes.append(str(e))
    if r.oof is not None:
        r.classes = r.oof.classes
    elif r.dataset is not None:
        r.classes = r.dataset.classes
    elif r.crops is not None:
        r.classes = sorted(r.crops["label"].dropna().unique())
    return r


# ---------------------------------------------------------------- HTML and images

def _esc(x) -> str:
    return html.escape(str(x))


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fig_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, facecolor="white")
    return f'<img class="plot" alt="{_esc(alt)}" src="{_png_uri(buf.getvalue())}">'


def _thumb_img(rgb: np.ndarray, alt: str, px: int = THUMB_PX) -> str:
    im = Image.fromarray(rgb)
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return f'<img class="thumb" alt="{_esc(alt)}" src="{_png_uri(buf.getvalue())}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.3f}"
        return _esc(v)
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _missing(what: str) -> str:
    return f'<p class="missing">Not shown: {_esc(what)}</p>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def _samples(r: _Run) -> dict:
    """{"split/image_id": sample} of the data folder ({} without one)."""
    return {f"{s.split}/{s.image_id}": s for s in r.dataset.samples} if r.dataset is not None else {}


def _name(key: str) -> str:
    """``split/image_id`` as a reader sees it: ``img_0003.png (test)``."""
    split, image_id = key.split("/", 1)
    return f"{image_id} ({split})"


def _read_rgb(path: Path) -> np.ndarray:
    return read_image(path)


def _sample_rgb(sample) -> np.ndarray:
    """An image's pixels, or a slide's thumbnail (longest side about 1024 px, read tile by tile)."""
    return read_slide_thumbnail(sample)[0] if sample.slide else _read_rgb(sample.image)


def _slide_keys(r: _Run) -> set[str]:
    """``split/image_id`` of the whole slides in the crops table (their patches are coordinates, not pixels)."""
    if r.crops is None or "source" not in r.crops.columns:
        return set()
    return set(r.crops.loc[r.crops["source"].notna(), "key"])


# ---------------------------------------------------------------- sections

def _overview(r: _Run) -> str:
    rows = []
    for name in (store.CROPS_FILE, store.QC_FILE, store.OOF_FILE, store.METRICS_FILE,
                 store.CALIBRATION_FILE, store.SUBMISSION_FILE, store.TEST_PREDICTIONS_FILE):
        p = r.run / name
        rows.append([name, "yes" if p.exists() else "no",
                     f"{p.stat().st_size / 1024:.0f} KiB" if p.exists() else ""])
    feats = sorted(d.name for d in (r.run / store.FEATURES_DIR).glob("*") if d.is_dir()) \
        if (r.run / store.FEATURES_DIR).exists() else []
    rows.append([f"{store.FEATURES_DIR}/", "yes" if feats else "no", ", ".join(feats)])
    folds = sorted(p.name for p in (r.run / store.MODELS_DIR).glob("fold-*")) \
        if (r.run / store.MODELS_DIR).exists() else []
    rows.append([f"{store.MODELS_DIR}/", "yes" if folds else "no", f"{len(folds)} folds" if folds else ""])
    body = _table(["file", "present", "detail"], rows)
    if r.notes:
        body += "<p>Problems reading the run:</p><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in r.notes) + "</ul>"
    return _section("overview", "Run", body)


def _dataset_section(r: _Run) -> str:
    parts = []
    labels_by_split: dict[str, list] = {}
    if r.dataset is not None:
        for s in r.dataset.samples:
            labels_by_split.setdefault(s.split, []).append(s.label)
        source = f"the data folder {r.data}"
    elif r.crops is not None:
        per_image = r.crops.drop_duplicates("key")
        for split, label in zip(per_image["split"], per_image["label"]):
            labels_by_split.setdefault(split, []).append(label)
        source = f"{store.CROPS_FILE} (images that have crops)"
    else:
        return _section("dataset", "Dataset and class balance",
                        _missing(f"no data folder given and no {store.CROPS_FILE} in the run"))
    rows = [[split, len(v)] for split, v in sorted(labels_by_split.items())]
    parts.append(f"<p>Counted from {_esc(source)}.</p>" + _table(["split", "images"], rows))
    if r.dataset is not None and r.dataset.problems:
        parts.append(f"<p>{len(r.dataset.problems)} item(s) skipped by the dataset checks:</p><ul>"
                     + "".join(f"<li>{_esc(p)}</li>" for p in r.dataset.problems[:20]) + "</ul>")

    train = Counter(l for l in labels_by_split.get("train", []) if l is not None)
    have_crops = r.crops is not None and len(r.crops)
    fig = _figure(10 if have_crops else 6, 3.2)
    axes = fig.subplots(1, 2 if have_crops else 1, squeeze=False)[0]
    classes = r.classes or sorted(train)
    counts = [train.get(c, 0) for c in classes]
    axes[0].bar(range(len(classes)), counts, color="#4c72b0")
    axes[0].set_xticks(range(len(classes)), classes, rotation=20, ha="right")
    axes[0].set_ylabel("training images")
    axes[0].set_title("Class balance (train)")
    for i, n in enumerate(counts):
        axes[0].text(i, n, str(n), ha="center", va="bottom", fontsize=9)
    if have_crops:
        per_image = r.crops.groupby(["split", "image_id"]).size()
        for split, color in (("train", "#4c72b0"), ("test", "#dd8452")):
            if split in per_image.index.get_level_values(0):
                v = per_image.loc[split].to_numpy()
                axes[1].hist(v, bins=np.arange(0.5, v.max() + 1.5), alpha=0.6, color=color, label=split)
        axes[1].set_xlabel("crops per image")
        axes[1].set_ylabel("images")
        axes[1].set_title("Crops per image")
        axes[1].legend()
    parts.append(_fig_img(fig, "class balance and crops per image"))
    if have_crops:
        n = r.crops.groupby("key").size()
        strat = r.crops.drop_duplicates("key")["strategy"].value_counts()
        by_scale = r.crops["scale"].value_counts().sort_index()
        scales = (" Crops per scale (1: as cut; 2: twice the context around it): "
                  + ", ".join(f"scale {s:g} {v}" for s, v in by_scale.items()) + "." if len(by_scale) > 1 else "")
        parts.append(f"<p>{len(r.crops)} crops from {len(n)} images; per image min {n.min()}, "
                     f"median {int(n.median())}, max {n.max()}. Strategy per image: "
                     + ", ".join(f"{_esc(k)} {v}" for k, v in strat.items()) + f".{scales}</p>")
    return _section("dataset", "Dataset and class balance", "\n".join(parts))


def _qc_section(r: _Run) -> str:
    title = "Quality control"
    if r.qc is None:
        return _section("qc", title, _missing(f"no {store.QC_FILE} in the run (run `histoembed qc`)"))
    qc = r.qc
    flags = [c for c in ("non_tissue", "ink", "blank", "outlier") if c in qc.columns]
    rows = [[f, int(qc[f].fillna(False).astype(bool).sum())] for f in flags]
    if "duplicate_group" in qc.columns:
        rows.append(["in a near-duplicate group", int(qc["duplicate_group"].notna().sum())])
    flagged = qc[qc["flagged"].fillna(False).astype(bool)]
    body = [f"<p>{len(qc)} images checked, {len(flagged)} flagged. Flagged training images are left "
            "out of training by default; test images are always predicted.</p>",
            _table(["flag", "images"], rows)]
    body += _qc_pairs(qc)
    if len(flagged) == 0:
        return _section("qc", title, "\n".join(body))
    samples = _samples(r)
    if not samples:
        body.append(_missing("thumbnails of flagged images (pass --data to show them)"))
    cards = []
    for _, row in flagged.head(MAX_QC_THUMBS).iterrows():
        s = samples.get(f'{row["split"]}/{row["image_id"]}')
        thumb = ""
        if s is not None:
            try:
                thumb = _thumb_img(_sample_rgb(s), row["image_id"])
            except UserError as e:
                thumb = f'<p class="missing">{_esc(e.problem)}</p>'
        cards.append(f'<figure class="card">{thumb}<figcaption><b>{_esc(row["image_id"])}</b> '
                     f'({_esc(row["split"])})<br>{_esc(row.get("reason") or "")}</figcaption></figure>')
    if len(flagged) > MAX_QC_THUMBS:
        cards.append(f"<p>... and {len(flagged) - MAX_QC_THUMBS} more.</p>")
    body.append('<div class="cards">' + "".join(cards) + "</div>")
    return _section("qc", title, "\n".join(body))


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
            out.append(_table(["image", "image", "flagged"],
                              [[a, b, ", ".join(x for x in (a, b) if x in flagged) or "neither"] for a, b in pairs]))
    if "near_train" in qc.columns:
        leaks = qc[qc["near_train"].notna()]
        if len(leaks):
            out.append(f'<p class="warn"><b>Possible leakage:</b> {len(leaks)} test image(s) nearly duplicate a '
                       "training image. They are kept and predicted; a score on them says little about new "
                       "images.</p>")
            out.append(_table(["test image", "training image", "hash distance (of 256 bits)", "cosine"],
                              [[t, n, int(d), float(c) if c == c and c is not None else float("nan")]
                               for t, n, d, c in zip(leaks["image_id"], leaks["near_train"],
                                                     leaks["near_train_hash_distance"], leaks["near_train_cosine"])]))
    return out


def _pick_images(r: _Run, ids_with_crops: list[str], n: int) -> list[str]:
    """A few images (``split/image_id`` keys), one per class first (train), then test ones, in a stable order."""
    if r.crops is None:
        return []
    first = r.crops.drop_duplicates("key").set_index("key")
    chosen: list[str] = []
    for c in r.classes:
        hit = [i for i in ids_with_crops if first.loc[i, "label"] == c]
        if hit:
            chosen.append(hit[0])
    chosen += [i for i in ids_with_crops if i not in chosen]
    return chosen[:n]


def _draw_boxes(ax, rgb, boxes, colors=None, labels=None):
    from matplotlib.patches import Rectangle
    ax.imshow(rgb)
    ax.set_axis_off()
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        color = colors[k] if colors is not None else "#00e5ff"
        fill = colors is not None
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=fill, facecolor=color,
                               alpha=0.45 if fill else 1.0, edgecolor="none" if fill else color,
                               linewidth=1.5))
        if fill:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        if labels is not None:
            ax.text(x0 + 2, y0 + 2, labels[k], color="black", fontsize=7, va="top",
                    bbox=dict(facecolor="white", alpha=0.7, pad=1, edgecolor="none"))


def _crops_section(r: _Run) -> str:
    title = "Crops on a few images"
    if r.crops is None:
        return _section("crops", title, _missing(f"no {store.CROPS_FILE} in the run (run `histoembed crops`)"))
    if not _samples(r):
        return _section("crops", title, _missing("the source images (pass --data to draw the crops on them)"))
    samples = _samples(r)
    slide_keys = _slide_keys(r)
    ids = [i for i in r.crops["key"].drop_duplicates() if i in samples and i not in slide_keys]
    chosen = _pick_images(r, ids, N_CROP_IMAGES)
    if not chosen and slide_keys:
        return _section("crops", title, "<p>Every item of this run is a whole slide: its patches are drawn on its "
                                        'thumbnail in <a href="#slides">Whole slides</a>.</p>')
    if not chosen:
        return _section("crops", title, _missing("no image of the crops table is in the data folder"))
    fig = _figure(3.2 * len(chosen), 3.4)
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, key in zip(axes, chosen):
        rows = r.crops[r.crops["key"] == key].sort_values("crop_index")
        ones = rows[rows["scale"] == 1.0]   # context crops (crops --scales) share each box's centre
        rgb = _read_rgb(samples[key].image)
        _draw_boxes(ax, rgb, ones[["x0", "y0", "x1", "y1"]].to_numpy(),
                    labels=[str(k) for k in ones["crop_index"]])
        label = rows["label"].iloc[0]
        ax.set_title(f"{_name(key)}\n{label if isinstance(label, str) else 'test'} · {len(rows)} crops",
                     fontsize=9)
    strip = _crop_strip(r.run, chosen[0])
    context = (" Context crops (scale above 1) are not drawn: each is the square of a drawn crop grown about "
               "its centre, and comes after the scale-1 crops in the strip below." if (r.crops["scale"] > 1).any()
               else "")
    body = ("<p>Boxes in source pixels (after margin and clipping), numbered by crop index." + context + "</p>"
            + _fig_img(fig, "crops drawn on images") + strip)
    return _section("crops", title, body)


def _crop_strip(run: Path, key: str) -> str:
    """The square crops of one image (``split/image_id``) as the encoder sees them (the PNG bytes in the table)."""
    split, image_id = key.split("/", 1)
    table = pq.read_table(run / store.CROPS_FILE, columns=["image_id", "crop_index", "png"],
                          filters=(pc.field("image_id") == image_id) & (pc.field("split") == split))
    order = np.argsort(table["crop_index"].to_numpy())
    imgs = []
    for k in order[:12]:
        png = table["png"][int(k)].as_py()
        imgs.append(f'<img class="crop" alt="crop {int(table["crop_index"][int(k)].as_py())}" '
                    f'src="{_png_uri(png)}">')
    return f"<p>The crops of {_esc(_name(key))} as written (square, padded):</p><div>{''.join(imgs)}</div>"


def _scale_fusion_note(metrics: dict) -> str:
    """Which crop scales the heads saw and how (fit --scale-fusion), in words; nothing for scale-1 crops alone."""
    sf = metrics.get("scale_fusion") or {}
    crop_scales = sf.get("scales") or [1.0]
    if len(crop_scales) < 2 and sf.get("mode", "crops") == "crops":
        return ""
    return (f" Crop scales {', '.join(f'{s:g}' for s in crop_scales)} (crops --scales), scale fusion "
            f"<b>{_esc(sf.get('mode', 'crops'))}</b>: {_esc(sf.get('rule', ''))}.")


def _scores_section(r: _Run) -> str:
    title = "Cross-validated macro-F1"
    heads = (r.metrics or {}).get("heads")
    if not heads:
        return _section("scores", title, _missing(f"no {store.METRICS_FILE} in the run (run `histoembed fit`)"))
    C = len(r.metrics.get("classes") or r.classes) or 1
    rows, per_fold = [], {}
    for head, m in heads.items():
        ci = m.get("macro_f1_ci") or [math.nan, math.nan]
        per_fold[head] = m.get("fold_macro_f1") or []
        rows.append([head, m["macro_f1"], float(ci[0]), float(ci[1]), m.get("fold_mean", math.nan),
                     m.get("fold_std", math.nan), m["accuracy"]])
    n_folds = max(len(v) for v in per_fold.values())
    fig = _figure(10, 3.4)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.4, 1])
    width = 0.8 / len(per_fold)
    for j, (head, scores) in enumerate(per_fold.items()):
        ax1.bar(np.arange(len(scores)) + (j - (len(per_fold) - 1) / 2) * width, scores, width,
                label=head, color=COLORS.get(head))
    ax1.set_xticks(range(n_folds), [str(k) for k in range(n_folds)])
    ax1.set_xlabel("fold")
    ax1.set_ylabel("macro-F1 on the fold")
    ax1.set_ylim(0, 1)
    ax1.set_title("Per fold")
    ax1.legend(fontsize=8)
    for j, row in enumerate(rows):
        yerr = None if math.isnan(row[2]) else [[row[1] - row[2]], [row[3] - row[1]]]
        ax2.errorbar([j], [row[1]], yerr=yerr, fmt="o", capsize=6, color=COLORS.get(row[0]), markersize=8)
        ax2.text(j + 0.08, row[1], f"{row[1]:.3f}", va="center", fontsize=9)
    ax2.axhline(1.0 / C, color="gray", linestyle=":", label="chance-ish (1/C)")
    ax2.set_xticks(range(len(rows)), [row[0] for row in rows])
    ax2.set_xlim(-0.5, len(rows) - 0.3)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("out-of-fold macro-F1")
    ax2.set_title("Out of fold, bootstrap 95% interval")
    ax2.legend(fontsize=8, loc="lower right")
    body = ("<p>Every prediction here comes from a model (and a temperature and fusion weight) that never "
            f"saw the image: {r.metrics.get('images', '?')} training images, {n_folds} folds "
            f"(from {store.METRICS_FILE}).{_scale_fusion_note(r.metrics)}</p>"
            + _table(["head", "OOF macro-F1", "CI low", "CI high", "fold mean", "fold std", "accuracy"], rows)
            + _fig_img(fig, "per-fold and out-of-fold macro-F1") + _encoders_html(r.metrics))
    return _section("scores", title, body)


def _encoders_html(metrics: dict) -> str:
    """fit --encoder A,B: every (encoder, head) member's out-of-fold score and final weight, and the fused score."""
    members, encoders = metrics.get("members"), metrics.get("encoders")
    if not encoders or not members or not isinstance(members[0], dict):
        return ""
    mode = metrics.get("encoder_fusion") or {}
    fused = (metrics.get("heads") or {}).get("fused", {}).get("macro_f1", math.nan)
    rows = [[m["member"], m["encoder"], m["head"], float(m["oof_macro_f1"]), float(m["weight"])] for m in members]
    rows.append(["fused", ", ".join(e["encoder"] for e in encoders), "", float(fused), 1.0])
    widths = ", ".join(f"{_esc(e['encoder'])} ({e['dim']}-d)" for e in encoders)
    return (f"<h3>Encoders</h3><p>Fitted on {len(encoders)} encoders' features of the same crops and views: {widths}; "
            f"encoder fusion <b>{_esc(mode.get('mode', 'logits'))}</b>: {_esc(mode.get('rule', ''))}. Each member's "
            "out-of-fold macro-F1, its weight for the test set (chosen on all out-of-fold predictions) and the fused "
            "out-of-fold score:</p>"
            + _table(["member", "encoder", "head", "OOF macro-F1", "weight"], rows))


def _confusion_section(r: _Run) -> str:
    title = "Confusion matrix and per-class F1"
    heads = (r.metrics or {}).get("heads") or {}
    if "fused" not in heads:
        return _section("confusion", title, _missing(f"no {store.METRICS_FILE} in the run"))
    classes = list(r.metrics.get("classes") or r.classes)
    C = len(classes)
    cm = np.asarray(heads["fused"]["confusion"])
    fig = _figure(10, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    im = ax1.imshow(cm, cmap="Blues")
    for i in range(C):
        for j in range(C):
            ax1.text(j, i, str(cm[i, j]), ha="center", va="center",
                     color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax1.set_xticks(range(C), classes, rotation=25, ha="right")
    ax1.set_yticks(range(C), classes)
    ax1.set_xlabel("predicted")
    ax1.set_ylabel("true")
    ax1.set_title("Fused heads, out of fold")
    fig.colorbar(im, ax=ax1, shrink=0.8)
    width = 0.8 / len(heads)
    for j, (head, m) in enumerate(heads.items()):
        f1 = [m["per_class"][c]["f1"] for c in classes]
        ax2.bar(np.arange(C) + (j - (len(heads) - 1) / 2) * width, f1, width, label=head, color=COLORS.get(head))
    fused = heads["fused"]["per_class"]
    rows = [[c, fused[c]["precision"], fused[c]["recall"], fused[c]["f1"], fused[c]["support"]] for c in classes]
    ax2.set_xticks(range(C), classes, rotation=25, ha="right")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("F1")
    ax2.set_title("Per-class F1")
    ax2.legend(fontsize=8)
    body = _fig_img(fig, "confusion matrix and per-class F1") + _table(
        ["class (fused)", "precision", "recall", "F1", "images"], rows)
    return _section("confusion", title, body)


def _drift_section(r: _Run) -> str:
    title = "Train versus test"
    d, why = read_drift(r.run)
    if d is None:
        return _section("drift", title, _missing(why))
    if d["auc"] is None:
        return _section("drift", title, f"<p>{_esc(d['finding'])}</p>")
    lo, hi = d["auc_ci"]
    finding = f'<p class="warn"><b>Shifted test set.</b> {_esc(d["finding"])}</p>' if d["shifted"] else \
        f"<p>{_esc(d['finding'])}</p>"
    stains = [[s, *(f"{d['stain'][split][s]['median']:.3f} ({d['stain'][split][s]['q25']:.3f}-"
                    f"{d['stain'][split][s]['q75']:.3f})" for split in ("train", "test")),
               f"{d['stain_difference'][s]:+.2f}"] for s in d["stain_difference"]]
    body = (finding
            + _table(["images train", "images test", "AUC test vs train", "CI low", "CI high"],
                     [[d["images"]["train"], d["images"]["test"], d["auc"], lo, hi]])
            + f"<p class='small'>Classifier two-sample test: {_esc(d['classifier'])}; bootstrap interval over "
              f"images ({d['bootstrap']} resamples). 0.5 means the splits cannot be told apart.</p>"
            + _table(["stain density of tissue", "train: median (IQR)", "test: median (IQR)",
                      "test - train (SD)"], stains))
    return _section("drift", title, body)


def _fold_params(calibration: dict | None, folds: np.ndarray) -> list[dict] | None:
    """calibration.json's per-fold parameters when they cover every fold of ``folds``, else None."""
    entries = (calibration or {}).get("folds")
    if not isinstance(entries, list) or not entries:
        return None
    have = {int(e["fold"]) for e in entries if {"fold", "heads", "T", "weights"} <= set(e)}
    return entries if all(int(k) in have for k in np.unique(folds)) else None


def _calibration_section(r: _Run) -> str:
    title = "Calibration: reliability before and after temperature scaling"
    heads = (r.metrics or {}).get("heads")
    if r.oof is None or not r.oof.z or not heads:
        return _section("calibration", title, _missing(f"{store.OOF_FILE} with the heads' logits and "
                                                       f"{store.METRICS_FILE}"))
    o = r.oof
    params = _fold_params(r.calibration, o.fold)
    if params is None or any(h not in o.z for h in params[0]["heads"]):
        return _section("calibration", title, _missing(f"per-fold temperatures in {store.CALIBRATION_FILE}"))
    panels = calibrated_probabilities(o.z, o.fold, params)
    fig = _figure(3.6 * len(panels), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    rows = []
    for ax, (name, (before, after)) in zip(axes, panels.items()):
        m = heads.get(name, {})
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
        for probs, label, suffix, color, marker in ((before, "before (T = 1)", "_before_calibration", "#dd8452", "s"),
                                                    (after, "after (fold T)", "", "#4c72b0", "o")):
            conf, acc, count = reliability(probs, o.y)
            ok = count > 0
            ece, nll = m.get(f"ece{suffix}", math.nan), m.get(f"nll{suffix}", math.nan)
            ax.plot(conf[ok], acc[ok], marker=marker, color=color, label=f"{label}, ECE {ece:.3f}")
            rows.append([name, label, ece, nll])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(name)
        ax.legend(fontsize=8, loc="upper left")
    temps = "; ".join(f"fold {p['fold']}: " + ", ".join(f"T_{h} {p['T'][h]:.2f}" for h in p["heads"]) for p in params)
    notes = (r.metrics or {}).get("calibration_notes") or []
    note_html = ("<p>Where the data could not support a temperature, T = 1:</p><ul>"
                 + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>") if notes else \
        "<p class='small'>Every temperature was fitted (none fell back to T = 1).</p>"
    body = ("<p>The out-of-fold predictions as <code>fit</code> scored them: each fold's logits are divided by "
            "the temperature chosen on the other folds (cross-fitting), so the 'after' curves are honest. "
            "Temperatures are regularised (smoothed targets and a prior on log T), so separable held-out logits "
            f"cannot drive T to zero. ECE and NLL are those of {store.METRICS_FILE}.</p>"
            + _fig_img(fig, "reliability diagrams") + _table(["head", "", "ECE", "NLL"], rows)
            + note_html + f"<p class='small'>{_esc(temps)}</p>")
    return _section("calibration", title, body)


def _fusion_section(r: _Run) -> str:
    title = "Fusion weights"
    params = _fold_params(r.calibration, r.oof.fold) if r.oof is not None else None
    if params is None:
        return _section("fusion", title, _missing(f"per-fold fusion weights in {store.CALIBRATION_FILE}"))
    heads = params[0]["heads"]
    final = (r.calibration or {}).get("final") or {}
    rows = [[f"fold {p['fold']}"] + [float(p["weights"][h]) for h in heads] for p in params]
    if final.get("weights"):
        rows.append(["final (test set)"] + [float(final["weights"].get(h, math.nan)) for h in heads])
    table = _table(["chosen on", *heads], rows)
    rule = " + ".join(f"w_{h}·z_{h}/T_{h}" for h in heads)
    grid, curve = (r.calibration or {}).get("weight_grid"), final.get("macro_f1_by_w")
    if len(heads) != 2 or not grid or not curve:
        return _section("fusion", title, f"<p>Fused logits <code>{_esc(rule)}</code>, weights on the simplex, each "
                                         "fold's chosen on the other folds for macro-F1.</p>" + table)
    a, b = heads
    fig = _figure(7, 3.4)
    ax = fig.subplots()
    ax.plot(grid, curve, marker="o", color="#c44e52", label="all out-of-fold predictions")
    ax.axvline(final["weights"][a], color="black", linestyle="--", label=f"final w = {final['weights'][a]:.2f}")
    for w in sorted({float(p["weights"][a]) for p in params}):
        ax.axvline(w, color="gray", alpha=0.3, linewidth=3)
    ax.set_xlabel(f"w   (0: {b} only, 1: {a} only)")
    ax.set_ylabel("OOF macro-F1")
    ax.set_title("Fusion weight")
    ax.legend(fontsize=8)
    body = (f"<p>Fused logits <code>{_esc(rule)}</code> with the final temperatures: the macro-F1 of each weight "
            f"as <code>fit</code> scored it when it chose the final weight ({store.CALIBRATION_FILE}). The curve is "
            "drawn on all out-of-fold predictions, the same ones that chose the final weight, so its peak is "
            "optimistic; the per-fold weights (gray bands) were each chosen without the fold they were applied "
            "to.</p>" + _fig_img(fig, "fusion weight curve") + table)
    return _section("fusion", title, body)


def _decisions_section(r: _Run) -> str:
    title = "Decisions: class offsets, conformal sets, view spread"
    m = r.metrics or {}
    if r.oof is None or "decision" not in m:
        return _section("decisions", title, _missing(f"{store.METRICS_FILE} from this version of `histoembed fit`"))
    o, d = r.oof, m["decision"]
    fmt_ci = lambda ci: f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"  # noqa: E731
    offsets = (r.calibration or {}).get("final", {}).get("offsets")
    parts = [
        "<p>Per-class offsets on the fused log-probabilities, chosen for macro-F1 on the other folds; the plain "
        "argmax is always shown beside them.</p>",
        _table(["decision", "OOF macro-F1", "95% CI", "used for the submission"],
               [["argmax", d["argmax"]["macro_f1"], fmt_ci(d["argmax"].get("macro_f1_ci")),
                 "yes" if d["submission_uses"] == "argmax" else "no"],
                ["argmax + class offsets", d["offsets"]["macro_f1"], fmt_ci(d["offsets"].get("macro_f1_ci")),
                 "yes" if d["submission_uses"] == "offsets" else "no"]]),
    ]
    if offsets:
        parts.append("<p class='small'>Final offsets (test set): "
                     + ", ".join(f"{_esc(c)} {v:+.1f}" for c, v in zip(o.classes, offsets))
                     + f" (--offsets {_esc(d['offsets_setting'])}).</p>")
    conf = m.get("conformal")
    if conf:
        per_class = [[c, "-" if v is None else v] for c, v in conf["coverage_per_class"].items()]
        parts.append(f"<p>Conformal prediction sets at alpha = {conf['alpha']} "
                     f"({'one threshold per class' if conf.get('class_conditional') else 'one threshold'}): "
                     f"out-of-fold coverage {conf['coverage']:.3f} (target {conf['target_coverage']:.2f}), "
                     f"mean set size {conf['mean_set_size']:.2f}, empty sets {conf['empty_sets']:.1%}.</p>"
                     + _table(["true class", "coverage"], per_class))
    spread = (m.get("view_spread") or {}).get("accuracy_by_quantile")
    if spread:
        fig = _figure(6, 3.0)
        ax = fig.subplots()
        ax.bar(range(len(spread)), [b["accuracy"] for b in spread], color="#4c72b0")
        ax.set_xticks(range(len(spread)), [f"{b['low']:.2f}-{b['high']:.2f}" for b in spread])
        ax.set_xlabel("view spread (quantile bin)")
        ax.set_ylabel("OOF accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("Accuracy by view spread")
        parts.append("<p>View spread: how much an image's fused probabilities move between its augmented views "
                     "(mean total-variation distance from their mean). If accuracy falls as spread rises, a high "
                     "spread means 'check this one'.</p>" + _fig_img(fig, "accuracy by view spread")
                     + _table(["spread from", "to", "images", "accuracy"],
                              [[b["low"], b["high"], b["images"], b["accuracy"]] for b in spread]))
    return _section("decisions", title, "\n".join(parts))


def _maps_section(r: _Run) -> str:
    title = "Which tissue drove the call: crop-level predictions"
    if r.crops is None or not _samples(r):
        return _section("maps", title, _missing(f"{store.CROPS_FILE} and the source images (pass --data)"))
    if not (r.run / store.MODELS_DIR).exists():
        return _section("maps", title, _missing("fitted models (run `histoembed fit`)"))
    try:
        ensemble = load_ensemble(r.run)
        if ensemble.encoders:
            return _section("maps", title, _missing(f"per-crop maps of one encoder: this run fuses the members of "
                                                    f"{len(ensemble.encoders)} encoders ({ensemble.encoder})"))
        features = feature_store.read_features(feature_store.find_feature_store(r.run, ensemble.encoder))
    except UserError as e:
        return _section("maps", title, _missing(str(e)))
    if ensemble.scale_fusion != "crops":
        return _section("maps", title, _missing("per-crop predictions: with --scale-fusion "
                                                f"{ensemble.scale_fusion} the heads read per-scale image means, "
                                                "not single crops"))
    use_attention = "abmil" in ensemble.heads
    if not use_attention and "mlp" not in ensemble.heads:
        return _section("maps", title, _missing("a head with a per-crop view (mlp or abmil) among the fitted heads"))
    samples = _samples(r)
    clean = features.subset(features.view == 0)
    clean_keys = clean.keys()
    slide_keys = _slide_keys(r)
    have = set(clean_keys.tolist()) - slide_keys   # slides: their maps are in the whole-slides section
    test_ids = [i for i in r.crops.loc[r.crops["split"] == "test", "key"].drop_duplicates()
                if i in have and i in samples]
    train_ids = [i for i in _pick_images(r, [i for i in r.crops.loc[r.crops["split"] == "train", "key"]
                                               .drop_duplicates() if i in have and i in samples], N_MAP_IMAGES)]
    half = N_MAP_IMAGES // 2
    chosen = test_ids[:half] + train_ids[: N_MAP_IMAGES - min(half, len(test_ids))]
    if not chosen and slide_keys:
        return _section("maps", title, "<p>Every item of this run is a whole slide: its patches' attention is "
                                       'drawn over its thumbnail in <a href="#slides">Whole slides</a>.</p>')
    if not chosen:
        return _section("maps", title, _missing("images with both crops and clean-view features"))
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    cmap, norm = colormaps["viridis"], Normalize(0, 1)
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = _figure(4.0 * ncols + 0.8, 3.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, key in zip(axes, chosen):
        sub = clean.subset(clean_keys == key)
        image_pred = ensemble.predict(sub)
        image_probs, k = np.asarray(image_pred.probs)[0], int(image_pred.pred[0])
        if use_attention:   # attention is a share of the bag: scale so the largest crop of the image is 1
            weight = np.asarray(ensemble.crop_attention(sub))
            crop_probs = np.tile((weight / max(weight.max(), 1e-12))[:, None], (1, len(ensemble.classes)))
        else:
            crop_probs = np.asarray(ensemble.predict_crops(sub))
        boxes = r.crops[r.crops["key"] == key].set_index("crop_index")
        keep = [i for i, c in enumerate(sub.crop_index) if int(c) in boxes.index]
        xyxy = boxes.loc[[int(sub.crop_index[i]) for i in keep], ["x0", "y0", "x1", "y1"]].to_numpy()
        colors = [cmap(norm(crop_probs[i, k])) for i in keep]
        _draw_boxes(ax, _read_rgb(samples[key].image), xyxy, colors=colors,
                    labels=[f"{crop_probs[i, k]:.2f}" for i in keep])
        truth = samples[key].label
        ax.set_title(f"{key.split('/', 1)[1]} ({'test' if truth is None else 'true: ' + truth})\n"
                     f"called {ensemble.classes[k]} (p {image_probs[k]:.2f})", fontsize=9)
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.7,
                 label="crop's attention (largest = 1)" if use_attention else "crop's probability of the called class")
    what = ("Each crop's clean view weighted by the attention-MIL head (averaged over folds): boxes coloured by "
            "the crop's attention relative to the image's most attended crop, i.e. which tissue the head looked "
            "at to make the call." if use_attention else
            "Each crop's clean view through every fold's temperature-scaled MLP head (XGBoost and the linear "
            "probe see only image means, so they have no per-crop view); boxes coloured by that crop's "
            "probability of the class the whole image was called.")
    body = (f"<p>{what} Training images were seen by most folds' heads, so their maps are optimistic; test "
            "images are not.</p>" + _fig_img(fig, "per-image crop prediction maps"))
    return _section("maps", title, body)


# ---------------------------------------------------------------- whole slides

def _crop_settings(run: Path):
    """The crops stage's settings, from ``crops.parquet``'s footer (defaults for what it does not say)."""
    meta = store.read_meta(run / store.CROPS_FILE)
    given = meta.get("settings") or {}
    known = {k: v for k, v in given.items() if k in CropSettings.model_fields}
    try:
        return CropSettings(**known), meta.get("slide_mpp")
    except ValueError:
        return CropSettings(), meta.get("slide_mpp")


def _slide_attention(r: _Run, keys: list[str]) -> tuple[dict, str]:
    """({slide key: ({crop index: attention, largest 1}, called class, its probability)}, a note on the maps):
    the attention-MIL head's weights over each slide's patches (clean view, averaged over folds)."""
    if not (r.run / store.MODELS_DIR).exists():
        return {}, "No attention maps: no fitted models (run `histoembed fit --heads abmil,...`)."
    try:
        ensemble = load_ensemble(r.run)
    except UserError as e:
        return {}, f"No attention maps: {e.problem}."
    if "abmil" not in ensemble.heads:
        return {}, "No attention maps: the run was fitted without the attention-MIL head (--heads abmil,...)."
    if ensemble.scale_fusion != "crops":
        return {}, (f"No attention maps: with --scale-fusion {ensemble.scale_fusion} the heads read per-scale "
                    "means, not single patches.")
    try:
        features = feature_store.read_features(feature_store.find_feature_store(r.run, ensemble.encoder))
    except UserError as e:
        return {}, f"No attention maps: {e.problem}."
    clean = features.subset(features.view == 0)
    clean_keys = clean.keys()
    out = {}
    for key in keys:
        sub = clean.subset(clean_keys == key)
        if not len(sub.image_id):
            continue
        weight = np.asarray(ensemble.crop_attention(sub), dtype=np.float64)
        pred = ensemble.predict(sub)
        k = int(pred.pred[0])
        out[key] = ({int(c): float(w) for c, w in zip(sub.crop_index, weight / max(weight.max(), 1e-12))},
                    ensemble.classes[k], float(np.asarray(pred.probs)[0, k]))
    return out, ("Right: the attention-MIL head's weight on each patch (its clean view, averaged over folds), "
                 "relative to the slide's most attended patch: which tissue the head looked at to make the call. "
                 "Training slides were seen by most folds' heads, so their maps are optimistic; test slides are "
                 "not.")


def _slide_figure(key: str, label, t, boxes: np.ndarray, crop_index: np.ndarray, attention: tuple | None) -> str:
    """One slide: its thumbnail with the tissue outline and the patch grid, and the attention heat map beside it."""
    from matplotlib import colormaps
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
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
    fig = _figure(width * panels + (0.6 if panels > 1 else 0), width * thumb.shape[0] / thumb.shape[1] + 0.5)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.imshow(thumb)
    if tissue.any():
        ax.contour(tissue.astype(np.float32), levels=[0.5], colors="#00b050", linewidths=1.2)
    ax.add_collection(PatchCollection([Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in xy],
                                      facecolor="none", edgecolor="#0077ff", linewidths=0.6))
    ax.set_axis_off()
    truth = f" · {label}" if isinstance(label, str) else ""
    ax.set_title(f"{_name(key)}{truth}\n{len(boxes)} patches · tissue outlined", fontsize=9)
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
    return _fig_img(fig, f"slide {_name(key)}: tissue, patch grid" + (" and attention" if attention else ""))


def _slides_section(r: _Run) -> str:
    title = "Whole slides: tissue, patch grid and attention"
    slide_keys = _slide_keys(r)
    if not slide_keys:
        return _section("slides", title, "<p class='small'>No whole slide in this run.</p>")
    order = [k for k in r.crops["key"].drop_duplicates() if k in slide_keys]
    chosen = order[:MAX_SLIDES]
    settings, slide_mpp = _crop_settings(r.run)
    samples = _samples(r)
    attention, note = _slide_attention(r, chosen)
    parts = [f"<p>Each slide's thumbnail at {settings.thumb_mpp:g} &micro;m per pixel as <code>crops</code> saw it: "
             "the tissue it found (or the slide's mask) outlined in green, its patches "
             f"({settings.size} px at {settings.mpp:g} &micro;m/px, boxes in level-0 pixels scaled to the thumbnail) "
             "in blue. " + _esc(note) + "</p>"]
    if len(order) > len(chosen):
        parts.append(f"<p>The first {len(chosen)} of {len(order)} slides (in the order of "
                     f"{store.CROPS_FILE}) are drawn.</p>")
    if not samples:
        parts.append("<p class='small'>The data folder is not known: slides are read from the paths in "
                     f"{store.CROPS_FILE} and masks are not drawn (pass --data).</p>")
    for key in chosen:
        rows = r.crops[r.crops["key"] == key].sort_values("crop_index")
        split, image_id = key.split("/", 1)
        sample = samples.get(key) or Sample(image_id, split, Path(rows["source"].iloc[0]), None,
                                            rows["label"].iloc[0], slide=True)
        try:
            t = slide_tissue(sample, settings, slide_mpp)
        except UserError as e:
            parts.append(_missing(f"{_name(key)}: {e.problem}"))
            continue
        parts.append(_slide_figure(key, rows["label"].iloc[0], t, rows[["x0", "y0", "x1", "y1"]].to_numpy(float),
                                   rows["crop_index"].to_numpy(), attention.get(key)))
    return _section("slides", title, "\n".join(parts))


# ---------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1240px;
padding:1em 2em;color:#222}
.warn{color:#8a4b00}h1{margin-bottom:0}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
img.plot{max-width:100%;display:block;margin:.6em 0}img.crop{width:96px;height:96px;margin:2px}
.cards{display:flex;flex-wrap:wrap;gap:.6em}.card{margin:0;width:180px;font-size:.8em}
.missing{color:#8a6d3b;background:#fcf8e3;padding:.4em .8em;border-left:4px solid #f0ad4e}
.small{font-size:.8em;color:#666}nav a{margin-right:1em}
"""

_SECTIONS = (("dataset", "Dataset"), ("qc", "QC"), ("crops", "Crops"), ("scores", "Macro-F1"),
             ("drift", "Drift"), ("confusion", "Confusion"), ("calibration", "Calibration"), ("fusion", "Fusion"),
             ("decisions", "Decisions"), ("maps", "Crop maps"), ("slides", "Whole slides"))


def render_report(run: Path, data: Path | None = None, verify_data: bool = False) -> str:
    """The report page as one HTML string; stops (:class:`DataChanged`) when the data changed since the crops."""
    r = _load(Path(run), Path(data) if data is not None else None, verify_data)
    sections = [_overview(r), _dataset_section(r), _qc_section(r), _crops_section(r), _scores_section(r),
                _drift_section(r), _confusion_section(r), _calibration_section(r), _fusion_section(r), _decisions_section(r), _maps_section(r),
                _slides_section(r)]
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in _SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>histoembed report: {_esc(r.run)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>histoembed report</h1><p class='small'>run <code>{_esc(r.run)}</code>"
            f"{' · data <code>' + _esc(r.data) + '</code>' if r.data else ''} · {when} · "
            f"histoembed {__version__}</p><nav>{nav}</nav>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_report(run: Path, data: Path | None = None, verify_data: bool = False) -> Path:
    """Write ``run/report.html`` (one self-contained file) and return its path.

    ``verify_data`` hashes every data file again instead of trusting stamps cached by size and time.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError("run folder not found", path=run, hint="pass the folder the stages wrote with --run")
    page = render_report(run, data, verify_data)
    out = run / store.REPORT_FILE
    with store.atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out

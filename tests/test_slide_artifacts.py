"""Slide artifacts through the stages (issue 31): `crops` flags blur, ink, folds and background on synthetic slides
with planted truth (tools/slide_artifacts.py) and keeps pen ink off the tissue; fit, submit and predict leave the
same flagged patches out (`fit --keep-artifacts` restores them); `--min-usable` names a slide, `--strict` leaves it
out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoembed.core import store
from histoembed.inputs import patch_flags
from histoembed.tools.synthetic.artifacts import ArtifactSlideSpec, Planted, stroke_cover
from histoembed.tools.synthetic import SlideSpec, write_slide

SETTINGS = """
[qc]
workers = 1
[crops]
workers = 1
[embed]
encoder = "{encoder}"
workers = 0
[fit]
bootstrap = 0
[fit.xgb]
n_estimators = 5
pca_dims = 4
early_stopping_rounds = 2
"""
CROPS = ["crops", "--data", "manifest.csv", "--mpp", "0.5", "--size", "96"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_dinov2) -> Path:
    """Four training slides (one with every artifact planted, malignant so its nuclei are dense enough to judge
    focus by) and a test slide with artifacts; each artifact slide's truth beside it."""
    root = tmp_path_factory.mktemp("planted")
    rows = []
    for name, spec, split in (("art.svs", ArtifactSlideSpec(5, 3200, 3200, "malignant"), "train"),
                              ("b.svs", SlideSpec(7, 2400, 2400, "benign"), "train"),
                              ("c.svs", SlideSpec(8, 2400, 2400, "malignant"), "train"),
                              ("d.svs", SlideSpec(9, 2400, 2400, "benign"), "train"),
                              ("test.svs", ArtifactSlideSpec(13, 2400, 2400, "malignant"), "test")):
        path = write_slide(root / name, spec)
        if isinstance(spec, ArtifactSlideSpec):
            spec.write_truth(path)
        rows.append([name, "", spec.label if split == "train" else "", split])
    with (root / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "label", "split"], *rows])
    (root / "histoembed.toml").write_text(SETTINGS.format(encoder=tiny_dinov2))
    return root


def _inside(box, area) -> float:
    """Share of the patch ``box`` inside the rectangle ``area`` (level-0 px)."""
    x0, y0, x1, y1 = box
    ax0, ay0, ax1, ay1 = area
    w, h = max(0, min(x1, ax1) - max(x0, ax0)), max(0, min(y1, ay1) - max(y0, ay0))
    return w * h / ((x1 - x0) * (y1 - y0))


def _ink(box, truth: Planted, step: int = 8) -> tuple[float, float]:
    """(share of the patch under a planted stroke, the stroke's cover at its centre)."""
    gx = np.arange(box[0], box[2], step, dtype=np.float32)[None, :]
    gy = np.arange(box[1], box[3], step, dtype=np.float32)[:, None]
    cover = np.zeros((gy.shape[0], gx.shape[1]), np.float32)
    for s in truth.strokes:
        c = stroke_cover(s, gx, gy)
        if c is not None:
            cover = np.maximum(cover, c)
    centre = np.zeros((1, 1), np.float32)
    for s in truth.strokes:
        c = stroke_cover(s, np.float32([[(box[0] + box[2]) / 2]]), np.float32([[(box[1] + box[3]) / 2]]))
        if c is not None:
            centre = np.maximum(centre, c)
    return float((cover > 0).mean()), float(centre[0, 0])


def test_crops_flags_each_artifact_against_the_planted_truth(planted, cli):
    assert cli("qc", "--data", "manifest.csv", cwd=planted).exit_code == 0
    qc = {r["image_id"]: r for r in pq.read_table(planted / "run" / store.QC_FILE).to_pylist()}
    assert qc["art.svs"]["ink"] and not qc["art.svs"]["flagged"]   # a slide's ink is crops' to handle, per patch
    r = cli(*CROPS, "--min-usable", "0.9", cwd=planted)
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "art.svs (train): fold" in said and "blur" in said and "pen ink kept off the tissue: blue" in said
    assert "art.svs (train): only" in said and "under --min-usable 0.9" in said   # named, kept (no --strict)
    assert "skipped" not in said
    rows = pq.read_table(planted / "run" / store.CROPS_FILE).to_pylist()
    truth = Planted.read(planted / "art.svs.artifacts.json")
    art = [r for r in rows if r["image_id"] == "art.svs"]
    boxes = [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in art]
    flags = [set(r["flags"]) for r in art]
    ink = [_ink(b, truth) for b in boxes]
    assert not any(centre > 0 for _, centre in ink)           # no patch centred on a stroke (ink is off the tissue)
    band = [i for i, b in enumerate(boxes) if _inside(b, truth.blur) == 1]
    fold = [i for i, b in enumerate(boxes) if _inside(b, truth.fold) == 1]
    assert len(band) >= 8 and np.mean(["blur" in flags[i] for i in band]) >= 0.9
    assert len(fold) >= 3 and np.mean(["fold" in flags[i] for i in fold]) >= 0.9
    cx, cy, rad = truth.bubble
    near = [max(_inside(b, truth.blur), _inside(b, truth.fold), _inside(b, (cx - rad, cy - rad, cx + rad, cy + rad)),
                ink[i][0]) for i, b in enumerate(boxes)]
    blurred = [i for i, f in enumerate(flags) if "blur" in f]
    assert np.mean([_inside(boxes[i], truth.blur) > 0 or near[i] > 0 for i in blurred]) >= 0.9   # precision
    assert all(_inside(boxes[i], truth.fold) > 0 for i, f in enumerate(flags) if "fold" in f)
    clean = [bool(flags[i]) for i, n in enumerate(near) if n == 0]   # clean tissue: this slide's and the clean
    clean += [bool(r["flags"]) for r in rows if r["image_id"] in ("b.svs", "c.svs", "d.svs")]  # slides' patches
    assert len(clean) >= 100 and np.mean(clean) < 0.02
    assert all(r["sharpness"] is None or r["sharpness"] >= 0 for r in rows)

    r = cli("report", "--run", "run", "--data", "manifest.csv", cwd=planted)   # flagged patches drawn by cause
    page = (planted / "run" / "report.html").read_text()
    assert r.exit_code == 0 and "Artifact flags per slide" in page
    usable = np.mean([not r["flags"] for r in art])
    assert f"<td>art.svs (train)</td><td>{len(art)}</td><td>{usable:.0%}</td>" in page.replace("\n", "")

    strict = cli(*CROPS, "--min-usable", "0.9", "--strict", "--run", "strict-run", cwd=planted)
    assert strict.exit_code == 0, strict.output
    left = {r["image_id"] for r in pq.read_table(planted / "strict-run" / store.CROPS_FILE).to_pylist()}
    assert "art.svs" not in left and "b.svs" in left and "slide left out (--strict)" in " ".join(strict.output.split())


def test_fit_submit_and_predict_leave_the_same_flagged_patches_out(planted, cli):
    from histoembed.stages.predict import predict_images

    run = planted / "run"
    if not (run / store.CROPS_FILE).exists():
        assert cli(*CROPS, cwd=planted).exit_code == 0
    for args in (["embed", "--repeats", "1"], ["fit", "--folds", "2", "--heads", "xgb"], ["submit"]):
        r = cli(*args, cwd=planted)
        assert r.exit_code == 0, (args, r.output)
        if args[0] == "fit":
            said = " ".join(r.output.split())
    crops = pq.read_table(run / store.CROPS_FILE).to_pylist()
    flagged = {n: sum(bool(r["flags"]) for r in crops if r["image_id"] == n) for n in ("art.svs", "test.svs")}
    assert flagged["art.svs"] > 0 and flagged["test.svs"] > 0
    left = json.loads((run / store.METRICS_FILE).read_text())["artifacts_left_out"]
    assert left["patches"] == flagged["art.svs"] and left["per_slide"] == {"art.svs": flagged["art.svs"]}
    assert f"artifacts: {flagged['art.svs']} flagged patches of 1 slide(s) left out" in said

    table = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pydict()
    [pred] = predict_images(run, [planted / "test.svs"], device="cpu", image_ids=["test.svs"])
    usable = sum(not r["flags"] for r in crops if r["image_id"] == "test.svs")
    assert pred.crops == usable                                  # predict flags the patches crops flagged
    np.testing.assert_allclose(list(pred.probs.values()), [table[f"prob_{c}"][0] for c in pred.probs], atol=1e-4)

    r = cli("fit", "--folds", "2", "--heads", "xgb", "--keep-artifacts", "blur,ink,fold,background", cwd=planted)
    assert r.exit_code == 0, r.output
    assert json.loads((run / store.METRICS_FILE).read_text())["artifacts_left_out"]["patches"] == 0
    [kept] = predict_images(run, [planted / "test.svs"], device="cpu", image_ids=["test.svs"])
    assert kept.crops == sum(r["image_id"] == "test.svs" for r in crops)
    bad = cli("fit", "--keep-artifacts", "pen", cwd=planted)
    assert bad.exit_code != 0 and "pen" in bad.output and "Traceback" not in bad.output


def test_a_slide_whose_every_patch_is_flagged_keeps_them_all(tmp_path):
    schema = pa.schema([("image_id", pa.string()), ("split", pa.string()), ("crop_index", pa.int32()),
                        ("flags", pa.list_(pa.string()))])
    rows = [("a", "train", 0, ["blur"]), ("a", "train", 1, []), ("a", "train", 2, ["ink", "blur"]),
            ("z", "train", 0, ["blur"]), ("z", "train", 1, ["fold"]), ("img.png", "train", 0, None),
            ("a", "test", 0, ["blur"])]
    pq.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema),
                   tmp_path / store.CROPS_FILE)
    ids, crops = np.array(["a", "a", "a", "z", "z", "img.png"], object), np.array([0, 1, 2, 0, 1, 0])
    use, left = patch_flags.usable_rows(ids, crops, tmp_path, "train")
    assert use.tolist() == [False, True, False, True, True, True]
    assert left.kept_whole == ["z"] and left.per_slide == {"a": 2} and left.by_cause == {"ink": 1, "blur": 2}
    assert "every patch of 1 slide(s) is flagged, so all are kept: z" in patch_flags.describe(left)
    use, left = patch_flags.usable_rows(ids, crops, tmp_path, "train", keep=("blur",))
    assert use.tolist() == [True, True, False, True, False, True] and left.by_cause == {"ink": 1, "fold": 1}
    assert not left.kept_whole and "2 flagged patches of 2 slide(s) left out" in patch_flags.describe(left)


def test_synth_plants_artifacts_in_a_slide_cohort_and_says_where(tmp_path, cli):
    r = cli("synth", "--out", tmp_path / "c", "--slides", 4, "--slide-size", 1600, "--artifacts", "--seed", 2)
    assert r.exit_code == 0, r.output
    assert "planted artifacts" in " ".join(r.output.split())
    slides = sorted((tmp_path / "c" / "slides").glob("*.svs"))
    assert len(slides) == 4
    for path in slides:
        truth = Planted.read(path.with_name(path.name + ".artifacts.json"))
        assert [s.colour for s in truth.strokes] == ["blue", "green", "red", "black"]
        (x0, y0, x1, y1), (fx0, fy0, fx1, fy1) = truth.blur, truth.fold
        assert x1 > x0 and y1 > y0 and fx1 > fx0 and fy1 > fy0 and truth.bubble[2] > 0 and truth.mpp == 0.25
    bad = cli("synth", "--out", tmp_path / "d", "--artifacts")
    assert bad.exit_code != 0 and "--slides" in bad.output and "Traceback" not in bad.output

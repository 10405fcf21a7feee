"""The HTML report: written from a real (tiny) run, rendered in headless Chromium.

The rendering check has two passes: ``--dump-dom`` on a copy of the page with a small
probe script that, after the load event, writes every <img>'s load state and box into
the DOM; then a ``--screenshot`` of the page itself at its full height, whose pixels
inside each plot's box must not be blank. A control page with a broken and a blank image
shows both checks fail when they should.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from histoembed.stages import report
from histoembed.core import store
from histoembed.inputs.provenance import DataChanged

WIDTH = 1280
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]
PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images).map(im => {
    const r = im.getBoundingClientRect();
    return {alt: im.alt, cls: im.className, ok: im.complete && im.naturalWidth > 0,
            naturalWidth: im.naturalWidth, x: r.left + window.scrollX, y: r.top + window.scrollY,
            width: r.width, height: r.height};
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify({height: document.documentElement.scrollHeight, images: images});
  document.body.appendChild(pre);
});
</script>"""

# Every plot a complete run's report must show (the alt text of its <img>).
EXPECTED_PLOTS = ["class balance and crops per image", "crops drawn on images",
                  "per-fold and out-of-fold macro-F1", "confusion matrix and per-class F1",
                  "reliability diagrams", "fusion weight curve", "accuracy by view spread",
                  "per-image crop prediction maps",
                  "ROC and precision-recall curves of the fused out-of-fold probabilities"]


@dataclass
class Rendered:
    images: list[dict]      # per <img>: alt, cls, ok, naturalWidth, x, y, width, height (CSS px)
    screenshot: np.ndarray  # H x W x 3 uint8


def chromium() -> str:
    """The Chromium binary. Missing Chromium fails the test (never a silent skip)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed to check that the report renders: install it with "
                "`apt-get install -y chromium chromium-driver` (CI's .ci/run does this)")


def _chromium(args: list[str], profile: Path) -> str:
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def render(page: Path, workdir: Path) -> Rendered:
    probed = workdir / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(["--dump-dom", "--virtual-time-budget=10000", f"--window-size={WIDTH},1000",
                     probed.resolve().as_uri()], workdir / "profile-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run (no <pre id=probe> in the dumped DOM)"
    probe = json.loads(html.unescape(found.group(1)))
    shot = workdir / "page.png"
    _chromium([f"--screenshot={shot}", f"--window-size={WIDTH},{int(probe['height']) + 20}",
               "--virtual-time-budget=10000", page.resolve().as_uri()], workdir / "profile-shot")
    from PIL import Image
    return Rendered(probe["images"], np.asarray(Image.open(shot).convert("RGB")))


def ink(rendered: Rendered, image: dict) -> float:
    """Share of clearly non-white pixels inside an image's box on the screenshot."""
    x0, y0 = int(image["x"]), int(image["y"])
    x1, y1 = int(image["x"] + image["width"]), int(image["y"] + image["height"])
    region = rendered.screenshot[y0:y1, x0:x1]
    return float((region.min(axis=2) < 200).mean()) if region.size else 0.0


# ---------------------------------------------------------------- the real report

@pytest.fixture(scope="module")
def written(pipeline_run):
    data, run = pipeline_run
    path = report.write_report(run, data)
    return data, run, path


def test_report_renders_every_plot_in_chromium(written, tmp_path):
    _, _, page = written
    text = page.read_text(encoding="utf-8")
    assert "Not shown" not in text, re.findall(r"Not shown: [^<]*", text)
    rendered = render(page, tmp_path)
    alts = [im["alt"] for im in rendered.images]
    for plot in EXPECTED_PLOTS:
        assert plot in alts, f"plot {plot!r} missing from the page ({alts})"
    broken = [im["alt"] for im in rendered.images if not im["ok"]]
    assert not broken, f"images that did not load in Chromium: {broken}"
    for im in rendered.images:
        if im["cls"] == "plot":
            assert im["width"] > 200 and im["height"] > 150, im
            assert ink(rendered, im) > 0.03, f"plot {im['alt']!r} is blank on the screenshot"
    assert any(im["cls"] == "thumb" for im in rendered.images), "no QC thumbnail on the page"
    assert any(im["cls"] == "crop" for im in rendered.images), "no crop strip on the page"


def test_report_is_self_contained(written):
    _, _, page = written
    text = page.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"#]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), \
        [s[:40] for s in sources if not s.startswith("data:")]
    assert "<link" not in text and "<script" not in text


def test_report_numbers_match_metrics(written):
    """The headline table is the OOF macro-F1 that scikit-learn computes from oof.parquet."""
    from sklearn.metrics import f1_score
    _, run, page = written
    oof = store.read_table(run / store.OOF_FILE, "oof").to_pandas()
    expected = f1_score(oof["label"], oof["prediction"], average="macro")
    row = re.search(r"<tr><td>fused</td><td>([0-9.]+)</td>", page.read_text())
    assert row and abs(float(row.group(1)) - expected) < 1e-3
    # the field's numbers in the scores table: metrics.json's, scikit-learn's on oof.parquet
    from sklearn.metrics import roc_auc_score

    metrics = json.loads((run / store.METRICS_FILE).read_text())
    auroc = metrics["heads"]["fused"]["auroc"]
    assert f"<td>fused</td><td>{auroc['value']:.3f} [{auroc['lo']:.3f}, {auroc['hi']:.3f}]</td>" in page.read_text()
    classes = store.read_meta(run / store.OOF_FILE)["classes"]
    prob = np.stack(oof["prob"].to_numpy()).astype(np.float64)
    y = oof["label"].map(classes.index).to_numpy()
    assert auroc["value"] == pytest.approx(
        roc_auc_score(y, prob / prob.sum(1, keepdims=True), multi_class="ovr"), abs=1e-6)


def test_curves_section_draws_bands_over_patients(tmp_path):
    """ROC and PR of the fused out-of-fold probabilities, the band resampling oof.parquet's patients."""
    from histoembed.maths.metrics import softmax
    from histoembed.stages.report.curves import curves_section
    from histoembed.stages.report.load import LoadedRun, OutOfFold

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    prob = softmax(rng.normal(size=(90, 3)) + 2 * np.eye(3)[y])
    run = LoadedRun(folder=tmp_path, data=None)
    run.oof = OutOfFold(image_id=np.array([f"i{k}" for k in range(90)], dtype=object), fold=np.arange(90) % 3, y=y,
                        classes=["a", "b", "c"], logits={}, prob=prob, pred=prob.argmax(1),
                        groups=np.array([f"p{k // 3}" for k in range(90)], dtype=object))
    page = curves_section(run)
    assert "30 patients" in page and 'alt="ROC and precision-recall curves' in page and "one-vs-rest" in page
    run.oof.groups, run.oof.classes, run.oof.y = None, ["no", "yes"], (y > 0).astype(int)
    run.oof.prob = np.stack([prob[:, 0], 1 - prob[:, 0]], 1)
    binary = curves_section(run)
    assert "90 images" in binary and "the curve of yes" in binary
    run.oof = None
    assert "Not shown" in curves_section(run)


# ---------------------------------------------------------------- missing inputs, bad input

def test_report_of_an_empty_run_says_what_is_missing(cli, tmp_path):
    (tmp_path / "run").mkdir()
    result = cli("report", "--run", tmp_path / "run", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "run" / store.REPORT_FILE).read_text()
    for anchor in ("dataset", "qc", "crops", "scores", "confusion", "calibration", "fusion", "maps"):
        section = re.search(rf'<section id="{anchor}">(.*?)</section>', text, re.S)
        assert section and "Not shown" in section.group(1), anchor


def test_report_finds_the_data_in_the_run_and_stops_when_it_changed(written, tmp_path, cli):
    """Issue 23: like submit and predict, report stops when the data changed since the crops were cut
    (a page of crops drawn on other images would mislead), naming the folder and what to re-run. First,
    `histoembed report --data` writes the page and says where (one page written through the CLI here)."""
    import json

    import pyarrow.parquet as pq

    data, run, _ = written
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / store.REPORT_FILE).unlink()
    result = cli("report", "--run", copy, "--data", data)
    assert result.exit_code == 0, result.output
    assert (copy / store.REPORT_FILE).exists() and str(copy / store.REPORT_FILE) in result.output
    text = (copy / store.REPORT_FILE).read_text()
    assert "Not shown" not in text, re.findall(r"Not shown: [^<]*", text)
    # point the run at a copy of the data, then change a file there
    data_copy = tmp_path / "data"
    shutil.copytree(data, data_copy)
    crops = copy / store.CROPS_FILE
    meta = {**store.read_meta(crops), "data": str(data_copy)}
    pq.write_table(pq.read_table(crops).replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), crops)
    assert "Not shown" not in report.write_report(copy, None).read_text()     # the data folder crops recorded
    (data_copy / "test_data" / "img_0000.png").write_bytes((data_copy / "test_data" / "img_0001.png").read_bytes())
    before = (copy / store.REPORT_FILE).read_text()
    for extra in ((), ("--data", data_copy)):
        result = cli("report", "--run", copy, *extra)
        assert result.exit_code == 2, result.output
        assert "changed since `histoembed crops` cut crops.parquet" in result.output and str(data_copy) in result.output
        assert "re-run `histoembed crops`" in result.output and "wrote" not in result.output
    assert (copy / store.REPORT_FILE).read_text() == before      # the last good page is left as it was
    with pytest.raises(DataChanged):
        report.write_report(copy, None)


def test_report_lists_test_images_that_copy_training_images_and_mask_twins(written):
    data, _, page = written
    text = page.read_text(encoding="utf-8")
    planted = json.loads((data / "planted.json").read_text())
    [[test_copy, original]] = planted["near_duplicates"]
    [[cartoon, source]] = planted["mask_twins"]
    section = re.search(r'<section id="qc">(.*?)</section>', text, re.S).group(1)
    assert "Possible leakage:</b> 1 test image(s)" in section
    assert f"<tr><td>{test_copy}</td><td>{original}</td>" in section
    assert "1 pair(s) of training images share a byte-identical mask file" in section
    a, b = sorted((cartoon, source))
    assert f"<tr><td>{a}</td><td>{b}</td><td>{cartoon}</td></tr>" in section


def test_report_of_a_missing_run_folder_is_a_user_error(cli, tmp_path):
    result = cli("report", "--run", tmp_path / "nope")
    assert result.exit_code == 2
    assert "nope" in result.output and "run folder not found" in result.output


def test_report_lists_an_unreadable_file_instead_of_crashing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / store.METRICS_FILE).write_text("{not json")
    (run / store.OOF_FILE).write_bytes(b"not parquet")
    text = report.write_report(run).read_text()
    assert "metrics.json is not valid JSON" in text and "cannot be read" in text


# ---------------------------------------------------------------- the checks can fail

def _png(rgb: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_render_check_catches_broken_and_blank_images(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    blank = np.full((300, 400, 3), 255, np.uint8)
    page = tmp_path / "control.html"
    page.write_text(f'<!DOCTYPE html><html><body>'
                    f'<img class="plot" alt="good" src="{_png(good)}">'
                    f'<img class="plot" alt="blank" src="{_png(blank)}">'
                    f'<img class="plot" alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAAN">'
                    f'</body></html>')
    rendered = render(page, tmp_path)
    by_alt = {im["alt"]: im for im in rendered.images}
    assert by_alt["good"]["ok"] and by_alt["blank"]["ok"] and not by_alt["broken"]["ok"]
    assert ink(rendered, by_alt["good"]) > 0.5
    assert ink(rendered, by_alt["blank"]) < 0.01


# ---------------------------------------------------------------- the numbers are fit's

def test_report_ece_equals_metrics_json(written):
    """ECE and NLL in the calibration table are metrics.json's, for the probabilities the curves draw."""
    from histoembed.models.heads.decisions import calibrated_probabilities
    from histoembed.maths import metrics

    _, run, page = written
    saved = json.loads((run / store.METRICS_FILE).read_text())["heads"]
    table = re.search(r'<section id="calibration">.*?<tbody>(.*?)</tbody>', page.read_text(), re.S).group(1)
    rows = re.findall(r"<tr><td>(\w+)</td><td>(.*?)</td><td>([0-9.]+)</td><td>([0-9.]+)</td></tr>", table)
    oof = report.load.read_out_of_fold(run / store.OOF_FILE)
    folds = json.loads((run / store.CALIBRATION_FILE).read_text())["folds"]
    probs = calibrated_probabilities(oof.logits, oof.fold, folds)
    assert len(rows) == 2 * len(probs) == 2 * len(saved)
    for (head, when, ece, nll), (name, phase) in zip(rows, [(h, k) for h in probs for k in (0, 1)]):
        assert head == name and ("before" in when) == (phase == 0)
        suffix = "_before_calibration" if phase == 0 else ""
        assert float(ece) == pytest.approx(saved[head][f"ece{suffix}"], abs=5e-4)
        assert float(nll) == pytest.approx(saved[head][f"nll{suffix}"], abs=5e-4)
        assert metrics.ece(probs[head][phase], oof.y) == pytest.approx(saved[head][f"ece{suffix}"], abs=1e-9)


def test_report_with_attention_mil_maps_its_attention_and_tables_n_way_weights(pipeline_run, tmp_path):
    from histoembed.core.config import FitSettings, MLPSettings
    from histoembed.stages.fit import run_fit

    data, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    run_fit(copy, FitSettings(folds=3, bootstrap=0, heads=("mlp", "logreg", "abmil"),
                              mlp=MLPSettings(hidden=16, epochs=3, patience=2)))
    page = report.render_report(copy, data)
    maps = page[page.index('id="maps"'):]
    assert "attention-MIL" in maps and "per-image crop prediction maps" in maps
    fusion = page[page.index('id="fusion"'):page.index('id="decisions"')]
    assert "w_mlp" in fusion and "w_abmil" in fusion and "final (test set)" in fusion
    decisions = page[page.index('id="decisions"'):page.index('id="maps"')]
    assert "argmax + class offsets" in decisions and "mean set size" in decisions



# ---------------------------------------------------------------- whole slides (issue 20)

SLIDE_RUN_TOML = """
[crops]
workers = 1
[embed]
encoder = "{encoder}"
workers = 0
[fit]
bootstrap = 20
[fit.xgb]
n_estimators = 10
pca_dims = 8
early_stopping_rounds = 3
"""


def test_report_of_a_slide_run_draws_tissue_patch_grid_and_attention(tmp_path, tiny_dinov2, cli, monkeypatch):
    """Ten small slides through crops, embed and fit (abmil): the report draws each slide's thumbnail with its
    tissue outline and patches, and the attention beside it, for the first MAX_SLIDES slides; the flat-image
    sections neither read the slides as images nor fail. Issue 28 item 5: two test slides `crops` skipped (no
    tissue, unreadable) are listed with their reasons, and named as the rows `submit` gave the class prior."""
    from histoembed.tools.synthetic import SlideSpec, make_slide_cohort, write_slide

    make_slide_cohort(tmp_path, n=10, seed=3, size=2000, n_test=2)
    write_slide(tmp_path / "slides" / "blank.svs", SlideSpec(6, 2000, 1500, "benign", blank=True))
    (tmp_path / "slides" / "garbage.svs").write_bytes(b"II*\0" + bytes(range(256)) * 20)
    with (tmp_path / "manifest.csv").open("a") as f:
        f.write("slides/blank.svs,,,test,patient_900\nslides/garbage.svs,,,test,patient_901\n")
    (tmp_path / "histoembed.toml").write_text(SLIDE_RUN_TOML.format(encoder=tiny_dinov2))
    for args in (["crops", "--data", "manifest.csv", "--size", 64, "--mpp", 0.5, "--max-patches", 12],
                 ["embed", "--repeats", 1], ["fit", "--folds", 2, "--heads", "abmil,xgb"], ["submit"]):
        r = cli(*args, cwd=tmp_path)
        assert r.exit_code == 0, (args, r.output)
    monkeypatch.setattr(report.slides, "MAX_SLIDES", 6)
    page = report.write_report(tmp_path / "run")
    text = page.read_text(encoding="utf-8")
    slides = text[text.index('<section id="slides">'):]
    assert "The first 6 of 10 slides" in slides and "attention-MIL" in slides
    assert "outlined in green" in slides
    crops = text[text.index('<section id="crops">'):text.index('<section id="scores">')]
    assert 'href="#slides"' in crops and "Not shown" not in crops
    skipped = html.unescape(text[text.index('<section id="skipped">'):text.index('<section id="crops">')])
    assert "blank.svs</td><td>no tissue found" in skipped and "garbage.svs</td><td>" in skipped
    prior = skipped[skipped.index("class prior"):]
    assert "slides/blank.svs</td><td>no tissue found" in prior and "slides/garbage.svs</td>" in prior
    assert "Not shown" not in skipped and "2 test row(s)" in skipped
    (tmp_path / "render").mkdir()
    rendered = render(page, tmp_path / "render")
    drawn = [im for im in rendered.images if im["alt"].startswith("slide ")]
    assert [im["alt"] for im in drawn] == [f"slide slides/slide_{i:03d}.svs (train): tissue, patch grid and attention"
                                           for i in range(6)]
    for im in drawn:
        assert im["ok"] and im["width"] > 400 and ink(rendered, im) > 0.1, im
    sources = re.findall(r'(?:src|href)="([^"#]*)"', text)
    assert all(s.startswith("data:image/png;base64,") for s in sources)  # still one self-contained file


def test_a_slide_figure_puts_patch_boxes_where_the_crops_are(tmp_path):
    """The patch grid is drawn in thumbnail pixels: a level-0 box times the thumbnail's scale."""
    from histoembed.core.config import CropSettings
    from histoembed.inputs.cropping import slide_patches, slide_tissue
    from histoembed.inputs.dataset import Sample
    from histoembed.tools.synthetic import SlideSpec, write_slide

    path = write_slide(tmp_path / "a.svs", SlideSpec(4, 2400, 1800, "benign"))
    sample = Sample("a.svs", "train", path, None, "benign", slide=True)
    settings = CropSettings(size=64, mpp=0.5, max_patches=5)
    t = slide_tissue(sample, settings)
    boxes, geo, mpp0 = slide_patches(sample, settings)
    assert (geo, mpp0) == (t.geo, 0.25) and t.thumb.shape[:2] == t.tissue.shape
    for (x0, y0, x1, y1), fraction in boxes:  # each box, scaled to the thumbnail, covers the tissue crops counted
        drawn = t.tissue[int(y0 * t.scale):math.ceil(y1 * t.scale), int(x0 * t.scale):math.ceil(x1 * t.scale)]
        assert drawn.mean() == pytest.approx(fraction) and fraction >= settings.min_tissue
    img = report.slides.slide_figure("train/a.svs", "benign", t, np.array([b for b, _ in boxes], float),
                                     np.arange(len(boxes)), ({i: 1.0 for i in range(len(boxes))}, "benign", 0.9))
    assert img.startswith('<img class="plot" alt="slide a.svs (train): tissue, patch grid and attention"')

"""Crops of several scales into the heads: the fusion maths, and context crops through every stage."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoembed.core import feature_store, store
from histoembed.core.errors import UserError
from histoembed.maths.multiscale import fuse_scales, scales_of


def features(rows: list[tuple[str, str, int, int, float]], dim: int = 3, seed: int = 0) -> feature_store.Features:
    """Features of (split, image_id, crop_index, view, scale) rows with random embeddings."""
    rng = np.random.default_rng(seed)
    split, image_id, crop, view, scale = (np.array(c) for c in zip(*rows))
    return feature_store.Features(split=split.astype(object), image_id=image_id.astype(object),
                          crop_index=crop.astype(np.int32), view=view.astype(np.int16),
                          embedding=rng.normal(size=(len(rows), dim)).astype(np.float32), meta={},
                          scale=scale.astype(np.float32))


def grid(images, views=(0, 1), per_scale=2, scales=(1.0, 2.0)):
    """Every image with ``per_scale`` crops at each scale (index j * n + i), in every view."""
    return [("train", name, j * per_scale + i, v, s) for name in images for v in views
            for j, s in enumerate(scales) for i in range(per_scale)]


def test_concat_is_the_per_scale_means_side_by_side_per_image_and_view():
    f = features(grid(["b.png", "a.png"]))
    out = fuse_scales(f, "concat")
    assert len(out) == 4 and out.embedding.shape == (4, 6)
    for row in range(len(out)):
        same = (f.image_id == out.image_id[row]) & (f.view == out.view[row])
        expected = np.concatenate([f.embedding[same & (f.scale == s)].mean(axis=0) for s in (1.0, 2.0)])
        np.testing.assert_allclose(out.embedding[row], expected, rtol=1e-6)
    assert sorted(zip(out.image_id, out.view)) == [("a.png", 0), ("a.png", 1), ("b.png", 0), ("b.png", 1)]
    assert fuse_scales(f, "crops") is f and scales_of(f) == [1.0, 2.0]


def test_concat_refuses_a_missing_or_unknown_scale():
    rows = grid(["a.png", "b.png"])
    rows = [r for r in rows if not (r[1] == "b.png" and r[4] == 2.0 and r[3] == 1)]   # b's view 1 lacks scale 2
    with pytest.raises(UserError, match="train image b.png has no crop of scale 2 .view 1."):
        fuse_scales(features(rows), "concat")
    with pytest.raises(UserError, match="crops of scale 2 among the features, but the heads read scales 1, 1.5"):
        fuse_scales(features(grid(["a.png"])), "concat", [1.0, 1.5])


def test_same_names_in_two_splits_stay_apart():
    rows = grid(["a.png"]) + [("test", *r[1:]) for r in grid(["a.png"])]
    out = fuse_scales(features(rows), "concat")
    assert sorted(set(zip(out.split, out.image_id))) == [("test", "a.png"), ("train", "a.png")] and len(out) == 4


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, pipeline_settings):
    """A tiny synthetic dataset cut with --scales 1,2 through every stage, fitted with --scale-fusion concat."""
    from typer.testing import CliRunner

    from histoembed.cli import app
    from histoembed.tools.synthetic import make_dataset

    root = tmp_path_factory.mktemp("scales")
    data, run = root / "data", root / "run"
    make_dataset(data, n_train=28, n_test=4, seed=2, outliers=False, size_range=(128, 192))
    s = pipeline_settings
    runner = CliRunner()

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    cli("crops", "--data", data, "--run", run, "--size", s.crops.size, "--workers", 1, "--scales", "1,2")
    cli("embed", "--run", run, "--encoder", s.embed.encoder, "--repeats", 2, "--workers", 0, "--device", "cpu")
    fit_out = cli("fit", "--run", run, "--folds", 3, "--bootstrap", 50, "--heads", "mlp,logreg", "--mlp-hidden", 16,
                  "--mlp-epochs", 3, "--scale-fusion", "concat")
    cli("submit", "--run", run)
    cli("report", "--run", run)
    return data, run, fit_out, cli


def test_context_crops_flow_through_embed_fit_submit_report_and_predict(context_run):
    data, run, fit_out, cli = context_run
    crops = pq.read_table(run / store.CROPS_FILE).to_pylist()
    assert {r["scale"] for r in crops} == {1.0, 2.0}
    assert "crop scales 1, 2, scale fusion concat" in fit_out
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert metrics["scale_fusion"]["mode"] == "concat" and metrics["scale_fusion"]["scales"] == [1.0, 2.0]
    manifest = json.loads((run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE).read_text())
    features = feature_store.read_features(feature_store.find_feature_store(run))
    assert manifest["dim"] == 2 * features.embedding.shape[1]      # the heads read [scale 1 mean, scale 2 mean]
    html = (run / store.REPORT_FILE).read_text()
    assert "scale fusion <b>concat</b>" in html and "scale 1" in html and "scale 2" in html
    assert "with --scale-fusion concat the heads read per-scale image means" in html
    assert "Context crops (scale above 1) are not drawn" in html
    rows = list(csv.DictReader((run / store.SUBMISSION_FILE).open()))
    assert len(rows) == 4
    # a test image through predict gets the probabilities submit gave it (its crops at both scales, fused alike)
    from histoembed.stages.predict import predict_images

    image = data / "test_data" / "img_0000.png"
    [pred] = predict_images(run, [image], [image.with_name("mask_0000.png")], device="cpu")
    table = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pydict()
    row = table["image_id"].index("img_0000.png")
    np.testing.assert_allclose(list(pred.probs.values()), [table[f"prob_{c}"][row] for c in pred.probs], atol=1e-4)
    assert pred.crops == sum(1 for r in crops if r["split"] == "test" and r["image_id"] == "img_0000.png")


def test_fitting_the_same_context_crops_as_more_crops(context_run):
    _, run, _, cli = context_run
    out = cli("fit", "--run", run, "--folds", 3, "--bootstrap", 50, "--heads", "mlp,logreg", "--mlp-hidden", 16,
              "--mlp-epochs", 3, "--scale-fusion", "crops")
    assert "scale fusion crops: every crop, whatever its scale, is one crop of its image" in out
    manifest = json.loads((run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["scale_fusion"] == "crops" and manifest["dim"] == feature_store.read_features(
        feature_store.find_feature_store(run)).embedding.shape[1]
    cli("submit", "--run", run)
    cli("report", "--run", run)
    html = (run / store.REPORT_FILE).read_text()
    assert "scale fusion <b>crops</b>" in html and "per-scale image means" not in html


# ---------------------------------------------------------------- evidence: what context crops recover, what they cost

def test_context_crops_recover_a_class_signal_that_lives_around_the_blob(crop_evidence):
    """Planted: the class shows only in a ring around each blob, outside every default crop. `--scales 1,2` with
    `--scale-fusion concat` sees it: the paired interval of the macro-F1 difference lies above 0."""
    run, compare = crop_evidence
    r = compare(run("context", "plain"), run("context", "scales", "--scales", "1,2", fusion="concat"))
    assert r["interval_95"][0] > 0, r
    assert r["macro_f1_b"] > r["macro_f1_a"] + 0.15


def test_context_crops_cost_nothing_beyond_noise_on_clean_data(crop_evidence):
    """Clean: the class shows inside the blobs, where default crops look; adding context crops changes nothing
    that the paired interval can tell from noise."""
    run, compare = crop_evidence
    r = compare(run("clean", "plain"), run("clean", "scales", "--scales", "1,2", fusion="concat"))
    lo, hi = r["interval_95"]
    assert lo <= 0 <= hi, r


def test_scale_fusion_option_is_checked_and_shown(cli):
    res = cli("fit", "--scale-fusion", "stack")
    assert res.exit_code == 2 and "--scale-fusion" in res.output
    res = cli("config", "fit", "--scale-fusion", "concat")
    assert res.exit_code == 0 and 'scale_fusion = "concat"' in res.output

"""`histoembed predict`: a new image gets the same crops, views and ensemble as the run's test images."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoembed.core import store
from histoembed.stages.predict import predict_images


def test_a_test_image_is_predicted_as_submit_predicted_it(pipeline_run):
    data, run = pipeline_run
    image = sorted((data / "test_data").glob("img_*.png"))[0]
    mask = image.with_name(image.name.replace("img_", "mask_"))
    [pred] = predict_images(run, [image], [mask], device="cpu")
    table = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pydict()
    row = table["image_id"].index(image.name)   # test_predictions holds the test split only
    assert table["split"][row] == "test"
    assert pred.label == table["label"][row]
    expected = [table[f"prob_{c}"][row] for c in pred.probs]
    np.testing.assert_allclose(list(pred.probs.values()), expected, atol=1e-4)
    assert sum(pred.probs.values()) == pytest.approx(1.0)


def test_predict_cli_writes_a_csv_and_finds_tissue_without_a_mask(pipeline_run, cli, tmp_path):
    data, run = pipeline_run
    images = sorted((data / "test_data").glob("img_*.png"))[:2]
    out = tmp_path / "preds.csv"
    r = cli("predict", *images, "--run", run, "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["image"] for row in rows] == [str(p) for p in images]
    assert all(abs(sum(float(v) for k, v in row.items() if k.startswith("prob_")) - 1) < 1e-4 for row in rows)


def test_predict_names_a_missing_file_and_a_mismatched_mask(pipeline_run, cli, tmp_path):
    data, run = pipeline_run
    r = cli("predict", tmp_path / "nope.png", "--run", run)
    assert r.exit_code == 2 and "nope.png" in r.output and "file not found" in r.output
    images = sorted((data / "test_data").glob("img_*.png"))
    masks = sorted((data / "test_data").glob("mask_*.png"))
    import cv2
    small = tmp_path / "small_mask.png"
    cv2.imwrite(str(small), np.zeros((5, 5), np.uint8))
    r = cli("predict", images[0], "--mask", small, "--run", run)
    assert r.exit_code == 2 and "small_mask.png" in r.output and "5x5" in r.output
    r = cli("predict", images[0], images[1], "--mask", masks[0], "--run", run)
    assert r.exit_code == 2 and "one --mask per image" in r.output


def test_predict_without_a_fitted_run_says_what_to_run(cli, tmp_path, pipeline_run):
    data, _ = pipeline_run
    image = sorted((data / "test_data").glob("img_*.png"))[0]
    r = cli("predict", image, "--run", tmp_path / "empty")
    assert r.exit_code == 2 and "histoembed fit" in r.output


def test_a_name_means_the_test_image_of_that_name_from_the_runs_data(pipeline_run, cli, tmp_path):
    """Both splits hold img_0000.png; a bare name is looked up in the data crops recorded, test split by default."""
    data, run = pipeline_run
    assert (data / "train_data" / "img_0001.png").exists() and (data / "test_data" / "img_0001.png").exists()
    out = tmp_path / "p.csv"
    r = cli("predict", "img_0001.png", "--run", run, "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    [row] = list(csv.DictReader(out.open()))
    assert row["image"] == str(data.resolve() / "test_data" / "img_0001.png")
    table = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pydict()
    k = table["image_id"].index("img_0001.png")
    assert table["split"][k] == "test" and row["label"] == table["label"][k]
    np.testing.assert_allclose([float(v) for c, v in row.items() if c.startswith("prob_")],
                               [table[c][k] for c in row if c.startswith("prob_")], atol=1e-4)
    r = cli("predict", "img_0001.png", "--split", "train", "--run", run, "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    [row] = list(csv.DictReader(out.open()))
    assert row["image"] == str(data.resolve() / "train_data" / "img_0001.png")
    r = cli("predict", "img_0999.png", "--run", run)
    assert r.exit_code == 2 and "no test image named 'img_0999.png'" in r.output
    r = cli("predict", "img_0001.png", "--split", "val", "--run", run)
    assert r.exit_code == 2 and "--split 'val'" in r.output

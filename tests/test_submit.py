"""`histoembed submit`: one row per test image in folder order, labels as spelled in training."""

from __future__ import annotations

import csv
import shutil

import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.submit import run_submit


def _rows(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_submission_follows_the_test_folder_and_training_spellings(pipeline_run):
    data, run = pipeline_run
    rows = _rows(run / store.SUBMISSION_FILE)
    assert rows[0] == ["sample_index", "label"]
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in (data / "test_data").glob("img_*"))
    with (data / "train_labels.csv").open(newline="") as f:
        spellings = {row["label"] for row in csv.DictReader(f)}
    assert {r[1] for r in rows[1:]} <= spellings
    preds = pq.read_table(run / store.TEST_PREDICTIONS_FILE).to_pydict()
    probs = [[preds[k][i] for k in preds if k.startswith("prob_")] for i in range(len(preds["image_id"]))]
    assert all(abs(sum(p) - 1) < 1e-4 for p in probs)
    assert [max(range(len(p)), key=p.__getitem__) for p in probs] == \
        [[k[5:] for k in preds if k.startswith("prob_")].index(lab) for lab in preds["label"]]


def test_a_test_image_without_features_gets_the_prior_and_is_listed(pipeline_run, pipeline_settings, tmp_path, cli):
    from histoembed.demo import run_pipeline

    data, run = pipeline_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    bad = copy / "test_data" / "img_0003.png"
    bad.write_bytes(bad.read_bytes()[:200])       # header readable, pixels cut: crops skip it, so no features
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    run_pipeline(copy, run_copy, pipeline_settings, stages=("crops", "embed", "fit"))
    result = run_submit(None, run_copy)              # the data folder recorded by crops
    assert result.fallbacks == ["img_0003.png"]
    rows = _rows(run_copy / store.SUBMISSION_FILE)
    assert [r[0] for r in rows[1:]] == [f"img_{i:04d}.png" for i in range(6)]   # still one row per test image
    r = cli("submit", "--run", run_copy)
    assert r.exit_code == 0 and "img_0003.png" in r.output and "prior" in r.output


def test_submit_finds_the_data_in_the_run_and_refuses_changed_files(pipeline_run, tmp_path, cli):
    data, run = pipeline_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)                     # the same files elsewhere: accepted
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    r = cli("submit", "--run", run_copy)             # no --data: the folder crops recorded
    assert r.exit_code == 0, r.output
    assert _rows(run_copy / store.SUBMISSION_FILE) == _rows(run / store.SUBMISSION_FILE)
    r = cli("submit", "--run", run_copy, "--data", copy)
    assert r.exit_code == 0, r.output
    extra = copy / "test_data" / "img_0006.png"      # a file added since the crops were cut
    shutil.copy(copy / "test_data" / "img_0000.png", extra)
    shutil.copy(copy / "test_data" / "mask_0000.png", copy / "test_data" / "mask_0006.png")
    r = cli("submit", "--run", run_copy, "--data", copy)
    assert r.exit_code == 2 and "changed since `histoembed crops`" in r.output and "re-run `histoembed crops`" in r.output


def test_features_of_another_dataset_are_refused(pipeline_run, tmp_path, cli):
    data, run = pipeline_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for p in (copy / "test_data").glob("*_0*.png"):
        p.rename(p.with_name(p.name.replace("_0", "_8")))
    r = cli("submit", "--data", copy, "--run", run)
    assert r.exit_code == 2 and "changed since `histoembed crops`" in r.output


def test_a_run_of_an_older_schema_is_refused(pipeline_run, tmp_path, cli):
    """Files written before (split, name) keys are never joined by name: a clear message says what to re-run."""
    import json

    data, run = pipeline_run
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    crops = run_copy / store.CROPS_FILE
    meta = {k: v for k, v in store.read_meta(crops).items() if k != "schema"}
    table = pq.read_table(crops)
    pq.write_table(table.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), crops)
    r = cli("submit", "--run", run_copy)
    assert r.exit_code == 2
    assert "crops.parquet has file schema 1" in r.output and "re-run `histoembed crops`" in r.output


def test_submit_before_fit_says_what_to_run(tmp_path, cli, pipeline_run):
    data, _ = pipeline_run
    r = cli("submit", "--data", data, "--run", tmp_path)
    assert r.exit_code == 2 and "histoembed fit" in r.output


def test_features_the_models_were_not_fitted_on_are_refused(pipeline_run, tmp_path, cli):
    from histoembed.models.inference import load_ensemble
    from histoembed.synthetic import write_synthetic_features

    data, run = pipeline_run
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    slug = store.find_feature_store(run_copy).name
    write_synthetic_features(run_copy, n_images=24, n_test=6, dim=7, encoder=slug)  # same ids, 7-d
    r = cli("submit", "--data", data, "--run", run_copy)
    assert r.exit_code == 2 and "7-d" in r.output and f"{load_ensemble(run).dim}-d" in r.output

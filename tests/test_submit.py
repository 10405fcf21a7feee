"""`histoembed submit`: one row per test image in folder order, labels as spelled in training."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from histoembed.core import feature_store, store
from histoembed.stages.submit import run_submit


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
    from histoembed.tools.demo import run_pipeline

    data, run = pipeline_run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    bad = copy / "test_data" / "img_0003.png"
    bad.write_bytes(bad.read_bytes()[:200])       # header readable, pixels cut: crops skip it, so no features
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    run_pipeline(copy, run_copy, pipeline_settings, stages=("qc", "crops", "embed", "fit"))  # QC of the new bytes
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
    from synthetic_inputs import write_synthetic_features

    data, run = pipeline_run
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    slug = feature_store.find_feature_store(run_copy).name
    write_synthetic_features(run_copy, n_images=24, n_test=6, dim=7, encoder=slug)  # same ids, 7-d
    r = cli("submit", "--data", data, "--run", run_copy)
    assert r.exit_code == 2 and "7-d" in r.output and f"{load_ensemble(run).dim}-d" in r.output


# ---------------------------------------------------------------- --verify-data (issue 23)

def edit_pixels_in_place(path: Path) -> None:
    """Paint a flat square into a PNG and keep its size and modification time, as an in-place edit through a
    tool that restores times can (`cp -p`, `rsync -t`): the flat square compresses better, and a comment
    chunk pads the file back to its size."""
    before = path.stat()
    original = np.array(Image.open(path))
    pixels = original.copy()
    pixels[:16, :16] = pixels[0, 0] // 2 + 1

    def encode(level: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    png = min(map(encode, range(1, 10)), key=len)
    text = b"Comment\0" + b" " * (before.st_size - len(png) - 12 - len(b"Comment\0"))  # a chunk is 12 + data bytes
    chunk = b"tEXt" + text
    png = png[:-12] + struct.pack(">I", len(text)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[-12:]
    path.write_bytes(png)                             # png[-12:] is the IEND chunk
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not np.array_equal(np.array(Image.open(path)), original)


def point_run_at(run: Path, old: Path, new: Path) -> None:
    """Make ``run``'s crops read as cut from ``new`` (a copy of ``old``, times kept): its cached stamps then
    cover the copy's files, as they would had the crops been cut there."""
    crops = run / store.CROPS_FILE
    meta = store.read_meta(crops)
    was, now = str(old.resolve()), str(new.resolve())
    meta["data"] = now
    meta["content_stamps"] = {k.replace(was, now, 1): v for k, v in meta["content_stamps"].items()}
    pq.write_table(pq.read_table(crops).replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), crops)


def test_an_in_place_edit_that_keeps_size_and_mtime_is_seen_with_verify_data(pipeline_run, tmp_path, cli):
    data, run = pipeline_run
    copy, run_copy = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, copy)                      # copy2: modification times kept
    shutil.copytree(run, run_copy)
    point_run_at(run_copy, data, copy)
    assert cli("submit", "--run", run_copy).exit_code == 0
    edit_pixels_in_place(copy / "test_data" / "img_0002.png")
    r = cli("submit", "--run", run_copy)             # the documented limit: size and mtime unchanged, stamp trusted
    assert r.exit_code == 0, r.output
    for command in (("submit",), ("report",), ("predict", "img_0002.png")):
        r = cli(*command, "--run", run_copy, "--verify-data")
        assert r.exit_code == 2, (command, r.output)
        assert "changed since `histoembed crops` cut crops.parquet" in r.output and str(copy) in r.output
        assert "re-run `histoembed crops`" in r.output

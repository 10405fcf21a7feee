"""The reference challenge's size and naming, end to end, through the command line.

691 training images with the real label counts and 477 test images, both splits named
from ``img_0000.png`` as in the real data, 60 cartoons pasted over other images' masks
and 10 test images that copy training images (``synthetic.reference_scale``). Images are
small (``size_scale``) so the run stays short; the encoder is the tiny Dinov2 stand-in for
Phikon-v2. The README's commands run exactly as written, as processes, in a folder that
holds ``data/``; then again in-process, where every stage must find its inputs and settings unchanged and
give the same submission.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_end_to_end import _python_m, small_settings_toml

from histoembed.core import feature_store, store

pytestmark = pytest.mark.slow

COMMANDS = [["qc"], ["crops"], ["embed", "--repeats", "4"], ["fit", "--folds", "10"], ["submit"]]
SIZE_SCALE = 0.06   # image sides 18-97 px (median 38) instead of ~300-1600
# One thread per process: on tiny tensors (32-d features, 32 px crops) torch's thread pool spins more
# than it works; on the 2-core machine fit used 46 s of CPU with the default threads and 8.5 s with one
# (embed 29 s vs 8.7 s). The commands and their settings are unchanged.
THREADS = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_dinov2) -> Path:
    from histoembed.tools.synthetic import reference_scale

    root = tmp_path_factory.mktemp("fullscale")
    reference_scale(root / "data", seed=0, size_scale=SIZE_SCALE)
    (root / "histoembed.toml").write_text(small_settings_toml(tiny_dinov2, crop_size=32))
    return root


def test_the_readme_commands_on_the_real_layout_give_a_477_row_submission_and_a_rerun_redoes_nothing(project, cli):
    outputs = {}
    for args in COMMANDS:
        done = _python_m(args, project, **THREADS)
        assert done.returncode == 0, f"histoembed {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        outputs[args[0]] = done.stdout + done.stderr
    data, run = project / "data", project / "run"

    # the submission: one row per test image, test_data/'s names in its sorted order, real spellings
    with (run / store.SUBMISSION_FILE).open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample_index", "label"] and len(rows) == 478
    assert [r[0] for r in rows[1:]] == sorted(p.name for p in (data / "test_data").glob("img_*.png")) \
        == [f"img_{i:04d}.png" for i in range(477)]
    real = Path(__file__).parent / "data" / "an2dl-2025-c2-train_labels.csv"
    with real.open(newline="") as f:
        spellings = {row["label"] for row in csv.DictReader(f)}
    assert {r[1] for r in rows[1:]} <= spellings and len({r[1] for r in rows[1:]}) > 1

    # every image of both splits went through QC and (training images QC flagged aside) through crops
    qc = pq.read_table(run / store.QC_FILE).to_pylist()
    assert sum(r["split"] == "train" for r in qc) == 691 and sum(r["split"] == "test" for r in qc) == 477
    crops = pq.read_table(run / store.CROPS_FILE, columns=["image_id", "split"])
    keys = set(zip(crops["split"].to_pylist(), crops["image_id"].to_pylist()))
    assert {k for k in keys if k[0] == "test"} == {("test", f"img_{i:04d}.png") for i in range(477)}
    flagged = {r["image_id"] for r in qc if r["split"] == "train" and r["flagged"]}
    assert {k[1] for k in keys if k[0] == "train"} == {f"img_{i:04d}.png" for i in range(691)} - flagged

    # the planted structure of the real data is found: all 60 mask twins (and no other pair), every test copy
    planted = json.loads((data / "planted.json").read_text())
    twins = {tuple(sorted((r["image_id"], j))) for r in qc for j in r["mask_twin"] or []}
    assert twins == {tuple(sorted(p)) for p in planted["mask_twins"]}
    assert all(cartoon in flagged for cartoon, _ in planted["mask_twins"])
    leaks = {(r["image_id"], r["near_train"]) for r in qc if r["near_train"]}
    assert {tuple(p) for p in planted["near_duplicates"]} <= leaks
    assert "possible leakage" in outputs["qc"] and "Training images sharing a mask file (60 pair(s)" in outputs["qc"]
    assert len(list((run / store.MODELS_DIR).glob("fold-*"))) == 10
    for name in (store.CROPS_FILE, store.QC_FILE, store.OOF_FILE, store.METRICS_FILE,
                 store.CALIBRATION_FILE, store.TEST_PREDICTIONS_FILE):
        assert (run / name).exists(), name
    features = feature_store.read_features(feature_store.find_feature_store(run))
    assert set(features.view.tolist()) == {0, 1, 2, 3}
    with (data / "train_labels.csv").open(newline="") as f:
        assert {r[1] for r in rows[1:]} <= {row["label"] for row in csv.DictReader(f)}

    # Again, in-process: every stage finds its inputs and settings unchanged; same submission.
    before = (run / store.SUBMISSION_FILE).read_bytes()
    parts = feature_store.feature_parts(feature_store.find_feature_store(run))
    features_before = sorted(p.stat().st_mtime_ns for p in parts)
    oof_before = (run / store.OOF_FILE).stat().st_mtime_ns
    for args in COMMANDS:
        result = cli(*args, cwd=project)
        assert result.exit_code == 0, result.output
    assert (run / store.SUBMISSION_FILE).read_bytes() == before
    parts = feature_store.feature_parts(feature_store.find_feature_store(run))
    assert sorted(p.stat().st_mtime_ns for p in parts) == features_before
    assert (run / store.OOF_FILE).stat().st_mtime_ns == oof_before

"""Working with other tools (issue 30) through the command line: `histoembed export` of a slide run as TRIDENT,
STAMP and QuPath GeoJSON, `histoembed import` of the exported files into a new run whose `fit` gives the same
out-of-fold numbers, a file laid out by hand as TRIDENT writes it imported, and a QuPath GeoJSON mask with
`--mask-classes` keeping a slide's patches inside the chosen annotations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import box, shape

from histoembed.core import feature_store, store
from histoembed.tools.synthetic import SlideSpec, make_slide_cohort, write_slide

SETTINGS = """
[crops]
workers = 1
max_patches = 6
[embed]
encoder = "{encoder}"
workers = 0
repeats = 1
tta = false
[fit]
folds = 3
bootstrap = 20
heads = ["abmil", "logreg"]
[fit.abmil]
hidden = 16
attention = 8
epochs = 3
patience = 2
"""


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory, tiny_dinov2) -> Path:
    """A small slide cohort through crops, embed, fit (attention-MIL and a linear probe) and submit."""
    from typer.testing import CliRunner

    from histoembed.cli import app

    root = tmp_path_factory.mktemp("interop")
    make_slide_cohort(root, n=14, seed=4, size=2000, n_test=2)
    (root / "histoembed.toml").write_text(SETTINGS.format(encoder=tiny_dinov2))
    runner = CliRunner()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for args in (["crops", "--data", "manifest.csv"], ["embed"], ["fit"], ["submit"]):
            r = runner.invoke(app, args, catch_exceptions=False)
            assert r.exit_code == 0, (args, r.output)
    return root


def _oof(run: Path) -> tuple[float, np.ndarray]:
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    probs = np.asarray(pq.read_table(run / store.OOF_FILE, columns=["prob"])["prob"].to_pylist())
    return metrics["heads"]["fused"]["macro_f1"], probs


def test_export_import_round_trip_gives_the_same_out_of_fold_numbers(slide_run, cli):
    run, out = slide_run / "run", slide_run / "exported"
    r = cli("export", "--run", run, "--format", "trident", "--out", out, cwd=slide_run)
    assert r.exit_code == 0, r.output
    crops = pq.read_table(run / store.CROPS_FILE).to_pandas()
    features = feature_store.read_features(feature_store.find_feature_store(run))
    files = sorted(out.rglob("*.h5"))
    assert len(files) == crops["image_id"].nunique() == 14
    folder = files[0].parent
    assert folder.parent.name == "20x_224px_0px_overlap" and folder.name.startswith("features_")
    for path in files:
        rows = crops[crops["source"].map(lambda s: Path(s).stem) == path.stem].sort_values("crop_index")
        split, image_id = rows["split"].iloc[0], rows["image_id"].iloc[0]
        mine = (features.image_id == image_id) & (features.split == split) & (features.view == 0)
        with h5py.File(path, "r") as f:   # what TRIDENT's own loaders read
            assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
            np.testing.assert_array_equal(f["features"][:], features.embedding[mine])
            np.testing.assert_array_equal(f["coords"][:], rows[["x0", "y0"]].to_numpy())
            a = f["coords"].attrs
            assert a["patch_size"] == 224 and a["patch_size_level0"] == 448 and a["target_magnification"] == 20
            assert a["level0_magnification"] == 40 and a["name"] == path.stem
            with openslide.OpenSlide(rows["source"].iloc[0]) as s:
                assert (a["level0_width"], a["level0_height"]) == s.dimensions
    again = cli("export", "--run", run, "--format", "trident", "--out", out, cwd=slide_run)
    assert "0 trident file(s) written, 14 unchanged" in again.output
    r = cli("export", "--run", run, "--format", "trident", "--out", slide_run / "views", "--all-views", cwd=slide_run)
    assert r.exit_code == 0 and len(list((slide_run / "views" / "view-0").rglob("*.h5"))) == 14  # repeats 1

    r = cli("export", "--run", run, "--format", "stamp", "--out", slide_run / "stamp", cwd=slide_run)
    assert r.exit_code == 0, r.output
    with h5py.File(sorted((slide_run / "stamp").rglob("*.h5"))[0], "r") as f:
        assert f.attrs["unit"] == "um" and f.attrs["tile_size_px"] == 224
        assert f.attrs["tile_size_um"] == pytest.approx(448 * 0.25)
        first = crops[crops["source"].map(lambda s: Path(s).stem) == "slide_000"].sort_values("crop_index")
        np.testing.assert_allclose(f["coords"][:], first[["x0", "y0"]].to_numpy() * 0.25)

    stamp_run = slide_run / "from-stamp"   # micrometres back to the same level-0 boxes and features
    r = cli("import", next((slide_run / "stamp").iterdir()), "--data", "manifest.csv", "--run", stamp_run,
            cwd=slide_run)
    assert r.exit_code == 0, r.output
    back = pq.read_table(stamp_run / store.CROPS_FILE).to_pandas()
    cols = ["split", "image_id", "crop_index", "x0", "y0", "x1", "y1", "level", "mpp"]
    assert back[cols].sort_values(cols[:3]).reset_index(drop=True).equals(
        crops[cols].sort_values(cols[:3]).reset_index(drop=True))
    np.testing.assert_array_equal(feature_store.read_features(feature_store.find_feature_store(stamp_run)).embedding,
                                  features.embedding[features.view == 0])

    r = cli("export", "--run", run, "--format", "trident", "--out", slide_run / "v1", "--view", 1, cwd=slide_run)
    assert r.exit_code == 2 and "holds views 0, not view 1" in r.output
    r = cli("import", folder, "--data", "manifest.csv", "--run", run, cwd=slide_run)
    assert r.exit_code == 2 and "already holds crops cut by `histoembed crops`" in r.output

    new = slide_run / "imported"
    r = cli("import", folder, "--data", "manifest.csv", "--run", new, cwd=slide_run)
    assert r.exit_code == 0, r.output
    assert f"{len(crops)} patches of 14 slides" in r.output
    assert "up to date" in cli("import", folder, "--data", "manifest.csv", "--run", new, cwd=slide_run).output
    r = cli("fit", "--run", new, cwd=slide_run)
    assert r.exit_code == 0, r.output
    (f1_a, probs_a), (f1_b, probs_b) = _oof(run), _oof(new)
    assert f1_b == pytest.approx(f1_a, abs=1e-12)
    np.testing.assert_allclose(probs_b, probs_a, atol=1e-6)
    r = cli("submit", "--run", new, cwd=slide_run)
    assert r.exit_code == 0, r.output
    assert (new / store.SUBMISSION_FILE).read_text() == (run / store.SUBMISSION_FILE).read_text()
    r = cli("compare", run, new, "--bootstrap", 50, cwd=slide_run)
    assert r.exit_code == 0 and "B - A = +0.000" in r.output, r.output
    r = cli("report", "--run", new, cwd=slide_run)
    assert r.exit_code == 0, r.output
    assert "attention-MIL head&#x27;s weight on each patch" in (new / store.REPORT_FILE).read_text() or \
        "attention-MIL head's weight on each patch" in (new / store.REPORT_FILE).read_text()  # heat maps drawn


def test_geojson_export_holds_valid_polygons_and_attention_on_every_patch(slide_run, cli):
    run, out = slide_run / "run", slide_run / "qupath"
    r = cli("export", "--run", run, "--format", "geojson", "--out", out, cwd=slide_run)
    assert r.exit_code == 0, r.output
    crops = pq.read_table(run / store.CROPS_FILE, columns=["image_id", "split", "source"]).to_pandas()
    files = sorted(out.glob("*.geojson"))
    assert len(files) == 14
    for path in files:
        doc = json.loads(path.read_text())
        detections = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
        tissue = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
        assert tissue and len(detections) == int((crops["source"].map(lambda s: Path(s).stem) == path.stem).sum())
        for feature in doc["features"]:
            g = shape(feature["geometry"])
            assert g.geom_type == "Polygon" and g.is_valid and g.area > 0
        weights = [f["properties"]["measurements"]["Attention abmil"] for f in detections]
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)  # a share of the slide's bag
        probability = "OOF probability" if path.stem < "slide_012" else "Predicted probability"
        assert any(k.startswith(probability) for k in detections[0]["properties"]["measurements"])
    assert "14 unchanged" in cli("export", "--run", run, "--format", "geojson", "--out", out, cwd=slide_run).output
    r = cli("export", "--run", run, "--format", "geojson", "--out", out, "--view", 1, cwd=slide_run)
    assert r.exit_code == 2 and "--view" in r.output


def test_a_file_laid_out_by_hand_as_trident_writes_it_imports(tmp_path, cli):
    """Not our exporter: datasets chunked one row at a time, TRIDENT's attributes only, the encoder in the folder."""
    write_slide(tmp_path / "case_1.svs", SlideSpec(1, 1600, 1200, "malignant"), "svs")
    write_slide(tmp_path / "case_2.svs", SlideSpec(2, 1600, 1200, "benign"), "svs")
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "label", "split"], ["case_1.svs", "", "malignant", "train"],
                                 ["case_2.svs", "", "benign", "train"], ["case_3.svs", "", "benign", "test"]])
    write_slide(tmp_path / "case_3.svs", SlideSpec(3, 1600, 1200, "benign"), "svs")
    folder = tmp_path / "20x_256px_0px_overlap" / "features_conch_v15"
    folder.mkdir(parents=True)
    corners = np.array([[0, 0], [512, 0], [512, 512]], np.int64)
    for i, name in enumerate(["case_1", "case_2", "stray"]):
        with h5py.File(folder / f"{name}.h5", "w") as f:
            feats = np.random.default_rng(i).normal(size=(3, 8)).astype(np.float32)
            for key, data in (("features", feats), ("coords", corners)):
                d = f.create_dataset(key, shape=data.shape, maxshape=(None, *data.shape[1:]),
                                     chunks=(1, *data.shape[1:]), dtype=data.dtype)
                d[:] = data
            f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                      "target_magnification": 20, "overlap": 0, "name": name,
                                      "level0_width": 1600, "level0_height": 1200, "savetodir": str(folder)})
    r = cli("import", folder, "--data", tmp_path / "manifest.csv", "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "case_3.svs" in r.output and "stray.h5" in r.output   # both kinds of unmatched listed
    crops = pq.read_table(tmp_path / "run" / store.CROPS_FILE).to_pylist()
    assert [(c["image_id"], c["x0"], c["x1"], c["level"], c["mpp"]) for c in crops[:3]] == \
        [("case_1.svs", 0, 512, 0, 0.5), ("case_1.svs", 512, 1024, 0, 0.5), ("case_1.svs", 512, 1024, 0, 0.5)]
    features = feature_store.read_features(tmp_path / "run" / "features" / "conch_v15")
    assert features.meta["encoder"] == "conch_v15" and features.embedding.shape == (6, 8)
    feature_store.check_complete(features, tmp_path / "run", "train")
    with h5py.File(folder / "case_2.h5", "r+") as f:   # a changed file: its slide's patches are new ones
        f["features"][0] = 0.0
    r = cli("import", folder, "--data", tmp_path / "manifest.csv", "--run", tmp_path / "run")
    assert r.exit_code == 0 and "up to date" not in r.output
    changed = pq.read_table(tmp_path / "run" / store.CROPS_FILE).to_pylist()
    assert [c["patch_digest"] for c in changed[:3]] == [c["patch_digest"] for c in crops[:3]]
    assert all(a["patch_digest"] != b["patch_digest"] for a, b in zip(changed[3:], crops[3:]))
    assert not feature_store.read_features(tmp_path / "run" / "features" / "conch_v15").embedding[3].any()
    r = cli("import", folder, "--data", tmp_path / "manifest.csv", "--run", tmp_path / "run", "--encoder", "uni")
    assert r.exit_code == 0   # a name given over the folder's: another store
    assert (tmp_path / "run" / "features" / "uni").is_dir()


def test_mask_classes_keep_patches_inside_the_chosen_annotations(tmp_path, cli):
    write_slide(tmp_path / "s.svs", SlideSpec(1, 1600, 1200, "malignant"), "svs")
    write_slide(tmp_path / "t.svs", SlideSpec(2, 1600, 1200, "benign"), "svs")
    tumour = [[[0, 0], [800, 0], [800, 1200], [0, 1200], [0, 0]]]
    stroma = [[[800, 0], [1600, 0], [1600, 1200], [800, 1200], [800, 0]]]
    (tmp_path / "s.geojson").write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": ring},
         "properties": {"objectType": "annotation", "classification": {"name": name}}}
        for name, ring in (("Tumor", tumour), ("Stroma", stroma))]))
    with (tmp_path / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "label", "split"], ["s.svs", "s.geojson", "malignant", "train"],
                                 ["t.svs", "", "benign", "train"]])
    common = ("crops", "--data", tmp_path / "manifest.csv", "--size", 32, "--mpp", 0.5, "--min-tissue", 0.9,
              "--workers", 1)
    r = cli(*common, "--run", tmp_path / "tumour", "--mask-classes", "tumor")
    assert r.exit_code == 0, r.output
    t = pq.read_table(tmp_path / "tumour" / store.CROPS_FILE).to_pandas()
    s = t[t["image_id"] == "s.svs"]
    patches = shapely.box(*s[["x0", "y0", "x1", "y1"]].to_numpy().T)
    assert len(s) and shapely.covers(box(0, 0, 800 + 32, 1200), patches).all()  # a thumbnail pixel of slack
    r = cli(*common, "--run", tmp_path / "both")
    both = pq.read_table(tmp_path / "both" / store.CROPS_FILE).to_pandas()
    assert (both.loc[both["image_id"] == "s.svs", "x0"] > 800).any()   # without the option: both classes
    r = cli(*common, "--run", tmp_path / "none", "--mask-classes", "Necrosis")
    assert "s.geojson" in r.output and "Necrosis" in r.output   # the slide skipped, its mask named

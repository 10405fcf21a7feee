"""Features and annotations in the field's formats (issue 30): TRIDENT, CLAM and STAMP feature files and QuPath
GeoJSON, read back with the readers the other tools use (h5py with TRIDENT's and STAMP's own expectations,
shapely for every polygon), files the tests write themselves in the tools' layouts, and every bad file a
UserError that names it."""

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

from histoembed.core import store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs.cropping import slide_patches
from histoembed.inputs.dataset import load_dataset
from histoembed.inputs.exchange import geojson, geojson_out, stamp, trident
from histoembed.inputs.exchange.folder import read_feature_file, read_feature_folder
from histoembed.inputs.exchange.record import Patching
from histoembed.inputs.exchange.rows import patch_level, slide_rows
from histoembed.tools.synthetic import SlideSpec, write_slide

PATCHING = Patching("slide_a", patch_size=256, mpp=0.5, level0_mpp=0.25, level0_size=(10_000, 8_000))
BOXES = np.array([[0, 0, 512, 512], [512, 0, 1024, 512], [1024, 512, 1536, 1024], [9_600, 7_600, 10_112, 8_112]])
TRIDENT_COORDS_ATTRS = {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
                        "level0_width", "level0_height", "name", "savetodir"}


def features(n: int = len(BOXES), dim: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def trident_by_hand(path: Path, corners, feats, attrs: dict | None = None, features_attrs: dict | None = None) -> Path:
    """A file laid out as TRIDENT's own save_h5 writes it (resizable datasets chunked one row at a time), without
    our writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for name, data in (("features", np.asarray(feats)), ("coords", np.asarray(corners, np.int64))):
            d = f.create_dataset(name, shape=data.shape, maxshape=(None, *data.shape[1:]),
                                 chunks=(1, *data.shape[1:]), dtype=data.dtype)
            d[:] = data
        for k, v in (attrs or {}).items():
            f["coords"].attrs[k] = v
        for k, v in (features_attrs or {}).items():
            f["features"].attrs[k] = v
    return path


# ---------------------------------------------------------------- TRIDENT and CLAM

def test_trident_files_hold_what_tridents_loader_reads_and_read_back_exactly(tmp_path):
    feats = features()
    path = trident.feature_path(tmp_path, PATCHING, "owkin/phikon-v2")
    assert path == tmp_path / "20x_256px_0px_overlap" / "features_owkin--phikon-v2" / "slide_a.h5"
    trident.write_trident(path, feats, BOXES, PATCHING, "owkin/phikon-v2")
    assert [p.name for p in path.parent.iterdir()] == ["slide_a.h5"]  # written under a temporary name, renamed

    with h5py.File(path, "r") as f:  # what TRIDENT's read_coords and extract_slide_features take
        assert set(f.keys()) == {"features", "coords"}
        assert f["features"].dtype == np.float32 and f["features"].shape == feats.shape
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(BOXES), 2)
        attrs = dict(f["coords"].attrs)
        assert TRIDENT_COORDS_ATTRS <= set(attrs)
        assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"],
                attrs["level0_magnification"], attrs["overlap"]) == (256, 512, 20, 40, 0)
        assert (attrs["level0_width"], attrs["level0_height"], attrs["name"]) == (10_000, 8_000, "slide_a")
        # TRIDENT's patcher works out the level-0 patch from the magnifications: it must match the boxes
        assert round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]) == 512
        assert f["features"].attrs["encoder"] == "owkin/phikon-v2" and f["features"].attrs["name"] == "slide_a"
        np.testing.assert_array_equal(f["coords"][:], BOXES[:, :2])
        np.testing.assert_array_equal(f["features"][:], feats)

    r = read_feature_file(path)
    assert (r.kind, r.slide, r.encoder, r.dim, r.patch_size_level0, r.patch_size) == \
        ("trident", "slide_a", "owkin/phikon-v2", 12, 512, 256)
    assert (r.mpp, r.level0_mpp, r.level0_size, r.magnification) == (0.5, 0.25, (10_000, 8_000), 20.0)
    np.testing.assert_array_equal(r.boxes, BOXES)
    np.testing.assert_array_equal(r.features, feats)


def test_files_written_in_tridents_and_clams_layouts_read_back(tmp_path):
    """Not our writer: TRIDENT's layout (the encoder named by the folder only, magnifications as TRIDENT writes
    them), CLAM's patching attributes, and CLAM's bare feature files (the patch side from the grid's step)."""
    corners = np.array([[1000, 2000], [1512, 2000], [1000, 2512]])
    folder = tmp_path / "20x_256px_0px_overlap" / "features_uni_v1"
    attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20,
             "overlap": 0, "name": "s1", "savetodir": "x", "level0_width": 20_000, "level0_height": 15_000}
    for i, name in enumerate(("s1", "s2")):
        trident_by_hand(folder / f"{name}.h5", corners, features(3, 1024, i), {**attrs, "name": name},
                        {"name": name, "savetodir": str(folder)})
    records = read_feature_folder(folder)
    assert [r.slide for r in records] == ["s1", "s2"] and records[0].features is None
    r = read_feature_file(folder / "s2.h5")
    assert (r.kind, r.encoder, r.encoder_in_file, r.mpp, r.patch_size_level0) == ("trident", "uni_v1", "uni_v1",
                                                                                     0.5, 512)
    np.testing.assert_array_equal(r.boxes, np.concatenate([corners, corners + 512], axis=1))
    np.testing.assert_array_equal(r.features, features(3, 1024, 1))

    no_level0 = {k: v for k, v in attrs.items() if k != "patch_size_level0"}  # older TRIDENT: from magnifications
    old = read_feature_file(trident_by_hand(tmp_path / "old.h5", corners, features(3), no_level0), encoder="uni")
    assert old.patch_size_level0 == 512 and old.inferred and old.encoder == "uni"

    clam = trident_by_hand(tmp_path / "clam.h5", corners, features(3),
                           {"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0], "custom_downsample": 1})
    r = read_feature_file(clam, encoder="resnet50_trunc")
    assert (r.kind, r.patch_size_level0, r.patch_size, r.mpp) == ("clam", 512, 256, None)
    bare = read_feature_file(trident_by_hand(tmp_path / "bare.h5", corners, features(3)))
    assert (bare.kind, bare.patch_size_level0, bare.encoder) == ("clam", 512, None) and "grid" in bare.inferred


# ---------------------------------------------------------------- STAMP

def test_stamp_files_keep_micrometres_and_round_trip(tmp_path):
    feats = features()
    path = stamp.feature_path(tmp_path, PATCHING, "uni2")
    assert path == tmp_path / "uni2" / "slide_a.h5"
    stamp.write_stamp(path, feats, BOXES, PATCHING, "uni2")
    with h5py.File(path, "r") as f:  # what STAMP's get_coords and BagDataset read
        assert set(f.keys()) == {"feats", "coords"}
        assert dict(f.attrs)["unit"] == "um" and f.attrs["feat_type"] == "tile" and f.attrs["extractor"] == "uni2"
        assert (f.attrs["tile_size_um"], f.attrs["tile_size_px"]) == (128.0, 256)  # 512 level-0 px at 0.25 um
        np.testing.assert_allclose(f["coords"][:], BOXES[:, :2] * 0.25)
        np.testing.assert_array_equal(f["feats"][:], feats)
    r = read_feature_file(path)
    assert (r.kind, r.encoder, r.patch_size, r.mpp, r.patch_size_level0) == ("stamp", "uni2", 256, 0.5, 512)
    np.testing.assert_array_equal(r.boxes, BOXES)
    np.testing.assert_array_equal(r.features, feats)

    # STAMP's own file (float16 features, no level-0 resolution): micrometres need the slide's microns per pixel
    made = tmp_path / "stamp" / "s.h5"
    made.parent.mkdir()
    with h5py.File(made, "w") as f:
        f["coords"] = np.array([[0.0, 0.0], [112.0, 0.0]], np.float32)
        f["feats"] = features(2).astype(np.float16)
        f.attrs.update({"extractor": "ctranspath", "unit": "um", "tile_size_um": 112.0, "tile_size_px": 224,
                        "feat_type": "tile", "stamp_version": "2.5.0"})
    with pytest.raises(UserError, match="microns per pixel") as e:
        read_feature_file(made)
    assert e.value.path == made
    r = read_feature_file(made, level0_mpp=0.5)
    np.testing.assert_array_equal(r.boxes, [[0, 0, 224, 224], [224, 0, 448, 224]])
    assert r.features.dtype == np.float32 and r.mpp == 0.5


# ---------------------------------------------------------------- bad feature files

def _corrupt(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.h5"
    corners, feats = BOXES[:, :2], features()
    attrs = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20,
             "level0_width": 10_000, "level0_height": 8_000}
    if case == "not-hdf5":
        path.write_text("features,coords\n1,2\n")
    elif case == "no-coords":
        with h5py.File(path, "w") as f:
            f["features"] = feats
    elif case == "no-features":
        with h5py.File(path, "w") as f:
            f["coords"] = corners
    elif case == "lengths":
        trident_by_hand(path, corners[:3], feats, attrs)
    elif case == "nan":
        feats[2, 5] = np.nan
        trident_by_hand(path, corners, feats, attrs)
    elif case == "slide-level":
        with h5py.File(path, "w") as f:
            f["coords"], f["features"] = corners, feats[0]
    elif case == "off-slide":
        trident_by_hand(path, corners, feats, {**attrs, "level0_width": 5_000})
    elif case == "stamp-patient":
        with h5py.File(path, "w") as f:
            f["coords"], f["feats"] = np.zeros((1, 2)), feats[:1]
            f.attrs.update({"feat_type": "patient", "tile_size_um": 1.0})
    return path


@pytest.mark.parametrize(("case", "says"), [
    ("not-hdf5", "not a readable HDF5 file"), ("no-coords", "no dataset 'coords'"),
    ("no-features", "no dataset 'features'"), ("lengths", "has 4 rows but 'coords' has 3"),
    ("nan", "not finite"), ("slide-level", r"not \(patches, dimension\)"), ("off-slide", "outside the 5000x8000 slide"),
    ("stamp-patient", "patient-level features"),
])
def test_bad_feature_files_are_user_errors_naming_the_file(tmp_path, case, says):
    path = _corrupt(tmp_path, case)
    with pytest.raises(UserError, match=says) as e:
        read_feature_file(path, encoder="x")
    assert e.value.path == path and str(path) in str(e.value)


def test_a_folder_of_mixed_encoders_dimensions_or_patch_sizes_is_refused(tmp_path):
    def folder(name: str, *files: tuple[str, int, Patching]) -> Path:
        for encoder, dim, p in files:
            trident.write_trident(tmp_path / name / f"{p.slide}.h5", features(len(BOXES), dim), BOXES, p, encoder)
        return tmp_path / name

    b, b40 = (Patching(n, 256, 0.5, 0.25, (10_000, 8_000)) for n in ("b", "b40"))
    b10 = Patching("b10", 256, 1.0, 0.25, (10_000, 8_000))
    ok = folder("ok", ("uni", 8, PATCHING), ("uni", 8, b))
    assert len(read_feature_folder(ok)) == 2
    for name, files, says in (("enc", [("uni", 8, PATCHING), ("conch", 8, b)], "mix encoders"),
                              ("dim", [("uni", 8, PATCHING), ("uni", 16, b40)], "mix feature dimensions"),
                              ("mag", [("uni", 8, PATCHING), ("uni", 8, b10)], "mix patch scales")):
        with pytest.raises(UserError, match=says) as e:
            read_feature_folder(folder(name, *files))
        assert e.value.path == tmp_path / name and "slide_a.h5" in str(e.value)
    with pytest.raises(UserError, match="no .h5 feature file") as e:
        read_feature_folder(tmp_path)
    assert "ok" in str(e.value)  # the sub-folders that hold files are listed


# ---------------------------------------------------------------- QuPath GeoJSON

def test_geojson_out_holds_valid_polygons_with_holes_and_patch_measurements(tmp_path):
    mask = np.zeros((60, 80), bool)
    mask[10:40, 10:50] = True
    mask[20:30, 20:30] = False          # a hole
    mask[22:26, 22:26] = True           # an island in the hole
    mask[33, 33] = False                # a second hole, one pixel
    mask[50, 70] = True                 # a region of one pixel
    slide = (8_000, 6_000)
    objects = geojson_out.tissue_annotations(mask, slide, "s") + geojson_out.patch_detections(
        BOXES[:2], {"attention": [0.25, float("nan")], "p(tumour)": [0.9, 0.1]}, ["tumour", "normal"],
        {"tumour": (200, 0, 0)}, slide="s")
    path = geojson_out.write_geojson(tmp_path / "s.geojson", objects)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    tissue = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    patches = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    polygons = [shape(f["geometry"]) for f in tissue]
    assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons) and len(polygons) == 3
    assert sorted(len(p.interiors) for p in polygons) == [0, 0, 2]
    assert tissue[0]["properties"]["classification"] == {"name": "Tissue", "color": [0, 150, 0]}
    assert patches[0]["properties"]["measurements"] == {"attention": 0.25, "p(tumour)": 0.9}
    assert patches[1]["properties"]["measurements"] == {"p(tumour)": 0.1}  # NaN left out: JSON has none
    assert patches[0]["properties"]["classification"]["color"] == [200, 0, 0]
    assert shape(patches[0]["geometry"]).equals(box(0, 0, 512, 512))
    # the polygons cover exactly the mask's pixels: read back at the same size, the mask comes back
    np.testing.assert_array_equal(geojson.geojson_mask(path, slide, mask.shape), mask)
    assert geojson_out.write_geojson(tmp_path / "again.geojson", geojson_out.tissue_annotations(mask, slide, "s")
                                     + geojson_out.patch_detections(BOXES[:2], slide="s")).exists()
    assert json.loads((tmp_path / "again.geojson").read_text())["features"][0]["id"] == doc["features"][0]["id"]


def qupath_export(path: Path, objects: list[tuple[str, str, list]]) -> Path:
    """QuPath's default 'Export objects as GeoJSON': a bare array of features, classes with colours."""
    path.write_text(json.dumps([
        {"type": "Feature", "id": str(i), "geometry": {"type": "Polygon", "coordinates": rings},
         "properties": {"objectType": kind, **({"classification": {"name": name, "color": [255, 0, 0]}}
                                              if name else {})}}
        for i, (kind, name, rings) in enumerate(objects)]))
    return path


SQUARE = [[[1000, 1000], [3000, 1000], [3000, 3000], [1000, 3000], [1000, 1000]],
          [[1500, 1500], [2500, 1500], [2500, 2500], [1500, 2500], [1500, 1500]]]
STROMA = [[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]


def test_a_geojson_mask_rasterises_to_the_known_square_and_keeps_the_classes_asked(tmp_path):
    path = qupath_export(tmp_path / "m.geojson", [("annotation", "Tumor", SQUARE), ("annotation", "Stroma", STROMA),
                                                  ("detection", "Necrotic", [[[0, 0], [900, 0], [0, 900], [0, 0]]])])
    slide, thumb = (10_000, 8_000), (80, 100)  # 100 level-0 px per thumbnail pixel
    expected = np.zeros(thumb, bool)
    expected[10:30, 10:30] = True
    expected[15:25, 15:25] = False  # the hole
    np.testing.assert_array_equal(geojson.geojson_mask(path, slide, thumb, ["tumor"]), expected)
    everything = geojson.geojson_mask(path, slide, thumb)
    assert everything[expected].all() and everything[52, 57] and not everything[5, 5]  # detections never count
    with pytest.raises(UserError, match="no polygon annotation of class Necrosis") as e:
        geojson.geojson_mask(path, slide, thumb, ["Necrosis"])
    assert e.value.path == path and "class(es): Stroma, Tumor" in str(e.value)  # annotations' classes only


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "not valid JSON"), ('{"answer": 42}', "not a GeoJSON"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},'
     ' "geometry": {"type": "Point", "coordinates": [1, 2]}}]}', "no polygon annotation"),
    ('{"type": "Polygon", "coordinates": [[[20000, 20000], [21000, 20000], [21000, 21000], [20000, 20000]]]}',
     "lies outside the 10000x8000 slide"),
    ('[{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": 7}}]',
     "geometry that cannot be read"),
])
def test_bad_geojson_masks_are_user_errors_naming_the_file(tmp_path, text, says):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(UserError, match=says) as e:
        geojson.geojson_mask(path, (10_000, 8_000), (80, 100))
    assert e.value.path == path


def test_a_self_crossing_annotation_is_repaired_not_refused(tmp_path):
    bow_tie = [[[0, 0], [1000, 1000], [1000, 0], [0, 1000], [0, 0]]]
    path = qupath_export(tmp_path / "m.geojson", [("annotation", None, bow_tie)])
    polygons = geojson.read_polygons(path)
    assert all(p.is_valid for p in polygons) and shapely.union_all(polygons).area == pytest.approx(500_000)


@pytest.fixture(scope="module")
def slide_with_geojson_mask(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("geojson-slide")
    write_slide(root / "s.svs", SlideSpec(1, 1600, 1200, "malignant"), "svs")
    # the left half of the slide, with a hole: level-0 pixels as QuPath exports them
    qupath_export(root / "s.geojson", [("annotation", "Tumor", [[[0, 0], [800, 0], [800, 1200], [0, 1200], [0, 0]],
                                                                [[200, 300], [600, 300], [600, 900], [200, 900],
                                                                 [200, 300]]])])
    with (root / "manifest.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image", "mask", "label", "split"], ["s.svs", "s.geojson", "malignant", "train"]])
    return root


def test_a_slides_geojson_mask_keeps_its_patches_inside_the_polygon(slide_with_geojson_mask):
    ds = load_dataset(slide_with_geojson_mask / "manifest.csv")
    (sample,) = ds.samples
    settings = CropSettings(size=32, mpp=0.5, min_tissue=0.9)
    boxes, _, _ = slide_patches(sample, settings)
    region = box(0, 0, 800, 1200).difference(box(200, 300, 600, 900))
    centres = shapely.points([((x0 + x1) / 2, (y0 + y1) / 2) for (x0, y0, x1, y1), _ in boxes])
    assert boxes and shapely.contains(region, centres).all()  # the thumbnail's pixel (32 level-0 px) aside
    assert any(b[1] > 900 for b, _ in boxes) and any(b[3] < 300 for b, _ in boxes)  # both sides of the hole
    by_colour, _, _ = slide_patches(sample, settings.model_copy(update={"mask_mode": "tissue"}))
    assert not shapely.contains(region, shapely.points([b[:2] for b, _ in by_colour])).all()  # the mask did it


def test_a_read_feature_file_becomes_the_slides_rows_of_the_crops_file(slide_with_geojson_mask, tmp_path):
    """The sketch ``histoembed import`` builds on: crop i is feature row i, boxes and scale from the file."""
    (sample,) = load_dataset(slide_with_geojson_mask / "manifest.csv").samples
    p = Patching("s", patch_size=32, mpp=1.0, level0_mpp=0.25, level0_size=(1600, 1200))
    boxes = np.array([[0, 0, 128, 128], [128, 0, 256, 128], [640, 1024, 768, 1152]])
    record = read_feature_file(trident.write_trident(trident.feature_path(tmp_path, p, "uni"), features(3), boxes,
                                                     p, "uni"))
    with openslide.OpenSlide(str(sample.image)) as s:
        level = patch_level(s.level_downsamples, record.patch_size_level0, record.patch_size)
        assert level == s.get_best_level_for_downsample(128 / 32) == 1
    table = slide_rows(record, sample, level=level, level0_mpp=0.25, stamp="slide+file")
    assert table.schema.equals(store.crops_schema(slides=True, groups=False))
    rows = table.to_pylist()
    assert [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in rows] == [tuple(b) for b in boxes.tolist()]
    assert {(r["image_id"], r["split"], r["label"], r["level"], r["mpp"], r["strategy"]) for r in rows} == \
        {("s.svs", "train", "malignant", 1, 1.0, "import-trident")}
    assert [r["crop_index"] for r in rows] == [0, 1, 2] and len({r["patch_digest"] for r in rows}) == 3
    pq.write_table(table, tmp_path / "crops.parquet")
    assert store.crop_hashes(tmp_path / "crops.parquet") == [r["patch_digest"] for r in rows]
    other = slide_rows(record, sample, level=level, level0_mpp=0.25, stamp="slide+changed file")
    assert other["patch_digest"].to_pylist() != table["patch_digest"].to_pylist()  # a changed file is stale

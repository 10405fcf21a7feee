"""The crops stage: the blob recipe against an independent implementation, every strategy and
option through the CLI, fallbacks, QC integration, skip-if-unchanged and atomic output."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label as sk_label
from skimage.measure import regionprops

from histoembed.stages import crops as crops_mod
from histoembed.core import store
from histoembed.core.config import MEAN_FILL, CropSettings
from histoembed.inputs.cropping import components, crop_image, grow_box, otsu_binarise, square_crop, tile_starts
from histoembed.inputs.pixels import tissue_mask_by_colour

PINK = (220, 130, 190)


def pink_image(h: int, w: int, seed: int = 0, white_from: int | None = None) -> np.ndarray:
    """Pink tissue with a little noise; columns from ``white_from`` on are white slide."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = PINK
    rgb = np.clip(rgb.astype(int) + rng.integers(-6, 7, rgb.shape), 0, 255).astype(np.uint8)
    if white_from is not None:
        rgb[:, white_from:] = 248
    return rgb


def write_data(root: Path, images: dict[str, tuple[np.ndarray, np.ndarray]],
               test: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """The reference layout: ``images`` {name: (rgb, mask)} in train_data, ``test`` in test_data.

    Both splits number from img_0000.png, as in the real challenge.
    """
    rows = ["sample_index,label"]
    for split, items in (("train", images), ("test", test or {})):
        (root / f"{split}_data").mkdir(parents=True, exist_ok=True)
        for i, (image_id, (rgb, mask)) in enumerate(items.items()):
            Image.fromarray(rgb).save(root / f"{split}_data" / image_id)
            Image.fromarray(mask).save(root / f"{split}_data" / image_id.replace("img_", "mask_"))
            if split == "train":
                rows.append(f"{image_id},{('Luminal A', 'HER2(+)')[i % 2]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def read_crops(run: Path) -> list[dict]:
    return pq.read_table(run / store.CROPS_FILE).to_pylist()


def boxes_of(rows: list[dict], image_id: str, split: str = "train") -> list[tuple[int, int, int, int]]:
    return [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in sorted(rows, key=lambda r: r["crop_index"])
            if r["image_id"] == image_id and r["split"] == split]


def keys_of(rows: list[dict]) -> set[tuple[str, str]]:
    return {(r["split"], r["image_id"]) for r in rows}


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ---------------------------------------------------------------- masks with known components

def known_mask(seed: int, h: int = 160, w: int = 200) -> np.ndarray:
    """Rectangles and ellipses of distinct sizes, two shapes touching only at a corner (one
    8-connected component), a speck below 100 px, and faint gray noise Otsu must drop."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint8)
    m[rng.random((h, w)) < 0.02] = 30                      # faint noise, below Otsu's cut
    x, y = int(rng.integers(5, 20)), int(rng.integers(5, 20))
    m[y:y + 30, x:x + 40] = 255                            # 1200 px
    m[y + 30:y + 45, x + 40:x + 55] = 255                  # touches the first at one corner only
    cv2.ellipse(m, (int(rng.integers(120, 150)), int(rng.integers(40, 60))), (25, 15), 30, 0, 360, 200, -1)
    m[110:130, 20:31] = 220                                # 220 px
    m[120:128, 150:160] = 255                              # 80 px: below min_area
    for i in range(6):                                     # small squares of 100+ px, distinct sizes
        s = 10 + i
        m[140:140 + s if 140 + s < h else h, 40 + i * 25: 40 + i * 25 + s] = 180
    return m


def independent_blobs(mask: np.ndarray, k: int, min_area: int, margin: float) -> list[tuple[int, int, int, int]]:
    """The recipe with scikit-image: Otsu, 8-connected labels, top-k by area, margin, clip."""
    binary = mask > threshold_otsu(mask)
    regions = [r for r in regionprops(sk_label(binary, connectivity=2)) if r.area >= min_area]
    regions.sort(key=lambda r: (-r.area, r.bbox[0], r.bbox[1]))
    h, w = mask.shape
    out = []
    for r in regions[:k]:
        r0, c0, r1, c1 = r.bbox
        bw, bh = c1 - c0, r1 - r0
        out.append((max(0, math.floor(c0 - margin * bw)), max(0, math.floor(r0 - margin * bh)),
                    min(w, math.ceil(c1 + margin * bw)), min(h, math.ceil(r1 + margin * bh))))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_components_match_scikit_image(seed):
    mask = known_mask(seed)
    binary = otsu_binarise(mask)
    assert not binary[mask == 30].any() and binary[mask >= 180].all()
    ours = [c.box for c in components(binary, k=100, min_area=100)]
    theirs = independent_blobs(mask, k=100, min_area=100, margin=0.0)
    assert ours == theirs
    assert len(ours) == 9  # corner-touching pair (1), ellipse, 220 px bar, six squares; the speck is dropped


@pytest.mark.parametrize("k,min_area,margin", [(10, 100, 0.1), (3, 100, 0.1), (10, 150, 0.25), (10, 100, 0.0)])
def test_blob_crops_through_the_cli_match_the_independent_recipe(cli, tmp_path, k, min_area, margin):
    images = {f"img_{i:04d}.png": (pink_image(160, 200, i), known_mask(i)) for i in range(2)}
    test = {"img_0000.png": (pink_image(160, 200, 2), known_mask(2))}   # the same name as a training image
    data = write_data(tmp_path / "d", images, test)
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--k", k, "--min-area", min_area, "--margin", margin,
              "--size", 32, "--workers", 1)
    assert res.exit_code == 0, res.output
    rows = read_crops(run)
    for split, items in (("train", images), ("test", test)):
        for image_id, (_, mask) in items.items():
            expected = independent_blobs(mask, k, min_area, margin)
            assert boxes_of(rows, image_id, split) == expected, (split, image_id)
    assert {r["strategy"] for r in rows} == {"blobs"}
    test_rows = [r for r in rows if r["split"] == "test"]
    assert {r["image_id"] for r in test_rows} == {"img_0000.png"} and {r["label"] for r in test_rows} == {None}
    assert {r["label"] for r in rows if r["split"] == "train"} == {"Luminal A", "HER2(+)"}
    assert all(decode(r["png"]).shape == (32, 32, 3) for r in rows)


def test_grow_box_moves_each_edge_by_margin_times_the_box_side():
    assert grow_box((10, 20, 30, 60), 0.1, 100, 100) == (8, 16, 32, 64)
    assert grow_box((10, 20, 30, 60), 0.5, 100, 100) == (0, 0, 40, 80)
    assert grow_box((0, 0, 100, 10), 0.1, 100, 50) == (0, 0, 100, 11)   # clipped, rounded outward
    assert grow_box((5, 5, 8, 8), 0.1, 20, 20) == (4, 4, 9, 9)           # 0.3 px rounds outward


def test_otsu_binarise_edge_cases():
    assert not otsu_binarise(np.zeros((4, 4), np.uint8)).any()
    assert otsu_binarise(np.full((4, 4), 7, np.uint8)).all()
    m01 = np.zeros((4, 4), np.uint8)
    m01[1:3, 1:3] = 1
    assert np.array_equal(otsu_binarise(m01), m01 > 0)


def test_square_crop_centres_the_box_on_a_gray_canvas():
    rgb = np.zeros((50, 80, 3), np.uint8)
    rgb[10:20, 10:40] = (255, 0, 0)
    out = square_crop(rgb, (10, 10, 40, 20), MEAN_FILL, size=30)
    assert out.shape == (30, 30, 3)
    assert (out[:10] == MEAN_FILL).all() and (out[20:] == MEAN_FILL).all()   # 30x10 box: 10 rows pad each side
    assert (out[10:20] == (255, 0, 0)).all()
    big = square_crop(rgb, (10, 10, 40, 20), (1, 2, 3), size=60)
    assert big.shape == (60, 60, 3) and (big[0, 0] == (1, 2, 3)).all() and (big[30, 30] == (255, 0, 0)).all()
    mask = np.zeros((50, 80), bool)
    mask[10:20, 10:25] = True
    painted = square_crop(rgb, (10, 10, 40, 20), (9, 9, 9), size=30, mask=mask)
    assert (painted[10:20, :15] == (255, 0, 0)).all() and (painted[10:20, 15:] == 9).all()
    padded = square_crop(rgb, (70, 40, 80, 50), (5, 5, 5), size=20, side=20)  # clipped tile: padded, not stretched
    assert (padded[:5] == 5).all() and (padded[5:15, 5:15] == 0).all()


def test_tissue_by_colour_and_tile_layout():
    rgb = pink_image(40, 60, white_from=30)
    rgb[0:5, 0:5] = 0  # black is not tissue
    t = tissue_mask_by_colour(rgb)
    assert t.dtype == bool and t.shape == (40, 60)
    assert t[10:, :30].all() and not t[:, 30:].any() and not t[0:5, 0:5].any()
    assert tile_starts(0, 100, 32, 100) == [0, 23, 45, 68]   # even, overlapping, inside the image
    assert tile_starts(0, 20, 32, 20) == [0]                 # image smaller than a tile
    assert tile_starts(40, 50, 32, 100) == [29]              # a small region: one tile centred on it


# ---------------------------------------------------------------- the other strategies, through the CLI

def test_grid_strategy_keeps_tiles_with_enough_tissue(cli, tmp_path):
    images = {"img_0000.png": (pink_image(96, 128, white_from=64), np.zeros((96, 128), np.uint8))}
    data = write_data(tmp_path / "d", images)
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--strategy", "grid", "--tile", 32, "--size", 16,
              "--min-tissue", 0.5, "--workers", 1)
    assert res.exit_code == 0, res.output
    rows = read_crops(run)
    assert sorted(boxes_of(rows, "img_0000.png")) == sorted(
        (x, y, x + 32, y + 32) for y in (0, 32, 64) for x in (0, 32))     # left half only
    assert {r["strategy"] for r in rows} == {"grid"} and all(r["tissue_fraction"] == 1.0 for r in rows)
    assert "fell back" not in res.output   # grid needs no mask: an empty mask is no fallback here
    res = cli("crops", "--data", data, "--run", run, "--strategy", "grid", "--tile", 32, "--size", 16,
              "--max-crops", 2, "--workers", 1)
    assert res.exit_code == 0 and len(read_crops(run)) == 2


def test_roi_window_tiles_over_component_boxes(cli, tmp_path):
    mask = np.zeros((128, 160), np.uint8)
    mask[10:74, 10:106] = 255     # a 96x64 component: 3x2 tiles of 32, all inside
    mask[100:116, 130:150] = 255  # 20x16 = 320 px: one tile centred on it, < half inside: dropped
    data = write_data(tmp_path / "d", {"img_0000.png": (pink_image(128, 160), mask)})
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--strategy", "roi-window", "--tile", 32, "--size", 16,
              "--workers", 1)
    assert res.exit_code == 0, res.output
    rows = read_crops(run)
    expected = [(x, y, x + 32, y + 32) for y in (10, 42) for x in (10, 42, 74)]
    assert boxes_of(rows, "img_0000.png") == expected
    assert all(r["tissue_fraction"] >= 0.5 for r in rows) and {r["strategy"] for r in rows} == {"roi-window"}


def test_center_strategy_one_crop_per_component(cli, tmp_path):
    mask = np.zeros((128, 160), np.uint8)
    mask[40:60, 40:70] = 255      # centroid (54.5, 49.5)
    mask[5:15, 140:155] = 255     # near the edge: the crop is shifted inside the image
    data = write_data(tmp_path / "d", {"img_0000.png": (pink_image(128, 160), mask)})
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--strategy", "center", "--size", 32, "--workers", 1)
    assert res.exit_code == 0, res.output
    boxes = boxes_of(read_crops(run), "img_0000.png")
    assert boxes == [(38, 34, 70, 66), (128, 0, 160, 32)]
    assert all(decode(r["png"]).shape == (32, 32, 3) for r in read_crops(run))


def test_fill_and_fill_outside_mask(cli, tmp_path):
    rgb = pink_image(100, 100)
    mask = np.zeros((100, 100), np.uint8)
    mask[20:80, 40:60] = 255          # 20 wide x 60 tall: pads left and right
    mask[20:30, 40:45] = 0            # a notch outside the mask inside the box
    data = write_data(tmp_path / "d", {"img_0000.png": (rgb, mask)})
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--margin", 0, "--size", 60, "--fill", "0,255,0", "--workers", 1)
    assert res.exit_code == 0, res.output
    (row,) = read_crops(run)
    crop = decode(row["png"])
    assert (row["x0"], row["y0"], row["x1"], row["y1"]) == (40, 20, 60, 80)
    assert (crop[:, :20] == (0, 255, 0)).all() and (crop[:, 40:] == (0, 255, 0)).all()   # gray fill: here green
    assert np.abs(crop[:10, 20:25].astype(int) - PINK).max() <= 7                           # notch keeps tissue
    res = cli("crops", "--data", data, "--run", run, "--margin", 0, "--size", 60, "--fill", "0,255,0",
              "--fill-outside-mask", "--workers", 1)
    assert res.exit_code == 0, res.output
    crop = decode(read_crops(run)[0]["png"])
    assert (crop[:10, 20:25] == (0, 255, 0)).all()                                          # notch painted
    assert np.abs(crop[30:, 30:40].astype(int) - PINK).max() <= 7
    default = cli("crops", "--data", data, "--run", run, "--margin", 0, "--size", 60, "--workers", 1)
    assert default.exit_code == 0
    assert (decode(read_crops(run)[0]["png"])[:, :20] == MEAN_FILL).all()                   # ImageNet mean


def test_fallback_to_grid_over_tissue(cli, tmp_path):
    tiny = np.zeros((64, 96), np.uint8)
    tiny[5:10, 5:10] = 255            # 25 px < min area
    good = np.zeros((64, 96), np.uint8)
    good[10:40, 10:40] = 255
    images = {"img_0000.png": (pink_image(64, 96, white_from=48), np.zeros((64, 96), np.uint8)),
              "img_0001.png": (pink_image(64, 96, white_from=48), tiny),
              "img_0002.png": (pink_image(64, 96), good)}
    data = write_data(tmp_path / "d", images)
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--tile", 32, "--size", 16, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert "2 image(s) fell back to grid crops over tissue found by colour" in res.output
    assert "img_0000.png (train): mask is empty" in res.output
    assert "img_0001.png (train): no mask component of 100 px or more" in res.output
    rows = read_crops(run)
    for image_id in ("img_0000.png", "img_0001.png"):
        assert {r["strategy"] for r in rows if r["image_id"] == image_id} == {"grid-fallback"}
        assert sorted({b[0] for b in boxes_of(rows, image_id)}) == [0, 32]   # the all-white column is not cut
        assert all(r["tissue_fraction"] >= 0.5 for r in rows if r["image_id"] == image_id)
    assert {r["strategy"] for r in rows if r["image_id"] == "img_0002.png"} == {"blobs"}


def test_an_image_without_tissue_still_gets_its_best_tile():
    rgb = np.full((40, 40, 3), 250, np.uint8)
    crops, why = crop_image(rgb, np.zeros((40, 40), np.uint8), CropSettings(size=16, tile=32))
    assert why == "mask is empty" and len(crops) == 1 and crops[0].strategy == "grid-fallback"


# ---------------------------------------------------------------- re-runs, workers, atomic output

def small_data(root: Path, n: int = 4) -> Path:
    images = {}
    for i in range(n):
        mask = np.zeros((80, 100), np.uint8)
        mask[10 + i:40 + i, 10:50] = 255
        mask[50:70, 60:90] = 255
        images[f"img_{i:04d}.png"] = (pink_image(80, 100, i), mask)
    test = {"img_0000.png": images.pop(f"img_{n - 1:04d}.png")}   # named like the first training image
    return write_data(root, images, test)


def test_rerun_with_unchanged_inputs_does_no_work(cli, tmp_path):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    first = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert first.exit_code == 0, first.output
    assert "8 crops from 4 images" in first.output and "crops per image: min 2, median 2, max 2" in first.output
    stamp = (run / store.CROPS_FILE).stat().st_mtime_ns
    again = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 2)  # workers do not matter
    assert again.exit_code == 0 and "up to date" in again.output and "8 crops from 4 images" in again.output
    assert (run / store.CROPS_FILE).stat().st_mtime_ns == stamp
    changed = cli("crops", "--data", data, "--run", run, "--size", 48, "--workers", 1)
    assert changed.exit_code == 0 and "up to date" not in changed.output
    assert decode(read_crops(run)[0]["png"]).shape == (48, 48, 3)
    img = data / "train_data/img_0000.png"
    Image.fromarray(pink_image(80, 100, 9)).save(img)   # new pixels: work again
    touched = cli("crops", "--data", data, "--run", run, "--size", 48, "--workers", 1)
    assert touched.exit_code == 0 and "up to date" not in touched.output


def test_worker_pool_gives_the_same_crops(cli, tmp_path):
    data = small_data(tmp_path / "d", n=6)
    one = cli("crops", "--data", data, "--run", tmp_path / "r1", "--size", 32, "--workers", 1)
    two = cli("crops", "--data", data, "--run", tmp_path / "r2", "--size", 32, "--workers", 2)
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert read_crops(tmp_path / "r1") == read_crops(tmp_path / "r2")


def test_interrupted_run_leaves_no_file_and_keeps_the_old_one(cli, tmp_path, monkeypatch):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    real = crops_mod._crop_one
    calls = []

    def dies_on_third(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(crops_mod, "_crop_one", dies_on_third)
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 130 and "interrupted" in res.output
    assert not (run / store.CROPS_FILE).exists() and not list(run.glob(".*"))
    monkeypatch.setattr(crops_mod, "_crop_one", real)
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    before = (run / store.CROPS_FILE).read_bytes()
    calls.clear()
    monkeypatch.setattr(crops_mod, "_crop_one", dies_on_third)
    res = cli("crops", "--data", data, "--run", run, "--size", 40, "--workers", 1)
    assert res.exit_code == 130
    assert (run / store.CROPS_FILE).read_bytes() == before and not list(run.glob(".*"))


def test_output_schema_and_metadata(cli, tmp_path):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    schema = pq.read_schema(run / store.CROPS_FILE)
    assert schema.remove_metadata().equals(store.CROPS_SCHEMA)
    meta = store.read_meta(run / store.CROPS_FILE)
    assert meta["key"] and meta["settings"]["size"] == 32 and meta["version"]


def test_a_killed_run_s_temporary_is_removed_by_the_next_run(cli, tmp_path):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    leftover = run / f".{store.CROPS_FILE}.tmp-999999999"      # kill -9 mid-write leaves this
    leftover.write_bytes(b"x" * 1000)
    again = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert again.exit_code == 0 and "up to date" in again.output
    assert not leftover.exists()


# ---------------------------------------------------------------- QC integration

def write_qc(run: Path, rows: list[dict]) -> None:
    full = [{"split": "train", "flagged": False, "non_tissue": False, "ink": False, "blank": False,
             "outlier": None, "duplicate_group": None, "reason": "", **r} for r in rows]
    store.write_table(pa.Table.from_pylist(full, schema=store.QC_SCHEMA), run / store.QC_FILE,
                      {"key": "test", "settings": {}})


def test_qc_flagged_training_images_left_out_unless_kept(cli, tmp_path):
    data, run = small_data(tmp_path / "d", n=5), tmp_path / "run"
    write_qc(run, [{"image_id": "img_0000.png", "flagged": True, "non_tissue": True},
                   {"image_id": "img_0001.png", "flagged": True, "blank": True},
                   {"image_id": "img_0000.png", "split": "test", "flagged": True, "non_tissue": True}])
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert "left out 2 training image(s) flagged by QC: img_0000.png, img_0001.png" in res.output
    # the test image of the same name as a flagged training image is kept: test images are never dropped
    assert keys_of(read_crops(run)) == {("train", "img_0002.png"), ("train", "img_0003.png"), ("test", "img_0000.png")}
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, "--keep", "img_0001.png")
    assert res.exit_code == 0 and "left out 1 training image(s)" in res.output
    assert keys_of(read_crops(run)) == {("train", "img_0001.png"), ("train", "img_0002.png"), ("train", "img_0003.png"),
                                        ("test", "img_0000.png")}
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, "--include-flagged")
    assert res.exit_code == 0 and "left out" not in res.output and len(keys_of(read_crops(run))) == 5
    res = cli("crops", "--data", data, "--run", run, "--keep", "img_9999.png")
    assert res.exit_code == 2 and "--keep names image(s) not in the training data: img_9999.png" in res.output


def test_a_cartoon_copied_over_an_image_after_qc_stops_crops(cli, tmp_path):
    """Issue 23: flags of other bytes are not applied. A cartoon and its mask copied over a clean training image
    after QC would go into training unflagged; crops names the image, qc.parquet and what to run."""
    import shutil

    from histoembed.tools.synthetic import make_dataset

    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset(data, n_train=12, n_test=2, seed=3, size_range=(128, 192))
    planted = json.loads((data / "planted.json").read_text())
    cartoon = next(name for name, flag in planted["flags"].items() if flag == "non_tissue")
    labels = dict(line.split(",", 1) for line in (data / "train_labels.csv").read_text().splitlines()[1:])
    clean = next(name for name, label in labels.items()       # of a label that keeps images when it is flagged
                 if name not in planted["flags"] and list(labels.values()).count(label) > 3)
    assert cli("qc", "--data", data, "--run", run, "--no-embed", "--workers", 1).exit_code == 0
    train = data / "train_data"
    for kind in ("img_", "mask_"):
        shutil.copy(train / cartoon.replace("img_", kind), train / clean.replace("img_", kind))
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 2, res.output
    assert f"{run / store.QC_FILE}: the data changed since `histoembed qc` checked it" in res.output
    assert f"train/{clean}" in res.output and "run `histoembed qc`" in res.output
    assert not (run / store.CROPS_FILE).exists()
    assert cli("qc", "--data", data, "--run", run, "--no-embed", "--workers", 1).exit_code == 0
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert ("train", clean) not in keys_of(read_crops(run)) and clean in res.output   # left out, as QC flags it


def test_a_qc_table_lists_the_images_it_checked_and_what_changed_since():
    from histoembed.inputs.provenance import SAMPLE_STAMPS, changed_since

    meta = {SAMPLE_STAMPS: [["train", "a.png", "1", "m1"], ["test", "a.png", "2", None]]}
    assert changed_since(meta, [("train", "a.png", "1", "m1"), ("test", "a.png", "2", None)]) == []
    assert changed_since(meta, [("train", "a.png", "1", "m9"), ("test", "a.png", "3", None),
                                ("train", "new.png", "4", None)]) == ["train/a.png", "test/a.png", "train/new.png"]
    assert changed_since({"key": "by hand"}, [("train", "a.png", "1", "m1")]) is None   # nothing to compare


def test_verify_data_sees_an_edit_that_keeps_size_and_mtime(cli, tmp_path):
    """Stamps are cached by size and modification time: --verify-data hashes every file again."""
    import hashlib
    import os
    import struct
    import zlib

    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    path = data / "train_data" / "img_0000.png"
    before = path.stat()
    pixels = np.array(Image.open(path))
    pixels[:16, :16] = 40                                  # flat: fewer bytes, padded back below

    def encode(level: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    png = min(map(encode, range(1, 10)), key=len)
    text = b"Comment\0" + b" " * (before.st_size - len(png) - 12 - len(b"Comment\0"))
    chunk = b"tEXt" + text
    padding = struct.pack(">I", len(text)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(png[:-12] + padding + png[-12:])                     # before IEND, the last 12 bytes
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    same = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert same.exit_code == 0 and "up to date" in same.output          # the documented limit of the cache
    verified = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, "--verify-data")
    assert verified.exit_code == 0 and "up to date" not in verified.output, verified.output
    stamped = store.read_meta(run / store.CROPS_FILE)["content_stamps"][str(path.resolve())]
    assert stamped[2] == hashlib.sha256(path.read_bytes()).hexdigest()   # cut from the edited bytes


def test_a_qc_file_of_the_old_schema_is_refused(cli, tmp_path):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    write_qc(run, [{"image_id": "img_0000.png", "flagged": True, "non_tissue": True}])
    table = pq.read_table(run / store.QC_FILE)
    meta = {**store.read_meta(run / store.QC_FILE), "schema": 1}
    pq.write_table(table.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), run / store.QC_FILE)
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 2 and not (run / store.CROPS_FILE).exists()
    assert "qc.parquet has file schema 1" in res.output and "re-run `histoembed qc`" in res.output


def test_a_label_that_qc_empties_stops_crops_and_names_it(cli, tmp_path):
    data, run = small_data(tmp_path / "d", n=5), tmp_path / "run"   # HER2(+): img_0001, img_0003
    write_qc(run, [{"image_id": "img_0001.png", "flagged": True, "non_tissue": True},
                   {"image_id": "img_0003.png", "flagged": True, "blank": True}])
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1)
    assert res.exit_code == 2, res.output
    assert "label 'HER2(+)' has no training image left" in res.output and "QC flagged all 2" in res.output
    assert "--include-flagged" in res.output and not (run / store.CROPS_FILE).exists()
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, "--keep", "img_0003.png")
    assert res.exit_code == 0, res.output


def test_qc_ink_is_repaired_before_cropping(cli, tmp_path):
    pytest.importorskip("histoembed.stages.qc")
    rgb = pink_image(120, 120)
    cv2.line(rgb, (10, 40), (110, 60), (40, 150, 70), 8)
    mask = np.zeros((120, 120), np.uint8)
    mask[20:100, 20:100] = 255
    data = write_data(tmp_path / "d", {"img_0000.png": (rgb, mask), "img_0001.png": (pink_image(120, 120, 1), mask)})
    run = tmp_path / "run"

    def green_share() -> float:
        crop = decode(read_crops(run)[0]["png"]).astype(int)
        return float(((crop[..., 1] > crop[..., 0] + 40) & (crop[..., 1] > crop[..., 2] + 40)).mean())

    assert cli("crops", "--data", data, "--run", run, "--size", 64, "--workers", 1).exit_code == 0
    assert green_share() > 0.02
    write_qc(run, [{"image_id": "img_0000.png", "ink": True, "flagged": True}])
    res = cli("crops", "--data", data, "--run", run, "--size", 64, "--workers", 1, "--keep", "img_0000.png")
    assert res.exit_code == 0, res.output
    assert "repaired green ink in 1 image(s) before cropping: img_0000.png (train)" in res.output
    assert green_share() < 0.002


# ---------------------------------------------------------------- options and settings

def test_bad_options_are_clear_errors(cli, tmp_path):
    data = small_data(tmp_path / "d")
    res = cli("crops", "--data", data, "--fill", "1,2")
    assert res.exit_code == 2 and "--fill '1,2' is not R,G,B" in res.output
    res = cli("crops", "--data", data, "--strategy", "spiral")
    assert res.exit_code == 2 and "--strategy" in res.output and "blobs" in res.output
    res = cli("crops", "--data", data, "--margin", "-1")
    assert res.exit_code == 2 and "--margin" in res.output


def test_settings_file_and_help(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # help text unabridged
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    (tmp_path / "h.toml").write_text('[crops]\nsize = 24\nstrategy = "center"\nworkers = 1\n')
    res = cli("crops", "--data", data, "--run", run, "--config", tmp_path / "h.toml")
    assert res.exit_code == 0, res.output
    assert {r["strategy"] for r in read_crops(run)} == {"center"}
    assert decode(read_crops(run)[0]["png"]).shape == (24, 24, 3)
    help_text = cli("crops", "--help").output
    for opt in ("--data", "--run", "--config", "--strategy", "--k", "--min-area", "--margin", "--size", "--fill",
                "--fill-outside-mask", "--tile", "--min-tissue", "--workers", "--strict", "--keep",
                "--include-flagged", "--mask-mode", "--scales"):
        assert opt in help_text, opt


# ---------------------------------------------------------------- context crops (scales) and mask modes

def independent_context(rgb: np.ndarray, box: tuple[int, int, int, int], scale: float, size: int,
                        fill=MEAN_FILL) -> np.ndarray:
    """A scale-s crop by another route: pad the whole image with the fill colour, slice the grown square."""
    x0, y0, x1, y1 = box
    side = round(scale * max(x1 - x0, y1 - y0))
    pad = side
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=tuple(int(v) for v in fill))
    left, top = math.floor((x0 + x1 - side) / 2), math.floor((y0 + y1 - side) / 2)
    square = padded[top + pad:top + pad + side, left + pad:left + pad + side]
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def test_context_crops_through_the_cli(cli, tmp_path):
    """--scales 1,2: scale-1 crops unchanged (same index, box, pixels); each gets a scale-2 crop of twice the
    square about its centre, beyond the image filled, with an index unique across scales."""
    images = {f"img_{i:04d}.png": (pink_image(160, 200, i), known_mask(i)) for i in range(2)}
    test = {"img_0000.png": (pink_image(160, 200, 5), known_mask(5))}
    data = write_data(tmp_path / "d", images, test)
    rgb_of = {**{("train", k): v[0] for k, v in images.items()}, **{("test", k): v[0] for k, v in test.items()}}
    plain, ctx = tmp_path / "plain", tmp_path / "ctx"
    assert cli("crops", "--data", data, "--run", plain, "--size", 32, "--workers", 1).exit_code == 0
    res = cli("crops", "--data", data, "--run", ctx, "--size", 32, "--workers", 1, "--scales", "1,2")
    assert res.exit_code == 0, res.output
    assert "(2 scales: 1, 2)" in res.output
    before, after = read_crops(plain), read_crops(ctx)
    assert len(after) == 2 * len(before) and {r["scale"] for r in before} == {1.0}
    by_key = {(r["split"], r["image_id"], r["crop_index"]): r for r in after}
    assert len(by_key) == len(after)                                   # crop_index unique across scales
    for r in before:
        twin = by_key[(r["split"], r["image_id"], r["crop_index"])]
        assert twin["scale"] == 1.0 and twin["png"] == r["png"]
        assert [twin[c] for c in ("x0", "y0", "x1", "y1")] == [r[c] for c in ("x0", "y0", "x1", "y1")]
    for split, image_id in keys_of(before):
        ones = sorted((r for r in before if (r["split"], r["image_id"]) == (split, image_id)),
                      key=lambda r: r["crop_index"])
        n = len(ones)
        rgb = rgb_of[(split, image_id)]
        for r in ones:
            wide = by_key[(split, image_id, n + r["crop_index"])]
            assert wide["scale"] == 2.0 and wide["strategy"] == r["strategy"]
            box = (r["x0"], r["y0"], r["x1"], r["y1"])
            expected = independent_context(rgb, box, 2.0, 32)
            assert np.abs(decode(wide["png"]).astype(int) - expected.astype(int)).max() <= 1, (split, image_id)
            # the stored box is the grown square's part inside the image, and holds the scale-1 box
            assert wide["x0"] <= r["x0"] and wide["y0"] <= r["y0"]
            assert wide["x1"] >= r["x1"] and wide["y1"] >= r["y1"]
            assert 0 <= wide["x0"] and 0 <= wide["y0"] and wide["x1"] <= 200 and wide["y1"] <= 160
    # 2,1 is the same setting as 1,2: nothing to do
    res = cli("crops", "--data", data, "--run", ctx, "--size", 32, "--workers", 1, "--scales", "2,1")
    assert res.exit_code == 0 and "up to date" in res.output


def test_context_crop_beyond_the_image_is_fill_and_tiles_scale_their_side():
    rgb = pink_image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[0:16, 0:16] = 255                                  # a blob in the corner
    crops, why = crop_image(rgb, mask, CropSettings(size=32, margin=0.0, scales=(1.0, 2.0)))
    assert why is None and [c.scale for c in crops] == [1.0, 2.0]
    wide = crops[1]
    assert wide.box == (0, 0, 24, 24)                       # the 32-px square about (8, 8), inside the image
    assert (wide.pixels[:6, :6] == MEAN_FILL).all()         # its top-left quarter-ish lies beyond the image
    assert np.abs(wide.pixels[20:, 20:].astype(int) - np.array(PINK)).max() < 20
    assert wide.tissue_fraction == pytest.approx(256 / 576)  # the mask's share of the part inside the image
    grid, _ = crop_image(pink_image(96, 96), None, CropSettings(strategy="grid", size=16, tile=32, scales=(1.0, 1.5)))
    ones, wides = [c for c in grid if c.scale == 1.0], [c for c in grid if c.scale == 1.5]
    assert len(ones) == len(wides) == 9
    assert wides[4].box == (24, 24, 72, 72)                 # the centre tile grown to 48 px about its centre


def test_fill_outside_mask_paints_only_scale_one():
    rgb = pink_image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40, 24:40] = 255
    crops, _ = crop_image(rgb, mask, CropSettings(size=32, margin=0.5, fill_outside_mask=True, scales=(1.0, 2.0)))
    assert (crops[0].pixels[:4, :4] == MEAN_FILL).all()                       # outside the mask: painted
    assert np.abs(crops[1].pixels[:4, :4].astype(int) - np.array(PINK)).max() < 20   # context: kept


def partial_mask_data(root: Path) -> tuple[Path, dict]:
    """Tissue on the left 120 columns of each image; the mask marks only a 20 x 20 square of it."""
    images = {}
    for i in range(2):
        mask = np.zeros((100, 200), np.uint8)
        mask[40:60, 20:40] = 255
        images[f"img_{i:04d}.png"] = (pink_image(100, 200, i, white_from=120), mask)
    return write_data(root, images), images


@pytest.mark.parametrize("mode,boxes", [("given", [(18, 38, 42, 62)]), ("tissue", [(0, 0, 132, 100)]),
                                        ("union", [(18, 38, 42, 62), (0, 0, 132, 100)])])
def test_mask_mode_finds_blobs_in_the_mask_the_tissue_or_both(cli, tmp_path, mode, boxes):
    data, _ = partial_mask_data(tmp_path / "d")
    run = tmp_path / "run"
    res = cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, "--mask-mode", mode)
    assert res.exit_code == 0, res.output
    rows = read_crops(run)
    for image_id in ("img_0000.png", "img_0001.png"):
        assert boxes_of(rows, image_id) == boxes            # margin 0.1: 2 px around the square, 12 px right of the tissue
    assert {r["strategy"] for r in rows} == {"blobs"}
    assert store.read_meta(run / store.CROPS_FILE)["settings"]["mask_mode"] == mode


def test_union_fills_k_after_the_mask_s_components():
    rgb = pink_image(100, 200, white_from=120)
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 20:40] = 255
    crops, _ = crop_image(rgb, mask, CropSettings(size=16, mask_mode="union", k=1))
    assert [c.box for c in crops] == [(18, 38, 42, 62)]                 # k = 1: the mask's blob alone
    mask[:] = 0
    mask[10:20, 150:160] = 255                                          # a 100 px mask blob on the slide
    crops, _ = crop_image(rgb, mask, CropSettings(size=16, mask_mode="union", margin=0.0))
    assert [c.box for c in crops] == [(150, 10, 160, 20), (0, 0, 120, 100)]


def test_tissue_mode_needs_no_mask_and_union_keeps_the_min_area():
    rgb = pink_image(100, 200, white_from=120)
    crops, why = crop_image(rgb, None, CropSettings(size=16, mask_mode="tissue"))
    assert why is None and crops[0].box == (0, 0, 132, 100)
    crops, why = crop_image(rgb, None, CropSettings(size=16))           # given: no mask, grid fallback
    assert why == "no mask" and crops[0].strategy == "grid-fallback"
    speck = np.full((100, 200, 3), 248, np.uint8)
    speck[10:15, 10:15] = PINK                                          # 25 px of tissue, below min_area
    crops, why = crop_image(speck, np.zeros((100, 200), np.uint8), CropSettings(size=16, mask_mode="union"))
    assert why == "no union component of 100 px or more" and crops[0].strategy == "grid-fallback"


def test_a_crops_file_without_the_scale_column_reads_as_scale_one(cli, tmp_path):
    data, run = small_data(tmp_path / "d"), tmp_path / "run"
    assert cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1).exit_code == 0
    path = run / store.CROPS_FILE
    old = pq.read_table(path)
    old = old.drop_columns(["scale"])
    pq.write_table(old, path)                                           # keeps the histoembed metadata
    scales = store.crop_scales(run)
    assert len(scales) == old.num_rows and set(scales.values()) == {1.0}


def test_scale_and_mask_mode_options_are_checked_and_shown(cli, tmp_path):
    data = small_data(tmp_path / "d")
    for bad, says in (("0.5", "--scales"), ("1,1", "distinct"), ("1,x", "not a comma-separated list"),
                      ("2", "must include 1"), ("1,9", "[1, 8]")):
        res = cli("crops", "--data", data, "--scales", bad)
        assert res.exit_code == 2 and says in res.output, res.output
    res = cli("crops", "--data", data, "--mask-mode", "both")
    assert res.exit_code == 2 and "--mask-mode" in res.output
    res = cli("config", "crops", "--scales", "2,1", "--mask-mode", "union")
    assert res.exit_code == 0 and "scales = [1.0, 2.0]" in res.output and 'mask_mode = "union"' in res.output


# ---------------------------------------------------------------- evidence: what --mask-mode union recovers and costs

def test_union_masks_recover_the_class_signal_a_partial_mask_misses(crop_evidence):
    """Planted: masks mark a patch of tissue and miss the rest, which carries the class. `--mask-mode union` adds
    crops of the missed tissue: the paired interval of the macro-F1 difference lies above 0."""
    run, compare = crop_evidence
    r = compare(run("partial", "plain"), run("partial", "union", "--mask-mode", "union"))
    assert r["interval_95"][0] > 0, r
    assert r["macro_f1_b"] > r["macro_f1_a"] + 0.15


def test_union_masks_cost_nothing_beyond_noise_on_clean_data(crop_evidence):
    """Clean: the masks cover the tumour that carries the class; union's extra crops of the rest of the tissue
    change nothing that the paired interval can tell from noise."""
    run, compare = crop_evidence
    r = compare(run("clean", "plain"), run("clean", "union", "--mask-mode", "union"))
    lo, hi = r["interval_95"]
    assert lo <= 0 <= hi, r

"""The synthetic dataset: layout, determinism, planted outliers, and classes that differ in morphology."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoembed.dataset import load_dataset, read_image, read_mask
from histoembed.synthetic import LABELS, class_counts, make_dataset, tissue_image


def test_reference_layout_labels_and_unique_ids(tmp_path):
    summary = make_dataset(tmp_path, n_train=12, n_test=4, seed=0, size_range=(96, 160))
    lines = (tmp_path / "train_labels.csv").read_text().splitlines()
    assert lines[0] == "sample_index,label"
    assert len(lines) == 13
    assert {line.split(",", 1)[1] for line in lines[1:]} <= set(LABELS)
    train = sorted(p.name for p in (tmp_path / "train_data").glob("img_*.png"))
    test = sorted(p.name for p in (tmp_path / "test_data").glob("img_*.png"))
    assert train == [f"img_{i:04d}.png" for i in range(12)]
    assert test == [f"img_{i:04d}.png" for i in range(12, 16)]  # ids continue: unique across splits
    for folder in ("train_data", "test_data"):
        for img in (tmp_path / folder).glob("img_*.png"):
            assert (img.parent / img.name.replace("img_", "mask_")).exists()
    ds = load_dataset(tmp_path)  # the loader ignores planted.json
    assert not ds.problems and len(ds.split("train")) == 12 and len(ds.split("test")) == 4
    assert summary["train"] == train and summary["test"] == test


def test_images_are_he_coloured_of_varying_size_with_binary_masks(tmp_path):
    make_dataset(tmp_path, n_train=8, n_test=4, seed=2, size_range=(100, 200), outliers=False)
    sizes = set()
    for img in sorted((tmp_path / "train_data").glob("img_*.png")):
        rgb, mask = read_image(img), read_mask(img.with_name(img.name.replace("img_", "mask_")))
        assert rgb.shape[:2] == mask.shape and 100 <= rgb.shape[0] <= 200 and 100 <= rgb.shape[1] <= 200
        sizes.add(rgb.shape[:2])
        assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any()
        background = rgb.min(axis=2) > 220           # white slide
        assert 0.05 < background.mean() < 0.7
        tissue = rgb[~background].astype(int)
        assert (tissue[:, 0] > tissue[:, 1]).mean() > 0.9  # pink/purple: red and blue above green
        assert (tissue[:, 2] > tissue[:, 1]).mean() > 0.9
    assert len(sizes) > 1


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    make_dataset(tmp_path / "a", 8, 2, seed=5, size_range=(64, 96))
    make_dataset(tmp_path / "b", 8, 2, seed=5, size_range=(64, 96))
    make_dataset(tmp_path / "c", 8, 2, seed=6, size_range=(64, 96))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a/train_data/img_0000.png").read_bytes() != (tmp_path / "c/train_data/img_0000.png").read_bytes()


def test_planted_outliers_are_what_planted_json_says(tmp_path):
    summary = make_dataset(tmp_path, n_train=10, n_test=2, seed=1, size_range=(128, 160))
    planted = json.loads((tmp_path / "planted.json").read_text())
    assert planted == summary["planted"]
    assert sorted(planted.values()) == ["blank", "ink", "non_tissue"]
    for image_id, kind in planted.items():
        path = tmp_path / "train_data" / image_id
        assert path.exists()
        rgb, mask = read_image(path), read_mask(path.with_name(image_id.replace("img_", "mask_")))
        r, g, b = (rgb[..., c].astype(int) for c in range(3))
        green = (g > r + 40) & (g > b + 40)
        if kind == "blank":
            assert not mask.any()
        elif kind == "ink":
            assert 0.005 < green.mean() < 0.5 and mask.any()
        else:  # a cartoon: few flat colours cover most of the picture
            colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
            assert np.sort(counts)[::-1][:4].sum() > 0.8 * counts.sum()
            assert green.mean() > 0.1
    assert json.loads(json.dumps(make_dataset(tmp_path / "none", 4, 1, 0, (64, 64), outliers=False)["planted"])) == {}


def test_class_balance_follows_the_reference():
    counts = class_counts(691)
    assert counts == {"HER2(+)": 189, "Luminal A": 205, "Luminal B": 220, "Triple negative": 77}
    small = class_counts(10)
    assert sum(small.values()) == 10 and min(small.values()) >= 1
    assert small["Triple negative"] == min(small.values())


def _nuclear_fraction(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Share of the mask covered by dark purple (haematoxylin) pixels."""
    dark = rgb[..., 1] < 120
    return float(dark[mask > 0].mean())


def test_classes_differ_in_morphology_and_overlap():
    """Nuclear density in the tumour rises from Luminal A to Triple negative, with spread."""
    per_class = {}
    for label in ("Luminal A", "Triple negative"):
        values = []
        for i in range(10):
            rgb, mask = tissue_image(np.random.default_rng([9, i]), 192, 192, label)
            values.append(_nuclear_fraction(rgb, mask))
        per_class[label] = np.array(values)
    lum, tn = per_class["Luminal A"], per_class["Triple negative"]
    assert tn.mean() > 1.5 * lum.mean()
    assert lum.std() > 0 and tn.std() > 0
    assert tn.min() < lum.max() * 2.5  # ranges are close: morphology is a tendency, not a stamp


def test_synth_command(cli, tmp_path):
    out = tmp_path / "d"
    res = cli("synth", "--out", out, "--train", 8, "--test", 2, "--seed", 3, "--min-size", 64, "--max-size", 96)
    assert res.exit_code == 0, res.output
    assert "wrote 8 training and 2 test images" in res.output and "planted outliers" in res.output
    assert len(list((out / "train_data").glob("img_*.png"))) == 8
    again = cli("synth", "--out", out, "--train", 8)
    assert again.exit_code == 2 and "already holds a dataset" in again.output
    few = cli("synth", "--out", tmp_path / "e", "--train", 4)
    assert few.exit_code == 2 and "at least 8 training images" in few.output
    ok = cli("synth", "--out", tmp_path / "f", "--train", 4, "--test", 0, "--no-outliers",
             "--min-size", 64, "--max-size", 64)
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "f/planted.json").read_text()) == {}


@pytest.mark.parametrize("bad", [("--min-size", "200", "--max-size", "100")])
def test_synth_rejects_bad_sizes(cli, tmp_path, bad):
    res = cli("synth", "--out", tmp_path / "d", *bad)
    assert res.exit_code == 2 and "larger than --max-size" in res.output

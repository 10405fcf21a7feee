"""The crops stage's faster path (issue 22, item 5) changes nothing: OpenCV decodes plain PNGs to the
pixels PIL gives, other files still go through PIL, and crops.parquet is the same row for row as with
PIL decoding and the default connected-components algorithm."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoembed.inputs import cropping
from histoembed.stages import crops as crops_mod
from histoembed.core import store
from histoembed.core.config import CropSettings
from histoembed.core.errors import UserError
from histoembed.inputs import dataset
from histoembed.inputs.dataset import _plain_png, read_image, read_mask


def _pil_image(path: Path) -> np.ndarray:
    """read_image as it was: PIL for every file."""
    return np.asarray(Image.open(path).convert("RGB"))


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)
    return path


@pytest.fixture
def pngs(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    out = {"rgb": _save(tmp_path / "rgb.png", rgb), "grey": _save(tmp_path / "grey.png", grey),
           "rgba": _save(tmp_path / "rgba.png", np.dstack([rgb, grey])),
           "grey16": _save(tmp_path / "g16.png", grey.astype(np.uint16) * 257),
           "bits": _save(tmp_path / "bits.png", grey > 128),
           "palette": tmp_path / "palette.png", "trns": tmp_path / "trns.png",
           "opencv": tmp_path / "opencv.png"}
    Image.fromarray(rgb).convert("P").save(out["palette"])
    Image.fromarray(rgb).save(out["trns"], transparency=(0, 0, 0))
    cv2.imwrite(str(out["opencv"]), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # and one written by OpenCV
    return out


def test_opencv_takes_plain_8_bit_png_only(pngs):
    assert _plain_png(pngs["rgb"], None) is not None and _plain_png(pngs["grey"], None) is not None
    assert _plain_png(pngs["opencv"], None) is not None
    for kind in ("rgba", "grey16", "bits", "palette", "trns"):
        assert _plain_png(pngs[kind], None) is None, kind


def test_every_kind_decodes_to_what_pil_gives(pngs):
    for kind, path in pngs.items():
        im = Image.open(path)
        if im.mode in ("RGB", "L", "P"):
            assert np.array_equal(read_image(path), _pil_image(path)), kind
        if im.mode in ("L", "RGB"):
            want = np.asarray(im) if im.mode == "L" else np.asarray(im).max(axis=2)
            assert np.array_equal(read_mask(path), want), kind
        assert read_image(path).flags.c_contiguous and read_mask(path).flags.c_contiguous


def test_bad_files_keep_their_messages(pngs, tmp_path):
    data = pngs["rgb"].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable or truncated"):
        read_image(cut)
    with pytest.raises(UserError, match="file not found"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="over the limit"):  # the header's size, before any pixel is decoded
        read_image(pngs["rgb"], max_pixels=100)


def _old_path(monkeypatch) -> None:
    """Decode with PIL and label components with OpenCV's default algorithm, as before."""
    monkeypatch.setattr(dataset, "_plain_png", lambda path, max_pixels: None)
    monkeypatch.setattr(cropping.cv2, "connectedComponentsWithStatsWithAlgorithm",
                        lambda img, conn, ltype, algo: cv2.connectedComponentsWithStats(img, connectivity=conn))


@pytest.mark.parametrize("settings", [dict(), dict(strategy="grid"), dict(mask_mode="union", fill_outside_mask=True),
                                      dict(strategy="center", scales=(1.0, 2.0))])
def test_crops_parquet_is_unchanged(tmp_path, monkeypatch, settings):
    from histoembed.tools.synthetic import make_dataset

    data = tmp_path / "data"
    make_dataset(data, n_train=10, n_test=3, seed=3, size_range=(150, 260))  # outliers: ink, blank, cartoon
    rgb = np.asarray(Image.open(data / "test_data" / "img_0000.png"))
    Image.fromarray(rgb).convert("P").save(data / "test_data" / "img_0000.png")  # a palette image: through PIL
    settings = CropSettings(workers=1, size=64, **settings)
    new = crops_mod.run_crops(data, tmp_path / "new", settings)
    with monkeypatch.context() as m:
        _old_path(m)
        old = crops_mod.run_crops(data, tmp_path / "old", settings)
    assert new.crops == old.crops > 13
    a, b = (pq.read_table(r / store.CROPS_FILE) for r in (tmp_path / "new", tmp_path / "old"))
    assert a.equals(b)


def test_components_match_the_default_algorithm():
    """Labelled in the foreground's box by BBDT: the same components, boxes and centroids (to the bit)."""
    rng = np.random.default_rng(1)
    assert cropping.components(np.zeros((9, 7), bool), k=5, min_area=1) == []
    for t in range(40):
        blobs = cv2.GaussianBlur(rng.random((120, 150)).astype(np.float32), (0, 0), 1 + t % 4) > 0.5
        binary = np.zeros((120 + 2 * t, 150 + 3 * t), bool)  # blobs away from the corner, at odd offsets too
        if t % 5 == 0:
            binary[:120, :150] = blobs
        else:
            binary[t:t + 120, 2 * t + 1:2 * t + 151] = blobs & (rng.random(blobs.shape) < 0.97)
        got = cropping.components(binary, k=50, min_area=1)
        n, _, stats, centroids = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
        want = sorted(((int(stats[i][4]), int(stats[i][1]), int(stats[i][0]), tuple(centroids[i])) for i in range(1, n)),
                      key=lambda t: (-t[0], t[1], t[2]))
        assert [(c.area, c.box[1], c.box[0], c.centroid) for c in got] == want[:50]


def test_pil_still_reads_a_png_opencv_refuses(tmp_path, monkeypatch):
    path = _save(tmp_path / "x.png", np.full((8, 9, 3), 7, np.uint8))
    monkeypatch.setattr(dataset.cv2, "imdecode", lambda *a: None)
    assert np.array_equal(read_image(path), np.full((8, 9, 3), 7, np.uint8))

"""The dataset layer: layouts, every bad input (outcome and message, through the CLI), pixel formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import load_dataset, read_image, read_image_and_mask, read_mask, submission_ids

LABELS = ("Luminal A", "Triple negative")


def tissue(h: int = 96, w: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pink tissue image on white with one square mask blob."""
    rng = np.random.default_rng(seed)
    rgb = np.full((h, w, 3), 245, np.uint8)
    rgb[10:h - 10, 10:w - 10] = (220, 130, 190)
    rgb = np.clip(rgb.astype(int) + rng.integers(-5, 6, rgb.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[20:60, 30:80] = 255
    return rgb, mask


def write_reference(root: Path, n_train: int = 4, n_test: int = 2) -> Path:
    """The reference layout: train_data/ and test_data/ both numbered from img_0000.png (labels for train)."""
    for split in ("train", "test"):
        (root / f"{split}_data").mkdir(parents=True, exist_ok=True)
    rows = ["sample_index,label"]
    for n, (split, i) in enumerate([("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]):
        rgb, mask = tissue(seed=n)
        Image.fromarray(rgb).save(root / f"{split}_data/img_{i:04d}.png")
        Image.fromarray(mask).save(root / f"{split}_data/mask_{i:04d}.png")
        if split == "train":
            rows.append(f"img_{i:04d}.png,{LABELS[i % 2]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def crops(cli, data: Path, run: Path, *extra):
    return cli("crops", "--data", data, "--run", run, "--size", 32, "--workers", 1, *extra)


def crop_ids(run: Path) -> set[tuple[str, str]]:
    """(split, image_id) of every image with crops."""
    t = pq.read_table(run / store.CROPS_FILE, columns=["split", "image_id"])
    return set(zip(t["split"].to_pylist(), t["image_id"].to_pylist()))


# ---------------------------------------------------------------- layouts

def test_reference_layout(tmp_path):
    ds = load_dataset(write_reference(tmp_path / "d"))
    assert [s.image_id for s in ds.split("train")] == [f"img_{i:04d}.png" for i in range(4)]
    assert [s.image_id for s in ds.split("test")] == ["img_0000.png", "img_0001.png"]  # named as in the challenge
    assert ds.classes == sorted(LABELS)
    assert all(s.label is None for s in ds.split("test"))
    by_key = ds.by_key()
    assert by_key["train", "img_0001.png"].label == "Triple negative"
    assert by_key["train", "img_0002.png"].mask.name == "mask_0002.png"
    assert by_key["test", "img_0001.png"].label is None
    assert by_key["test", "img_0001.png"].image.parent.name == "test_data"


def test_manifest_layout_through_the_cli(cli, tmp_path):
    root = tmp_path / "any"
    (root / "slides").mkdir(parents=True)
    rows = ["image,mask,label,split"]
    for i, (split, label) in enumerate([("train", "A"), ("train", "B"), ("test", ""), ("train", "A")]):
        rgb, mask = tissue(seed=i)
        Image.fromarray(rgb).save(root / f"slides/s{i}.jpg", quality=95)
        mask_rel = f"slides/s{i}_m.png" if i != 3 else ""  # a row without a mask: tissue by colour
        if mask_rel:
            Image.fromarray(mask).save(root / mask_rel)
        rows.append(f"slides/s{i}.jpg,{mask_rel},{label},{split}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(root / "list.csv")
    assert [(s.image_id, s.split, s.label) for s in ds.samples] == [
        ("slides/s0.jpg", "train", "A"), ("slides/s1.jpg", "train", "B"), ("slides/s2.jpg", "test", None),
        ("slides/s3.jpg", "train", "A")]
    assert ds.samples[3].mask is None
    # manifest.csv inside a folder is found too; crops run on both forms.
    (root / "manifest.csv").write_text((root / "list.csv").read_text())
    for data in (root / "list.csv", root):
        run = tmp_path / f"run-{data.name}"
        res = crops(cli, data, run)
        assert res.exit_code == 0, res.output
        assert crop_ids(run) == {(split, f"slides/s{i}.jpg") for i, split in enumerate(["train", "train", "test", "train"])}
        assert "slides/s3.jpg (train): no mask" in res.output
        assert submission_ids(data) == ["slides/s2.jpg"]


# ---------------------------------------------------------------- bad inputs, through the CLI

def test_missing_mask_skips_the_image_and_says_so(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    (data / "train_data/mask_0001.png").unlink()
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "skipped 1 item(s)" in res.output
    assert "img_0001.png: no mask (expected mask_0001.png beside it); image skipped" in res.output
    assert ("train", "img_0001.png") not in crop_ids(tmp_path / "run")
    assert ("test", "img_0001.png") in crop_ids(tmp_path / "run")  # the test image of that name is another image
    strict = crops(cli, data, tmp_path / "run2", "--strict")
    assert strict.exit_code == 2 and "no mask (expected mask_0001.png" in strict.output and "--strict" in strict.output
    assert not (tmp_path / "run2" / store.CROPS_FILE).exists()


def test_mask_size_mismatch(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(data / "train_data/mask_0002.png")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "mask_0002.png: mask is 60x50 but its image img_0002.png is 120x96; image skipped" in res.output
    assert ("train", "img_0002.png") not in crop_ids(tmp_path / "run")
    strict = crops(cli, data, tmp_path / "run2", "--strict")
    assert strict.exit_code == 2 and "mask is 60x50" in strict.output


def test_read_image_and_mask(tmp_path):
    data = write_reference(tmp_path / "data", n_train=2, n_test=2)
    assert submission_ids(data) == ["img_0000.png", "img_0001.png"]   # test_data/ numbers from img_0000
    rgb, mask = read_image_and_mask(data / "train_data/img_0000.png", data / "train_data/mask_0000.png")
    assert rgb.shape == (96, 120, 3) and mask.shape == (96, 120)
    assert read_image_and_mask(data / "train_data/img_0000.png", None)[1] is None
    Image.fromarray(np.zeros((50, 60), np.uint8)).save(data / "train_data/mask_0001.png")
    with pytest.raises(UserError) as e:
        read_image_and_mask(data / "train_data/img_0001.png", data / "train_data/mask_0001.png")
    assert e.value.path.name == "mask_0001.png" and "mask is 60x50 but its image img_0001.png is 120x96" in str(e.value)


def test_unreadable_and_truncated_files(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    (data / "train_data/img_0000.png").write_bytes(b"this is not a picture")
    full = (data / "train_data/img_0003.png").read_bytes()
    (data / "train_data/img_0003.png").write_bytes(full[: len(full) // 2])  # header intact, pixels cut
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "skipped 2 item(s)" in res.output
    assert "img_0000.png: unreadable image (cannot identify image file" in res.output
    assert "img_0003.png: unreadable or truncated image" in res.output
    assert crop_ids(tmp_path / "run") == {("train", "img_0001.png"), ("train", "img_0002.png"),
                                          ("test", "img_0000.png"), ("test", "img_0001.png")}
    strict = crops(cli, data, tmp_path / "run2", "--strict")
    assert strict.exit_code == 2 and "img_0000.png" in strict.output
    assert not (tmp_path / "run2" / store.CROPS_FILE).exists()
    # Only the truncated file (found when decoding, after the checks): still nothing written.
    (data / "train_data/img_0000.png").write_bytes((data / "train_data/img_0001.png").read_bytes())
    strict = crops(cli, data, tmp_path / "run3", "--strict")
    assert strict.exit_code == 2 and "img_0003.png: unreadable or truncated image" in strict.output
    assert "nothing written" in strict.output
    assert not (tmp_path / "run3" / store.CROPS_FILE).exists()
    assert not list((tmp_path / "run3").glob(".*tmp*"))


def test_label_row_for_an_image_that_does_not_exist(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    with (data / "train_labels.csv").open("a") as f:
        f.write("img_0999.png,Luminal A\n")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert ("train_labels.csv: label row for 'img_0999.png', but train_data/img_0999.png does not exist; "
            "row ignored") in res.output
    assert len(crop_ids(tmp_path / "run")) == 6


def test_training_image_without_a_label(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    lines = (data / "train_labels.csv").read_text().splitlines()
    (data / "train_labels.csv").write_text("\n".join(line for line in lines if "img_0002" not in line) + "\n")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "img_0002.png: training image has no row in train_labels.csv; skipped" in res.output
    assert ("train", "img_0002.png") not in crop_ids(tmp_path / "run")


def test_the_same_name_in_both_splits_is_two_images(cli, tmp_path):
    """The real challenge: train_data/ and test_data/ both hold img_0000.png, ... (different pictures)."""
    data = write_reference(tmp_path / "d", n_train=3, n_test=3)
    ds = load_dataset(data)
    assert [s.key for s in ds.samples] == [("train", f"img_{i:04d}.png") for i in range(3)] + \
        [("test", f"img_{i:04d}.png") for i in range(3)]
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "from 6 images" in res.output
    t = pq.read_table(tmp_path / "run" / store.CROPS_FILE).to_pylist()
    by_key = {(r["split"], r["image_id"]): r for r in t}
    assert len(by_key) == 6
    # each crop comes from its own split's file: the test image differs from the training image of its name
    assert by_key["train", "img_0001.png"]["png"] != by_key["test", "img_0001.png"]["png"]
    assert by_key["test", "img_0001.png"]["label"] is None and by_key["train", "img_0001.png"]["label"]
    # a manifest may repeat a file name across splits too
    rows = ["image,mask,label,split"]
    for split in ("train", "test"):
        rows += [f"{split}_data/img_{i:04d}.png,{split}_data/mask_{i:04d}.png,{'A' if split == 'train' else ''},"
                 f"{split}" for i in range(3)]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(data / "list.csv")
    assert len({s.key for s in ds.samples}) == 6 and len(ds.split("test")) == 3


def test_duplicate_ids_stop_the_stage(cli, tmp_path):
    # the same id twice in the labels file
    data2 = write_reference(tmp_path / "d2")
    with (data2 / "train_labels.csv").open("a") as f:
        f.write("img_0001.png,Luminal A\n")
    res = crops(cli, data2, tmp_path / "run")
    assert res.exit_code == 2 and "train_labels.csv: line 6: duplicate id 'img_0001.png'" in res.output
    # the same image twice in a manifest
    rgb, mask = tissue()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,mask,label,split\na.png,,X,train\n./a.png,,X,train\n")
    res = crops(cli, tmp_path / "m.csv", tmp_path / "run")
    assert res.exit_code == 2 and "m.csv: line 3: duplicate image './a.png' (also on line 2)" in res.output


@pytest.mark.parametrize("rel", ["../outside.png", "sub/../../outside.png"])
def test_manifest_path_escaping_the_data_folder(cli, tmp_path, rel):
    """A relative path that climbs out is refused (an absolute one is read as written: tests/test_slide_scale.py)."""
    root = tmp_path / "d"
    root.mkdir()
    rgb, mask = tissue()
    Image.fromarray(rgb).save(tmp_path / "outside.png")
    Image.fromarray(rgb).save(root / "inside.png")
    (root / "manifest.csv").write_text(f"image,mask,label,split\ninside.png,,A,train\n{rel},,A,train\n")
    res = crops(cli, root, tmp_path / "run")
    assert res.exit_code == 2
    assert f"manifest.csv: line 3: path '{rel}' escapes the data folder" in res.output
    assert "hint: a relative path stays inside the manifest's folder" in " ".join(res.output.split())
    assert not (tmp_path / "run" / store.CROPS_FILE).exists()


def test_manifest_missing_files_and_labels(cli, tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    rgb, mask = tissue()
    for name in ("a", "b", "c"):
        Image.fromarray(rgb).save(root / f"{name}.png")
    Image.fromarray(mask).save(root / "a_m.png")
    (root / "manifest.csv").write_text("image,mask,label,split\na.png,a_m.png,A,train\nb.png,,,train\n"
                                       "gone.png,,A,train\nc.png,c_m.png,A,train\n")
    res = crops(cli, root, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "b.png: training image has no label (line 3); skipped" in res.output
    assert "gone.png: listed on line 4 of manifest.csv but does not exist; skipped" in res.output
    assert "c_m.png: mask of c.png (line 5) does not exist; image skipped" in res.output
    assert crop_ids(tmp_path / "run") == {("train", "a.png")}


def test_malformed_inputs_name_the_file(cli, tmp_path):
    res = crops(cli, tmp_path / "nowhere", tmp_path / "run")
    assert res.exit_code == 2 and "nowhere: data folder not found" in res.output
    (tmp_path / "empty").mkdir()
    res = crops(cli, tmp_path / "empty", tmp_path / "run")
    assert res.exit_code == 2 and "no train_data/, test_data/ or manifest.csv found" in res.output
    data = write_reference(tmp_path / "d")
    (data / "train_labels.csv").write_text("image,class\nimg_0000.png,A\n")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2 and "train_labels.csv: header is image,class; missing column(s) sample_index, label" \
        in res.output
    (data / "train_labels.csv").unlink()
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2 and "train_labels.csv: file not found" in res.output
    (tmp_path / "bad.csv").write_text("image,mask,label,split\na.png,,A,validation\n")
    res = crops(cli, tmp_path / "bad.csv", tmp_path / "run")
    assert res.exit_code == 2 and "line 2: split is 'validation', expected train or test" in res.output


def test_every_image_bad_is_one_clear_error(cli, tmp_path):
    data = write_reference(tmp_path / "d", n_train=2, n_test=0)
    for p in (data / "train_data").glob("mask_*"):
        p.unlink()
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2 and "no usable images found" in res.output and "no mask" in res.output


@pytest.mark.parametrize("spelling", ["Triple Negative", "Triple\u00a0negative", "triple  negative "])
def test_label_spellings_that_differ_only_by_case_or_spaces_stop(cli, tmp_path, spelling):
    data = write_reference(tmp_path / "d", n_train=6)     # img_0001, img_0003, img_0005: Triple negative
    lines = (data / "train_labels.csv").read_text().splitlines()
    lines[6] = f"img_0005.png,{spelling}"
    (data / "train_labels.csv").write_text("\n".join(lines) + "\n")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert f"labels 'Triple negative' (line 3) and {spelling.strip()!r} (line 7) differ only by case or spaces" \
        in res.output
    assert not (tmp_path / "run" / store.CROPS_FILE).exists()
    (tmp_path / "m.csv").write_text("image,mask,label,split\na.png,,Luminal A,train\nb.png,,luminal a,train\n")
    res = crops(cli, tmp_path / "m.csv", tmp_path / "run")
    assert res.exit_code == 2 and "'Luminal A' (line 2) and 'luminal a' (line 3)" in res.output


def test_csv_line_numbers_count_blank_lines(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    (data / "train_labels.csv").write_text("sample_index,label\n\nimg_0000.png,A\n\n\nimg_0000.png,B\n")
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2 and "train_labels.csv: line 6: duplicate id 'img_0000.png'" in res.output


def test_a_symlink_leaving_the_data_folder_is_refused_in_the_reference_layout(cli, tmp_path):
    data = write_reference(tmp_path / "d")
    outside = tmp_path / "elsewhere.png"
    (data / "train_data/img_0002.png").rename(outside)
    (data / "train_data/img_0002.png").symlink_to(outside)
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert "img_0002.png: is a symlink to" in res.output and "outside the data folder" in res.output
    assert not (tmp_path / "run" / store.CROPS_FILE).exists()
    # a symlink that stays inside is fine, and a manifest's symlink out says it is one
    (data / "train_data/img_0002.png").unlink()
    (data / "train_data/img_0002.png").symlink_to(data / "train_data/img_0000.png")
    assert crops(cli, data, tmp_path / "run").exit_code == 0
    root = tmp_path / "m"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    (root / "manifest.csv").write_text("image,mask,label,split\nlink.png,,A,train\n")
    res = crops(cli, root, tmp_path / "run")
    assert res.exit_code == 2 and "line 2: path 'link.png' is a symlink to" in res.output


def test_a_decompression_bomb_is_skipped_from_its_header_and_the_limit_is_an_option(cli, tmp_path):
    from synthetic_inputs import write_blank_png

    data = write_reference(tmp_path / "d", n_train=6)
    write_blank_png(data / "train_data/img_0002.png", 30_000, 30_000, complete=False)   # header only
    write_blank_png(data / "train_data/mask_0002.png", 30_000, 30_000, complete=False)
    res = crops(cli, data, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "img_0002.png: image is 30000x30000 = 900,000,000 pixels, over the limit of 64,000,000" in res.output
    assert ("train", "img_0002.png") not in crop_ids(tmp_path / "run")
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--no-embed")
    assert res.exit_code == 0 and "over the limit of 64,000,000" in res.output
    # The limit is an option and a setting: every other image is 120x96 = 11,520 pixels.
    res = crops(cli, data, tmp_path / "run", "--max-pixels", 10_000)
    assert res.exit_code == 2 and "no usable images found" in res.output and "over the limit of 10,000" in res.output
    (tmp_path / "histoembed.toml").write_text("[data]\nmax_pixels = 10000\n")
    res = crops(cli, data, tmp_path / "run", "--config", tmp_path / "histoembed.toml")
    assert res.exit_code == 2 and "over the limit of 10,000" in res.output
    res = crops(cli, data, tmp_path / "run", "--config", tmp_path / "histoembed.toml", "--max-pixels", 20_000)
    assert res.exit_code == 0
    assert crop_ids(tmp_path / "run") == ({("train", f"img_{i:04d}.png") for i in (0, 1, 3, 4, 5)}
                                          | {("test", "img_0000.png"), ("test", "img_0001.png")})


# ---------------------------------------------------------------- pixel formats

@pytest.fixture
def rgb() -> np.ndarray:
    a = np.zeros((20, 30, 3), np.uint8)
    a[..., 0] = np.arange(30, dtype=np.uint8)[None, :] * 8
    a[..., 1] = 100
    a[..., 2] = np.arange(20, dtype=np.uint8)[:, None] * 12
    return a


def test_rgb_png_jpeg_tiff(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.tif")
    Image.fromarray(rgb).save(tmp_path / "a.tiff", compression="tiff_lzw")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=100)
    for name in ("a.png", "a.tif", "a.tiff"):
        out = read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and np.array_equal(out, rgb), name
    jpg = read_image(tmp_path / "a.jpg")
    assert jpg.shape == (20, 30, 3) and np.abs(jpg.astype(int) - rgb).mean() < 3


def test_grayscale_and_16_bit(tmp_path):
    gray = (np.arange(200, dtype=np.uint8).reshape(10, 20))
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (10, 20, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    deep = (np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)  # up to 59,700 of 65,535
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = read_image(tmp_path / "d.png")
    expect = np.round(deep / 65535 * 255).astype(np.uint8)
    assert out.dtype == np.uint8 and np.array_equal(out[..., 0], expect)
    Image.fromarray(deep).save(tmp_path / "d.tif")
    assert np.array_equal(read_image(tmp_path / "d.tif")[..., 1], expect)
    # a 16-bit mask of 0/65535 and a 0/1 mask both keep their shape
    m16 = np.zeros((10, 20), np.uint16)
    m16[2:5, 3:9] = 65535
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert np.array_equal(read_mask(tmp_path / "m16.png") > 0, m16 > 0)
    assert read_mask(tmp_path / "m16.png").max() == 255


def test_rgba_composited_on_white_and_palette(tmp_path, rgb):
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:5, :, 3] = 0  # transparent rows read as white slide background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (20, 30, 3)
    assert (out[:5] == 255).all() and np.array_equal(out[5:], rgb[5:])
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    # a palette mask: index 0 black, index 1 a colour
    pm = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    pm.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pm.save(tmp_path / "pm.png")
    assert np.array_equal(read_mask(tmp_path / "pm.png") > 0, np.array([[False, True], [True, False]]))
    # a mask with alpha: alpha does not count
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 1] = 255
    la[1, 1, 0] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (read_mask(tmp_path / "la.png") > 0).sum() == 1


def test_formats_through_the_crops_stage(cli, tmp_path, rgb):
    """A dataset mixing grayscale, RGBA, palette, 16-bit PNGs, JPEG and TIFF crops without a problem."""
    root = tmp_path / "mixed"
    root.mkdir()
    base, mask = tissue(64, 64)
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(base).save(root / "rgb.tif")
    Image.fromarray(base).save(root / "rgb.jpg")
    Image.fromarray(base[..., 1]).save(root / "gray.png")
    Image.fromarray(base.astype(np.uint16)[..., 1] * 257).save(root / "deep.png")
    Image.fromarray(np.dstack([base, np.full((64, 64), 255, np.uint8)]), "RGBA").save(root / "rgba.png")
    Image.fromarray(base).quantize(colors=32).save(root / "pal.png")
    names = ["rgb.tif", "rgb.jpg", "gray.png", "deep.png", "rgba.png", "pal.png"]
    (root / "manifest.csv").write_text("image,mask,label,split\n" + "".join(f"{n},mask.png,A,train\n" for n in names))
    res = crops(cli, root, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "skipped" not in res.output
    assert crop_ids(tmp_path / "run") == {("train", n) for n in names}


def test_load_dataset_strict_raises_user_error(tmp_path):
    data = write_reference(tmp_path / "d")
    (data / "train_data/mask_0000.png").unlink()
    with pytest.raises(UserError, match="1 problem"):
        load_dataset(data, strict=True)


def test_a_labels_file_or_manifest_linked_out_of_the_data_folder_is_refused_unread(cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the first line of a private file\nimg_0000.png,A\n")
    data = write_reference(tmp_path / "d")
    (data / "train_labels.csv").unlink()
    (data / "train_labels.csv").symlink_to(secret)
    res = crops(cli, data, tmp_path / "run")
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "train_labels.csv: is a symlink to" in text and "outside the data folder" in text
    assert "root:x" not in res.output and "private" not in res.output
    assert not (tmp_path / "run" / store.CROPS_FILE).exists()
    root = tmp_path / "m"
    root.mkdir()
    (root / "manifest.csv").symlink_to(secret)
    for data_arg in (root, root / "manifest.csv"):
        res = crops(cli, data_arg, tmp_path / "run")
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "manifest.csv: is a symlink to" in text and "root:x" not in res.output
    with pytest.raises(UserError, match="outside the data folder"):
        submission_ids(root)
    # a link that stays inside the data folder is fine
    (data / "train_labels.csv").unlink()
    (data / "labels-v2.csv").write_text("sample_index,label\n" + "".join(
        f"img_{i:04d}.png,{LABELS[i % 2]}\n" for i in range(4)))
    (data / "train_labels.csv").symlink_to(data / "labels-v2.csv")
    assert crops(cli, data, tmp_path / "run").exit_code == 0

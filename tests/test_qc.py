"""QC: colour flags, ink repair, near-duplicates, the embedding pass and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoembed import pixels, qc, store
from histoembed.config import QCSettings

LABELS = ("Luminal A", "Luminal B")


# ---------------------------------------------------------------- tiny data

def tissue_image(rng, h=160, w=200):
    """White slide, an irregular pink tissue region with purple nuclei; and its mask."""
    img = np.full((h, w, 3), 245, np.float32) + rng.normal(0, 2, (h, w, 3))
    region = np.zeros((h, w), np.uint8)
    cy, cx = h / 2 + rng.uniform(-10, 10), w / 2 + rng.uniform(-10, 10)
    cv2.ellipse(region, (int(cx), int(cy)), (int(w * rng.uniform(.28, .4)), int(h * rng.uniform(.28, .4))),
                float(rng.uniform(0, 180)), 0, 360, 1, -1)
    tex = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2)
    tex = tex / (tex.std() + 1e-6)
    eosin = np.array([235, 150, 200], np.float32) + rng.normal(0, 8, 3)
    img = np.where(region[..., None] > 0, eosin + 12 * tex[..., None], img)
    for _ in range(int(rng.integers(40, 80))):
        y, x = rng.integers(0, h), rng.integers(0, w)
        if region[y, x]:
            cv2.circle(img, (int(x), int(y)), int(rng.integers(2, 4)), (110, 60, 150), -1)
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return img, (region * 255).astype(np.uint8)


def cartoon_image(h=160, w=200):
    """Flat, saturated shapes on a sky-blue ground: a pasted picture, not tissue."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (90, 170, 240)
    cv2.circle(img, (w // 2, h // 2), 50, (90, 200, 60), -1)     # green face
    cv2.circle(img, (w // 2 - 15, h // 2 - 10), 8, (255, 255, 255), -1)
    cv2.rectangle(img, (20, h - 40), (w - 20, h - 10), (240, 200, 40), -1)  # yellow
    return img


def add_ink(img, rng):
    """A green marker stroke across the image."""
    out = img.copy()
    h, w = img.shape[:2]
    pts = np.array([[10, h // 3], [w // 2, h // 2 + 10], [w - 10, h // 3 + 5]], np.int32)
    cv2.polylines(out, [pts], False, (40, 170, 60), thickness=9)
    return out


def write_dataset(root: Path, images: dict[str, tuple[np.ndarray, np.ndarray]], test: set[str] = frozenset()):
    """Reference layout: train_data/ and test_data/ (img_X.png + mask_X.png), train_labels.csv."""
    rows = ["sample_index,label"]
    for n, (img, mask) in enumerate(sorted(images.items())):
        image_id, (rgb, m) = img, mask
        split = "test" if image_id in test else "train"
        folder = root / f"{split}_data"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / image_id)
        Image.fromarray(m).save(folder / image_id.replace("img_", "mask_"))
        if split == "train":
            rows.append(f"{image_id},{LABELS[n % 2]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def clean_images(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f"img_{i:04d}.png": tissue_image(rng) for i in range(n)}


def planted_dataset(root: Path, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """The synthetic dataset with its planted non-tissue picture, ink smear and empty mask; kind per planted id."""
    from histoembed.synthetic import make_dataset

    make_dataset(root, 16, 4, seed, outliers=True)
    planted = json.loads((root / "planted.json").read_text())
    return root, _planted_kinds(planted)


def _planted_kinds(planted) -> dict[str, str]:
    """planted.json as {image_id: flag}; accepts {id: kind} or a list of {image_id, kind}."""
    if isinstance(planted, dict):
        items = planted.items()
    else:
        items = [(p.get("image_id") or p.get("id"), p.get("kind")) for p in planted]
    flag = {"cartoon": "non_tissue", "non_tissue": "non_tissue", "non-tissue": "non_tissue",
            "ink": "ink", "green_ink": "ink", "green-ink": "ink",
            "empty_mask": "blank", "empty-mask": "blank", "blank": "blank"}
    return {i: flag.get(k, k) for i, k in items}


def read_rows(run: Path) -> dict[str, dict]:
    t = pq.read_table(run / store.QC_FILE).to_pylist()
    return {r["image_id"]: r for r in t}


# ---------------------------------------------------------------- the judged cases

def test_planted_outliers_flagged_for_the_right_reason_and_nothing_else(cli, tmp_path):
    data, planted = planted_dataset(tmp_path / "data")
    run = tmp_path / "run"
    res = cli("qc", "--data", data, "--run", run, "--no-embed")
    assert res.exit_code == 0, res.output
    rows = read_rows(run)
    for image_id, flag in planted.items():
        assert rows[image_id][flag], (image_id, flag, rows[image_id]["reason"])
        assert rows[image_id]["flagged"]
        assert rows[image_id]["reason"].startswith(flag) or f"; {flag}" in rows[image_id]["reason"]
    clean = {i: r for i, r in rows.items() if i not in planted}
    assert clean and not any(r["flagged"] for r in clean.values()), \
        [(i, r["reason"]) for i, r in clean.items() if r["flagged"]]
    # an ink smear on tissue is ink, not non-tissue; a cartoon is non-tissue
    ink_id = next(i for i, f in planted.items() if f == "ink")
    assert not rows[ink_id]["non_tissue"]
    assert "flagged (left out of training)" in res.output


def test_default_embedding_pass_flags_no_clean_image(cli, tmp_path):
    data, planted = planted_dataset(tmp_path / "data", seed=2)
    res = cli("qc", "--data", data, "--run", tmp_path / "run")   # efficientnet-lite0 thumbnails
    assert res.exit_code == 0, res.output
    assert "efficientnet-lite0" in res.output
    rows = read_rows(tmp_path / "run")
    assert all(r["knn_z"] is not None for r in rows.values())
    assert not [i for i, r in rows.items() if i not in planted and r["flagged"]]


def _restained_ihc():
    """scikit-image's real IHC section, its haematoxylin and DAB re-rendered as H&E."""
    import skimage.color as sc
    import skimage.data as sd

    hed = sc.rgb2hed(sd.immunohistochemistry())
    h, d = hed[..., 0], hed[..., 2]
    e = np.clip(cv2.GaussianBlur((h + d).astype(np.float32), (0, 0), 3) * 0.4 + 0.03, 0, None)
    return (np.clip(sc.hed2rgb(np.stack([h, e, np.zeros_like(h)], -1)), 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field"])
def test_real_photographs_are_non_tissue(name):
    import skimage.data as sd

    rgb = np.asarray(getattr(sd, name)())[..., :3]
    small, _ = qc.downscale(rgb)
    non_tissue, _, _, reasons = qc.colour_flags(qc.colour_scores(small, None, QCSettings()), QCSettings())
    assert non_tissue, reasons


def test_tissue_is_not_non_tissue():
    settings = QCSettings()
    rng = np.random.default_rng(3)
    images = [tissue_image(rng)[0] for _ in range(10)] + [_restained_ihc()]
    for rgb in images:
        small, _ = qc.downscale(rgb)
        non_tissue, ink, _, reasons = qc.colour_flags(qc.colour_scores(small, None, settings), settings)
        assert not non_tissue and not ink, reasons


# ---------------------------------------------------------------- ink repair

def test_repair_ink_removes_green_and_leaves_the_rest():
    settings = QCSettings()
    rng = np.random.default_rng(1)
    img, mask = tissue_image(rng)
    inked = add_ink(img, rng)
    ink = pixels.ink_mask(inked, settings)
    assert ink.mean() > 0.01
    repaired, new_mask = pixels.repair_ink(inked, mask, settings)
    assert repaired.shape == inked.shape and new_mask.shape == mask.shape
    assert not pixels.ink_mask(repaired, settings).any()               # no green ink anywhere
    hue, sat, _ = pixels.to_hsv(repaired)
    green = pixels.hue_in(hue, settings.green_hue) & (sat >= settings.min_saturation)
    assert not (green & (new_mask > 0)).any()                     # no green pixel left in the mask
    assert not (new_mask[ink] > 0).any()                          # ink removed from the mask
    far = cv2.dilate(ink.astype(np.uint8), np.ones((7, 7), np.uint8)) == 0
    assert np.array_equal(repaired[far], inked[far])              # elsewhere unchanged
    assert np.array_equal(new_mask[far], mask[far])
    assert pixels.ink_mask(inked, settings).sum() == ink.sum()        # the input was not modified


def test_repair_ink_without_ink_is_a_copy():
    img, mask = tissue_image(np.random.default_rng(2))
    repaired, new_mask = pixels.repair_ink(img, mask, QCSettings())
    assert np.array_equal(repaired, img) and np.array_equal(new_mask, mask)


# ---------------------------------------------------------------- near-duplicates

def test_copies_and_recompressed_copies_are_grouped(cli, tmp_path):
    images = clean_images(10, seed=5)
    src, mask = images["img_0002.png"]
    images["img_0050.png"] = (src.copy(), mask.copy())                       # exact copy
    other, omask = images["img_0004.png"]
    small = cv2.resize(other, (180, 144), interpolation=cv2.INTER_AREA)      # resized ...
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG", quality=70)               # ... and JPEG-recompressed
    near = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    images["img_0051.png"] = (near, cv2.resize(omask, (180, 144), interpolation=cv2.INTER_NEAREST))
    data = write_dataset(tmp_path / "data", images, test={"img_0051.png"})
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--no-embed")
    assert res.exit_code == 0, res.output
    rows = read_rows(tmp_path / "run")
    g = {i: r["duplicate_group"] for i, r in rows.items()}
    assert g["img_0002.png"] is not None and g["img_0002.png"] == g["img_0050.png"]
    assert g["img_0004.png"] is not None and g["img_0004.png"] == g["img_0051.png"]
    assert g["img_0002.png"] != g["img_0004.png"]
    assert sum(v is not None for v in g.values()) == 4                     # nothing else grouped
    assert not any(r["flagged"] for r in rows.values())                     # groups are not flags
    assert "img_0050.png" in rows["img_0002.png"]["reason"]


def test_duplicate_groups_union_find():
    pairs = [(0, 3, ""), (3, 5, ""), (1, 2, "")]
    assert qc.duplicate_groups(6, pairs) == [0, 1, 1, 0, None, 0]


# ---------------------------------------------------------------- the embedding pass

def test_embedding_outlier_and_duplicate(cli, tmp_path, monkeypatch, tiny_dinov2):
    images = clean_images(14, seed=7)
    data = write_dataset(tmp_path / "data", images)
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    vectors = {i: base + 0.3 * rng.normal(size=16) for i in images}
    vectors["img_0005.png"] = -3 * base + rng.normal(size=16)          # far from everything
    vectors["img_0009.png"] = vectors["img_0008.png"] + 1e-4           # same embedding
    # The thumbnails' embeddings, in image order, stand in for the encoder's.
    monkeypatch.setattr(qc, "_embed_thumbnails", lambda enc, thumbs: np.stack([vectors[i] for i in sorted(images)]))
    run = tmp_path / "run"
    res = cli("qc", "--data", data, "--run", run, "--encoder", tiny_dinov2)
    assert res.exit_code == 0, res.output
    rows = read_rows(run)
    assert rows["img_0005.png"]["outlier"] and rows["img_0005.png"]["flagged"]
    assert "outlier" in rows["img_0005.png"]["reason"]
    assert sum(bool(r["outlier"]) for r in rows.values()) == 1
    assert rows["img_0008.png"]["duplicate_group"] is not None
    assert rows["img_0008.png"]["duplicate_group"] == rows["img_0009.png"]["duplicate_group"]
    assert "cosine" in rows["img_0008.png"]["reason"]


def test_no_embed_leaves_outlier_null(cli, tmp_path):
    data = write_dataset(tmp_path / "data", clean_images(8))
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--no-embed")
    assert res.exit_code == 0, res.output
    t = pq.read_table(tmp_path / "run" / store.QC_FILE)
    assert t["outlier"].null_count == t.num_rows
    assert t.schema.names[:len(store.QC_SCHEMA)] == store.QC_SCHEMA.names
    assert t.schema.field("duplicate_group").type == pa.int32()


def test_unloadable_encoder_warns_and_still_writes(cli, tmp_path):
    data = write_dataset(tmp_path / "data", clean_images(8))
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--encoder", str(tmp_path / "no-such-model"))
    assert res.exit_code == 0, res.output
    assert "embedding pass skipped" in res.output and "--no-embed" in res.output
    t = pq.read_table(tmp_path / "run" / store.QC_FILE)
    assert t.num_rows == 8 and t["outlier"].null_count == 8
    stamp = (tmp_path / "run" / store.QC_FILE).stat().st_mtime_ns   # still unloadable: nothing to redo
    again = cli("qc", "--data", data, "--run", tmp_path / "run", "--encoder", str(tmp_path / "no-such-model"))
    assert again.exit_code == 0 and "up to date" in again.output
    assert (tmp_path / "run" / store.QC_FILE).stat().st_mtime_ns == stamp


def test_thumbnails_through_a_tiny_encoder(cli, tmp_path, tiny_dinov2):
    data = write_dataset(tmp_path / "data", clean_images(8))
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--encoder", str(tiny_dinov2))
    assert res.exit_code == 0, res.output
    t = pq.read_table(tmp_path / "run" / store.QC_FILE)
    assert t["outlier"].null_count == 0 and t["knn_z"].null_count == 0
    assert "thumbnails" in res.output


# ---------------------------------------------------------------- CLI behaviour

def test_keep_unflags_one_image_and_unknown_ids_are_refused(cli, tmp_path):
    data, planted = planted_dataset(tmp_path / "data")
    target = next(iter(planted))
    run = tmp_path / "run"
    res = cli("qc", "--data", data, "--run", run, "--no-embed", "--keep", target)
    assert res.exit_code == 0, res.output
    rows = read_rows(run)
    assert not rows[target]["flagged"] and "kept (--keep)" in rows[target]["reason"]
    assert rows[target][planted[target]]            # the flag itself is still reported
    assert all(rows[i]["flagged"] for i in planted if i != target)
    bad = cli("qc", "--data", data, "--run", run, "--no-embed", "--keep", "img_9999.png")
    assert bad.exit_code == 2 and "img_9999.png" in bad.output


def test_rerun_with_unchanged_inputs_does_nothing(cli, tmp_path):
    images = clean_images(8)
    data = write_dataset(tmp_path / "data", images)
    run = tmp_path / "run"
    assert cli("qc", "--data", data, "--run", run, "--no-embed").exit_code == 0
    stamp = (run / store.QC_FILE).stat().st_mtime_ns
    again = cli("qc", "--data", data, "--run", run, "--no-embed")
    assert again.exit_code == 0 and "up to date" in again.output
    assert (run / store.QC_FILE).stat().st_mtime_ns == stamp
    changed = cli("qc", "--data", data, "--run", run, "--no-embed", "--ink-fraction", "0.02")
    assert changed.exit_code == 0 and "up to date" not in changed.output
    assert store.read_meta(run / store.QC_FILE)["settings"]["ink_fraction"] == 0.02


def test_unreadable_image_is_listed_and_skipped(cli, tmp_path):
    data = write_dataset(tmp_path / "data", clean_images(6))
    bad = data / "train_data" / "img_0002.png"
    bad.write_bytes(bad.read_bytes()[:200])          # truncated: the header still reads
    (data / "train_data" / "mask_0004.png").unlink()  # no mask: the dataset layer skips it
    run = tmp_path / "run"
    res = cli("qc", "--data", data, "--run", run, "--no-embed")
    assert res.exit_code == 0, res.output
    assert "img_0002.png" in res.output and "could not be read" in res.output
    assert "mask_0004" in res.output
    assert "img_0002.png" not in read_rows(run) and len(read_rows(run)) == 4
    strict = cli("qc", "--data", data, "--run", tmp_path / "run2", "--no-embed", "--strict")
    assert strict.exit_code == 2 and "mask_0004.png" in strict.output
    Image.fromarray(np.zeros((160, 200), np.uint8)).save(data / "train_data" / "mask_0004.png")
    strict = cli("qc", "--data", data, "--run", tmp_path / "run2", "--no-embed", "--strict")
    assert strict.exit_code == 2 and "img_0002.png" in strict.output
    assert not (tmp_path / "run2" / store.QC_FILE).exists()


def test_read_qc(tmp_path):
    assert store.read_qc(tmp_path) is None
    data = write_dataset(tmp_path / "data", clean_images(6))
    result = qc.run_qc(data, tmp_path / "run", QCSettings(), embed=False)
    assert store.read_qc(tmp_path / "run").num_rows == result.table.num_rows == 6


def test_the_library_prints_nothing_and_returns_what_to_say(tmp_path, capfd):
    """A notebook calling run_qc gets no stray output; the encoder problem comes back for the caller to show."""
    data = write_dataset(tmp_path / "data", clean_images(6))
    result = qc.run_qc(data, tmp_path / "run", QCSettings(encoder=str(tmp_path / "no-such-model"), workers=1))
    assert result.warning and "could not be loaded" in result.warning and "--no-embed" in result.warning
    again = qc.run_qc(data, tmp_path / "run", QCSettings(encoder=str(tmp_path / "no-such-model"), workers=1))
    assert again.skipped and again.warning == result.warning
    out, err = capfd.readouterr()
    assert out == "" and err == ""

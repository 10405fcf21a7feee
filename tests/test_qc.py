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

from histoembed.inputs import provenance
from histoembed.stages import qc
from histoembed.core import store
from histoembed.core.config import QCSettings
from histoembed.inputs import pixels

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


def write_dataset(root: Path, images: dict[str, tuple[np.ndarray, np.ndarray]],
                  test: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
    """Reference layout: ``images`` in train_data/, ``test`` in test_data/ (both from img_0000.png), labels."""
    rows = ["sample_index,label"]
    for split, items in (("train", images), ("test", test or {})):
        folder = root / f"{split}_data"
        folder.mkdir(parents=True, exist_ok=True)
        for n, (image_id, (rgb, m)) in enumerate(sorted(items.items())):
            Image.fromarray(rgb).save(folder / image_id)
            Image.fromarray(m).save(folder / image_id.replace("img_", "mask_"))
            if split == "train":
                rows.append(f"{image_id},{LABELS[n % 2]}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def clean_images(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f"img_{i:04d}.png": tissue_image(rng) for i in range(n)}


def planted_dataset(root: Path, seed: int = 0, **kwargs) -> tuple[Path, dict[str, str]]:
    """The synthetic dataset with its planted cartoon (a mask twin), ink smear, empty mask and test near-copy;
    the flag of each planted training image."""
    from histoembed.tools.synthetic import make_dataset

    make_dataset(root, kwargs.pop("n_train", 16), kwargs.pop("n_test", 4), seed, outliers=True, **kwargs)
    planted = json.loads((root / "planted.json").read_text())
    return root, dict(planted["flags"])


def read_rows(run: Path, split: str = "train") -> dict[str, dict]:
    """{image_id: row} of one split's rows of qc.parquet."""
    t = pq.read_table(run / store.QC_FILE).to_pylist()
    return {r["image_id"]: r for r in t if r["split"] == split}


def read_all(run: Path) -> dict[tuple[str, str], dict]:
    """{(split, image_id): row} of qc.parquet."""
    return {(r["split"], r["image_id"]): r for r in pq.read_table(run / store.QC_FILE).to_pylist()}


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
    everything = read_all(run)
    clean = {k: r for k, r in everything.items() if not (k[0] == "train" and k[1] in planted)}
    assert len(clean) == len(everything) - len(planted) and any(k[0] == "test" for k in clean)
    assert not any(r["flagged"] for r in clean.values()), \
        [(k, r["reason"]) for k, r in clean.items() if r["flagged"]]
    # an ink smear on tissue is ink, not non-tissue; a cartoon is non-tissue
    ink_id = next(i for i, f in planted.items() if f == "ink")
    assert not rows[ink_id]["non_tissue"]
    assert "flagged (left out of training)" in res.output


def test_default_embedding_pass_flags_no_clean_image(cli, tmp_path):
    data, planted = planted_dataset(tmp_path / "data", seed=2)
    res = cli("qc", "--data", data, "--run", tmp_path / "run")   # efficientnet-lite0 thumbnails
    assert res.exit_code == 0, res.output
    assert "efficientnet-lite0" in res.output
    rows = read_all(tmp_path / "run")
    assert all(r["knn_z"] is not None for r in rows.values())
    assert not [k for k, r in rows.items() if not (k[0] == "train" and k[1] in planted) and r["flagged"]]
    # with embeddings too: the planted test copy is the only leak, the planted mask twin the only pair
    truth = json.loads((data / "planted.json").read_text())
    assert {(i, r["near_train"]) for (_, i), r in rows.items() if r["near_train"]} == \
        {tuple(p) for p in truth["near_duplicates"]}
    [(test_copy, _)] = truth["near_duplicates"]
    assert rows["test", test_copy]["near_train_cosine"] > 0.9
    assert {tuple(sorted((i, j))) for (_, i), r in rows.items() for j in r["mask_twin"] or []} == \
        {tuple(sorted(p)) for p in truth["mask_twins"]}


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

def test_copies_are_grouped_and_test_copies_of_training_images_are_listed_as_leakage(cli, tmp_path):
    images = clean_images(10, seed=5)
    test = clean_images(5, seed=6)                                          # named img_0000.. like training images
    src, mask = images["img_0002.png"]
    images["img_0050.png"] = (src.copy(), mask.copy())                       # exact copy, in training
    other, omask = images["img_0004.png"]
    small = cv2.resize(other, (180, 144), interpolation=cv2.INTER_AREA)      # resized ...
    buf = io.BytesIO()
    Image.fromarray(small).save(buf, format="JPEG", quality=70)               # ... and JPEG-recompressed
    near = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    test["img_0001.png"] = (near, cv2.resize(omask, (180, 144), interpolation=cv2.INTER_NEAREST))
    data = write_dataset(tmp_path / "data", images, test)
    res = cli("qc", "--data", data, "--run", tmp_path / "run", "--no-embed")
    assert res.exit_code == 0, res.output
    rows = read_all(tmp_path / "run")
    g = {k: r["duplicate_group"] for k, r in rows.items()}
    assert g["train", "img_0002.png"] is not None and g["train", "img_0002.png"] == g["train", "img_0050.png"]
    assert sum(v is not None for v in g.values()) == 2                     # nothing else grouped
    assert not any(r["flagged"] for r in rows.values())                     # groups and leaks are not flags
    assert "img_0050.png" in rows["train", "img_0002.png"]["reason"]
    # the test copy is listed with its training original, and nothing else is
    leak = rows["test", "img_0001.png"]
    assert leak["near_train"] == "img_0004.png" and leak["near_train_hash_distance"] <= 24
    assert leak["near_train_cosine"] is None                                 # no embedding pass
    assert "possible leakage: near-duplicate of training image img_0004.png" in leak["reason"]
    assert [k for k, r in rows.items() if r["near_train"]] == [("test", "img_0001.png")]
    assert "test image(s) img_0001.png nearly duplicate" in rows["train", "img_0004.png"]["reason"]
    assert "possible leakage: 1 test image(s)" in res.output and "test img_0001.png ~ train img_0004.png" in res.output
    # the test image named like the training original is not confused with it
    assert rows["test", "img_0004.png"]["near_train"] is None


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

def test_mask_twins_are_paired_and_the_pasted_one_is_flagged(cli, tmp_path):
    data, planted = planted_dataset(tmp_path / "data", seed=4, n_train=30, n_test=6, mask_twins=3,
                                    near_duplicates=2)
    truth = json.loads((data / "planted.json").read_text())
    run = tmp_path / "run"
    res = cli("qc", "--data", data, "--run", run, "--no-embed")
    assert res.exit_code == 0, res.output
    rows = read_all(run)
    found = {tuple(sorted((i, j))) for (split, i), r in rows.items() for j in r["mask_twin"] or []}
    assert found == {tuple(sorted(p)) for p in truth["mask_twins"]}          # none missed, no false pair
    assert all(split == "train" for (split, _), r in rows.items() if r["mask_twin"])
    for cartoon, source in truth["mask_twins"]:
        assert rows["train", cartoon]["flagged"] and rows["train", cartoon]["non_tissue"]
        assert f"byte-identical to that of {source}" in rows["train", cartoon]["reason"]
        assert not rows["train", source]["flagged"]
        assert f"mask twin: the mask file is byte-identical to that of {cartoon}" in rows["train", source]["reason"]
        assert f"{min(cartoon, source)} = {max(cartoon, source)}" in res.output
    leaks = {(i, r["near_train"]) for (split, i), r in rows.items() if r["near_train"]}
    assert leaks == {tuple(p) for p in truth["near_duplicates"]}             # none missed, no false pair
    assert all(rows["test", t]["flagged"] is False for t, _ in leaks)       # listed, never dropped
    assert len(rows) == 36   # every image of both splits has its row, names shared across splits included


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


def test_qc_records_the_bytes_it_checked_and_an_older_table_without_them_is_redone(cli, tmp_path):
    """crops compares these stamps with the data it cuts (issue 23); a table without them is checked again."""
    import hashlib

    data = write_dataset(tmp_path / "data", clean_images(4))
    run = tmp_path / "run"
    assert cli("qc", "--data", data, "--run", run, "--no-embed").exit_code == 0
    meta = store.read_meta(run / store.QC_FILE)
    stamps = {(split, image_id): (image, mask) for split, image_id, image, mask in meta[provenance.SAMPLE_STAMPS]}
    image = data / "train_data" / "img_0000.png"
    assert stamps[("train", "img_0000.png")][0] == hashlib.sha256(image.read_bytes()).hexdigest()
    del meta[provenance.SAMPLE_STAMPS]
    table = pq.read_table(run / store.QC_FILE)
    pq.write_table(table.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), run / store.QC_FILE)
    again = cli("qc", "--data", data, "--run", run, "--no-embed")
    assert again.exit_code == 0 and "up to date" not in again.output
    assert provenance.SAMPLE_STAMPS in store.read_meta(run / store.QC_FILE)


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

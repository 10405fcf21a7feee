"""The embed stage: exact features, batch-size independence, resume after kill -9, shards, the store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from histoembed.core import feature_store, store
from histoembed.core.config import AugmentSettings, EmbedSettings
from histoembed.core.errors import UserError
from histoembed.stages.embed import read_store, run_embed
from histoembed.engines.base import STOP_AFTER_ENV
from histoembed.engines.forward import embed_crops
from histoembed.models.encoders import load_encoder


def write_crops(run: Path, n_train: int = 5, n_test: int = 2, per_image: int = 3, size: int = 32,
                seed: int = 0) -> np.ndarray:
    """A crops.parquet of random crops, as the crops stage writes it; returns the crops [N, H, W, 3].

    Both splits number from img_0000.png, as in the real challenge.
    """
    rng = np.random.default_rng(seed)
    ids = [f"img_{i:04d}.png" for i in [*range(n_train), *range(n_test)] for _ in range(per_image)]
    n = len(ids)
    crops = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    pngs = [cv2.imencode(".png", cv2.cvtColor(c, cv2.COLOR_RGB2BGR))[1].tobytes() for c in crops]
    train = [i < n_train * per_image for i in range(n)]
    table = pa.table({
        "image_id": pa.array(ids, pa.string()),
        "split": pa.array(["train" if t else "test" for t in train], pa.string()),
        "label": pa.array(["A" if t else None for t in train], pa.string()),
        "crop_index": pa.array([i % per_image for i in range(n)], pa.int32()),
        **{c: pa.array(np.zeros(n, np.int32)) for c in ("x0", "y0", "x1", "y1")},
        "tissue_fraction": pa.array(np.ones(n, np.float32)),
        "strategy": pa.array(["blobs"] * n, pa.string()),
        "scale": pa.array(np.ones(n, np.float32)),
        "png": pa.array(pngs, pa.binary()),
    }, schema=store.CROPS_SCHEMA)
    store.write_table(table, run / store.CROPS_FILE, meta={"key": store.config_key("test-crops", seed, n, size)},
                      row_group_size=16)
    return crops


def settings(encoder: Path, **kw) -> EmbedSettings:
    return EmbedSettings(**{"encoder": str(encoder), "workers": 0, "repeats": 2, **kw})


def sorted_rows(f: feature_store.Features):
    order = np.lexsort((f.view, f.crop_index, f.image_id.astype(str), f.split != "train"))
    return [tuple(r) for r in zip(f.image_id[order], f.split[order], f.crop_index[order], f.view[order])], \
        f.embedding[order]


def test_view_0_is_the_cls_token_of_a_direct_transformers_forward(tmp_path, tiny_dinov2):
    from transformers import Dinov2Model

    crops = write_crops(tmp_path)
    run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    feats = read_store(tmp_path)
    view0 = feats.subset(feats.view == 0)
    assert len(view0) == len(crops)

    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0].numpy()
    # crops.parquet rows are image-major with crop_index 0..2, the same order as `crops`
    order = np.lexsort((view0.crop_index, view0.image_id.astype(str), view0.split != "train"))
    np.testing.assert_allclose(view0.embedding[order], cls, atol=1e-4, rtol=0)
    augmented = feats.subset(feats.view == 1)
    assert not np.allclose(augmented.embedding[np.lexsort((augmented.crop_index, augmented.image_id.astype(str),
                                                           augmented.split != "train"))],
                           cls, atol=1e-3)


def test_the_same_features_for_batch_sizes_1_7_and_32(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    results = []
    for bs in (1, 7, 32):
        run = tmp_path / f"bs{bs}"
        run.mkdir()
        (run / store.CROPS_FILE).write_bytes((tmp_path / store.CROPS_FILE).read_bytes())
        run_embed(run, settings(tiny_dinov2, repeats=3, batch_size=bs), AugmentSettings())
        results.append(sorted_rows(read_store(run)))
    for rows, emb in results[1:]:
        assert rows == results[0][0]
        np.testing.assert_allclose(emb, results[0][1], atol=1e-5, rtol=0)


def test_worker_processes_decode_the_same_crops(tmp_path, tiny_dinov2):
    write_crops(tmp_path, n_train=3, n_test=1)
    run_embed(tmp_path, settings(tiny_dinov2, batch_size=4), AugmentSettings())
    inline = sorted_rows(read_store(tmp_path))
    other = tmp_path / "workers"
    other.mkdir()
    (other / store.CROPS_FILE).write_bytes((tmp_path / store.CROPS_FILE).read_bytes())
    run_embed(other, settings(tiny_dinov2, batch_size=4, workers=2), AugmentSettings())
    rows, emb = sorted_rows(read_store(other))
    assert rows == inline[0]
    np.testing.assert_allclose(emb, inline[1], atol=1e-5, rtol=0)


def test_test_crops_get_the_same_views_only_with_tta(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    run_embed(tmp_path, settings(tiny_dinov2, repeats=3, tta=False), AugmentSettings())
    f = read_store(tmp_path)
    assert set(f.view[f.split == "test"]) == {0}
    assert set(f.view[f.split == "train"]) == {0, 1, 2}
    run_embed(tmp_path, settings(tiny_dinov2, repeats=3, tta=True), AugmentSettings())
    f = read_store(tmp_path)
    assert set(f.view[f.split == "test"]) == {0, 1, 2}


def test_a_finished_run_does_nothing_and_changed_settings_never_mix(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    first = run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    assert not first.skipped and first.new_rows == first.rows == 21 * 2
    again = run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    assert again.skipped and again.new_rows == 0
    changed = run_embed(tmp_path, settings(tiny_dinov2, seed=5), AugmentSettings())
    assert not changed.skipped and changed.removed_parts >= 1 and changed.new_rows == 42
    f = read_store(tmp_path)
    assert len(f) == 42 and {m for m in [f.meta["seed"]]} == {5}


def test_the_store_records_its_provenance_and_float16_on_request(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    f32 = read_store(tmp_path)
    meta = f32.meta
    assert meta["encoder"] == str(tiny_dinov2) and meta["dim"] == 32 and meta["pool"] == "cls"
    assert meta["weights_hash"] == load_encoder(str(tiny_dinov2)).weights_hash
    assert meta["augment"] == AugmentSettings().model_dump(mode="json") and meta["seed"] == 0
    assert meta["repeats"] == 2 and meta["package_version"]
    part = feature_store.feature_parts(f32_dir := feature_store.find_feature_store(tmp_path))[0]
    assert pa.types.is_fixed_size_list(pa.parquet.read_schema(part).field("embedding").type)
    run_embed(tmp_path, settings(tiny_dinov2, store_dtype="float16"), AugmentSettings())
    f16 = read_store(tmp_path)
    assert f16.embedding.dtype == np.float32
    assert pa.parquet.read_schema(feature_store.feature_parts(f32_dir)[0]).field("embedding").type.value_type == pa.float16()
    np.testing.assert_allclose(sorted_rows(f16)[1], sorted_rows(f32)[1], atol=1e-2, rtol=1e-2)


def test_shards_together_equal_one_run(tmp_path, tiny_dinov2, cli):
    write_crops(tmp_path)
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / store.CROPS_FILE).write_bytes((tmp_path / store.CROPS_FILE).read_bytes())
    run_embed(whole, settings(tiny_dinov2), AugmentSettings())
    for i in range(3):
        r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--repeats", "2", "--workers", "0",
                "--shard", f"{i}/3")
        assert r.exit_code == 0, r.output
    parts = feature_store.feature_parts(feature_store.find_feature_store(tmp_path))
    assert {p.name.split("-")[1] for p in parts} == {"s0of3", "s1of3", "s2of3"}
    rows, emb = sorted_rows(read_store(tmp_path))
    expected_rows, expected = sorted_rows(read_store(whole))
    assert rows == expected_rows
    np.testing.assert_allclose(emb, expected, atol=1e-5, rtol=0)


def _embed_process(run: Path, encoder: Path, stop: str) -> subprocess.CompletedProcess:
    """``histoembed embed`` in a child process that sends itself a signal after a fixed number of batches."""
    cmd = [sys.executable, "-m", "histoembed", "embed", "--run", str(run), "--encoder", str(encoder),
           "--repeats", "2", "--batch-size", "4", "--rows-per-part", "8", "--workers", "0"]
    # SIGINT back to its default in the child: a suite started in the background (`make test &`) has it ignored,
    # and Python then never turns it into KeyboardInterrupt.
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", STOP_AFTER_ENV: stop},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dinov2):
    """(rows, embeddings) of one uninterrupted run over the crops the interrupted runs embed (shared by both)."""
    whole = tmp_path_factory.mktemp("whole")
    write_crops(whole, n_train=20, n_test=5, per_image=2)
    run_embed(whole, settings(tiny_dinov2, batch_size=4), AugmentSettings())
    return sorted_rows(read_store(whole))


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_an_interrupted_run_resumes_to_the_same_store(tmp_path, tiny_dinov2, sig, uninterrupted):
    n_crops = write_crops(tmp_path / "killed", n_train=20, n_test=5, per_image=2).shape[0]
    store_dir = tmp_path / "killed" / store.FEATURES_DIR / tiny_dinov2.name
    proc = _embed_process(tmp_path / "killed", tiny_dinov2, f"3:{sig}")
    # 3 batches of 4 training crops x 2 views = 3 parts of 8 rows, whatever the machine's load.
    assert proc.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 130), proc.stderr
    assert len(feature_store.feature_parts(store_dir)) == 3
    rows_then = len(feature_store.read_features(store_dir))
    assert rows_then == 3 * 4 * 2
    if sig == "SIGINT":
        assert not list(store_dir.glob(".part-*")), "Ctrl-C left a temporary file"
        assert not list(store_dir.glob(".lock-*")), "Ctrl-C left the lock"

    resumed = run_embed(tmp_path / "killed", settings(tiny_dinov2, batch_size=4, rows_per_part=8), AugmentSettings())
    assert resumed.new_rows == n_crops * 2 - rows_then
    rows, emb = sorted_rows(read_store(tmp_path / "killed"))
    expected_rows, expected = uninterrupted
    assert rows == expected_rows  # no duplicate, no missing row
    np.testing.assert_allclose(emb, expected, atol=1e-5, rtol=0)


def test_embed_crops_in_memory_matches_the_store(tmp_path, tiny_dinov2):
    crops = write_crops(tmp_path, n_train=2, n_test=0, per_image=2)
    run_embed(tmp_path, settings(tiny_dinov2, repeats=3), AugmentSettings())
    enc = load_encoder(str(tiny_dinov2))
    ids = ["img_0000.png", "img_0000.png", "img_0001.png", "img_0001.png"]
    mem = embed_crops(enc, crops, views=3, augment=AugmentSettings(), image_ids=ids, crop_index=[0, 1, 0, 1],
                      batch_size=3)
    np.testing.assert_allclose(mem, sorted_rows(read_store(tmp_path))[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--shard", "2/2"], "need 0 <= i < n"),
    (["--shard", "half"], "is not i/n"),
    (["--pool", "max"], "--pool"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_options_are_named(tmp_path, tiny_dinov2, cli, args, message):
    write_crops(tmp_path)
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, *args)
    assert r.exit_code == 2 and message in r.output


def test_no_crops_file_says_which_stage_to_run(tmp_path, tiny_dinov2, cli):
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2)
    assert r.exit_code == 2
    assert "crops.parquet" in r.output and "histoembed crops" in r.output


def test_a_corrupt_crop_names_the_file(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    table = pa.parquet.read_table(tmp_path / store.CROPS_FILE)
    pngs = table["png"].to_pylist()
    pngs[4] = b"not a png"
    table = table.set_column(table.schema.get_field_index("png"), "png", pa.array(pngs, pa.binary()))
    store.write_table(table, tmp_path / store.CROPS_FILE, meta={"key": "corrupt"})
    with pytest.raises(UserError, match="img_0001.png") as e:
        run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    assert "crops.parquet" in str(e.value)
    assert not feature_store.feature_parts(tmp_path / store.FEATURES_DIR / tiny_dinov2.name)


def test_under_torchrun_each_process_takes_its_rank_as_shard(tmp_path, tiny_dinov2, cli, monkeypatch):
    write_crops(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--workers", "0")
        assert r.exit_code == 0, r.output
    parts = feature_store.feature_parts(feature_store.find_feature_store(tmp_path))
    assert {p.name.split("-")[1] for p in parts} == {"s0of2", "s1of2"}
    assert len(read_store(tmp_path)) == 21 * 4


def test_a_shard_being_embedded_elsewhere_is_refused_and_a_stale_lock_is_taken(tmp_path, tiny_dinov2):
    write_crops(tmp_path)
    store_dir = tmp_path / store.FEATURES_DIR / tiny_dinov2.name
    store_dir.mkdir(parents=True)
    lock = store_dir / ".lock-s0of1"
    lock.write_text(str(os.getppid()))                      # a live process holds shard 0/1
    with pytest.raises(UserError, match=f"being embedded by process {os.getppid()}"):
        run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings())
    lock.write_text("999999999")                            # a killed run's lock
    assert run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings()).new_rows == 42
    assert not lock.exists()


def test_every_embed_option_reaches_the_store(tmp_path, tiny_dinov2, cli):
    write_crops(tmp_path)
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--pool", "mean", "--repeats", "3", "--no-tta",
            "--batch-size", "5", "--device", "cpu", "--precision", "fp32", "--store-dtype", "float16",
            "--workers", "0", "--rows-per-part", "10", "--seed", "7")
    assert r.exit_code == 0, r.output
    f = read_store(tmp_path)
    assert (f.meta["pool"], f.meta["repeats"], f.meta["tta"], f.meta["seed"], f.meta["precision"]) == \
        ("mean", 3, False, 7, "fp32")
    assert f.meta["store_dtype"] == "float16" and f.meta["shard"] == "0/1"
    assert set(f.view[f.split == "test"]) == {0} and set(f.view[f.split == "train"]) == {0, 1, 2}
    parts = feature_store.feature_parts(feature_store.find_feature_store(tmp_path))
    assert len(parts) == 4  # 15 train crops x 3 views + 6 test crops = 51 rows, whole crops of 5 per batch
    assert "embedded 51 views" in r.output


def test_a_store_written_before_split_keys_is_refused(tmp_path, tiny_dinov2):
    """Parts of an older histoembed (names alone as keys) are never joined: a clear message says re-run."""
    import json

    import pyarrow.parquet as pq

    write_crops(tmp_path, n_train=2, n_test=2, per_image=1)
    run_embed(tmp_path, settings(tiny_dinov2, repeats=1), AugmentSettings())
    rows, _ = sorted_rows(read_store(tmp_path))
    assert [(r[0], r[1]) for r in rows] == [("img_0000.png", "train"), ("img_0001.png", "train"),
                                            ("img_0000.png", "test"), ("img_0001.png", "test")]
    part = feature_store.feature_parts(feature_store.find_feature_store(tmp_path))[0]
    table = pq.read_table(part)
    meta = {k: v for k, v in store.read_meta(part).items() if k != "schema"}   # as written before schema 2
    pq.write_table(table.replace_schema_metadata({store.META_KEY: json.dumps(meta).encode()}), part)
    with pytest.raises(UserError, match="has file schema 1") as e:
        read_store(tmp_path)
    assert "re-run `histoembed embed`" in str(e.value) and part.name in str(e.value)


def test_encoder_lists_keep_order_drop_repeats_and_refuse_two_names_for_one_store():
    from histoembed.stages.embed import encoder_names

    assert encoder_names("virchow2, uni2-h,virchow2") == ["virchow2", "uni2-h"]
    with pytest.raises(UserError, match="same store"):
        encoder_names("org/model,org--model")
    with pytest.raises(UserError, match="no encoder"):
        encoder_names(" , ")


def test_an_embed_beside_another_shard_count_is_refused(tmp_path, tiny_dinov2, cli):
    write_crops(tmp_path)
    store_dir = tmp_path / store.FEATURES_DIR / tiny_dinov2.name
    store_dir.mkdir(parents=True)
    (store_dir / ".lock-s0of2").write_text(str(os.getppid()))   # `embed --shard 0/2` is running
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--workers", "0")
    assert r.exit_code == 2 and "shard 0/2" in r.output and "same count" in r.output
    assert not feature_store.feature_parts(store_dir) and not (store_dir / ".lock-s0of1").exists()
    r = cli("embed", "--run", tmp_path, "--encoder", tiny_dinov2, "--workers", "0", "--shard", "1/2")
    assert r.exit_code == 0, r.output                           # the same count may run beside it


def test_non_finite_encoder_output_stops_embed_naming_the_crop(tmp_path, tiny_dinov2, cli):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dinov2.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("layernorm.weight") and not k.startswith("embeddings"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    write_crops(tmp_path / "run")
    r = cli("embed", "--run", tmp_path / "run", "--encoder", broken, "--workers", "0")
    assert r.exit_code == 2, r.output
    assert "NaN or infinity for train image img_0000.png, crop 0, view 0" in r.output
    assert not feature_store.feature_parts(tmp_path / "run" / store.FEATURES_DIR / "broken")


def test_only_crops_whose_pixels_changed_are_embedded_again(tmp_path, tiny_dinov2):
    crops = write_crops(tmp_path, n_train=5, n_test=2, per_image=3)
    first = run_embed(tmp_path, settings(tiny_dinov2, rows_per_part=12), AugmentSettings())
    assert first.new_rows == 42
    before = read_store(tmp_path)
    # The crops stage runs again: one crop has new pixels, the last test image is gone, the rest is unchanged.
    table = pa.parquet.read_table(tmp_path / store.CROPS_FILE)
    pngs = table["png"].to_pylist()
    pngs[4] = cv2.imencode(".png", np.ascontiguousarray(255 - crops[4][..., ::-1]))[1].tobytes()
    table = table.set_column(table.schema.get_field_index("png"), "png", pa.array(pngs, pa.binary()))
    store.write_table(table.slice(0, len(table) - 3).replace_schema_metadata(None), tmp_path / store.CROPS_FILE,
                      meta={"key": "re-cut"})
    again = run_embed(tmp_path, settings(tiny_dinov2, rows_per_part=12), AugmentSettings())
    assert again.new_rows == 2 and again.rows == 36                 # crop 1 of img_0001, 2 views; 18 crops
    after = read_store(tmp_path)
    feature_store.check_complete(after.subset(after.split == "train"), tmp_path, "train")
    feature_store.check_complete(after.subset(after.split == "test"), tmp_path, "test")
    key = lambda f: list(zip(f.split, f.image_id, f.crop_index, f.view))  # noqa: E731
    old = dict(zip(key(before), before.embedding))
    for k, emb in zip(key(after), after.embedding):
        changed = k[1:3] == ("img_0001.png", 1)
        assert changed != np.allclose(emb, old[k], atol=1e-6), k
    assert "img_0006.png" not in set(after.image_id)
    assert run_embed(tmp_path, settings(tiny_dinov2), AugmentSettings()).skipped

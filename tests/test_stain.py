"""Stain normalisation: torchstain's Macenko on a batch, the judged checks, the embed option, and the evidence."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from histoembed.core import feature_store, store
from histoembed.core.config import MEAN_FILL
from histoembed.core.errors import UserError
from histoembed.maths import stain
from histoembed.tools.synthetic import LABELS, cartoon_image, shifted_stains, tissue_image


def to_batch(*crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def tissue(seed: int, group: str = "train-a", strength: float = 1.0, size: int = 224, label: str = LABELS[0]):
    """One synthetic H&E crop; the same ``seed`` gives the same tissue under any stain group."""
    return tissue_image(np.random.default_rng([seed, 3]), size, size, label, stains=shifted_stains(group, strength))[0]


def default_target(method: str = "macenko") -> stain.StainTarget:
    """The median stain of a few crops with the standard stains, as the embed stage's default target is made."""
    return stain.median_target(method, [to_batch(*(tissue(s) for s in range(10, 16)))], None, 0.1)


def mean_od_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((stain.optical_density(a) - stain.optical_density(b)).abs().mean())


def test_the_batch_is_torchstains_macenko_crop_by_crop(monkeypatch):
    """With every pixel read, each crop of a batch comes out as torchstain's normalize makes it (which rounds down)."""
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    monkeypatch.setattr(stain, "ESTIMATE_STEP", 1)
    crops = [tissue(s, g, label=lab) for s, g, lab in ((0, "train-a", LABELS[0]), (1, "train-b", LABELS[1]),
                                                       (2, "test", LABELS[3]))]
    ref = TorchMacenkoNormalizer()   # torchstain's own target
    target = stain.StainTarget("macenko", {"he": ref.HERef.tolist(), "max_c": ref.maxCRef.tolist()}, "torchstain")
    out, unchanged = stain.macenko_batch(to_batch(*crops), target, None, 0.1)
    assert not unchanged.any()
    for crop, mine in zip(crops, out):
        fitted = TorchMacenkoNormalizer()
        fitted.fit(torch.from_numpy(crop).permute(2, 0, 1))
        est = stain.estimate(to_batch(crop))
        assert torch.allclose(est.he[0], fitted.HERef, atol=1e-4)
        assert torch.allclose(est.max_c[0], fitted.maxCRef, rtol=1e-3)
        theirs, _, _ = TorchMacenkoNormalizer().normalize(torch.from_numpy(crop).permute(2, 0, 1))
        diff = mine.permute(1, 2, 0) * 255 - theirs.float()
        assert diff.abs().max() < 1.01   # torchstain rebuilds one grey level brighter, then truncates


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalised_crops_of_one_image_under_two_stain_shifts_agree(method):
    """Judged: the mean optical-density difference of one image under two planted stain shifts at least halves."""
    target = default_target(method)
    normaliser = stain.StainNormaliser(target, MEAN_FILL)
    for seed in range(3):
        a, b = to_batch(tissue(seed, "train-b")), to_batch(tissue(seed, "test"))
        before = mean_od_difference(a, b)
        after = mean_od_difference(normaliser(a), normaliser(b))
        assert not normaliser.last_unchanged.any()
        assert after <= 0.5 * before, (seed, before, after)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_blank_or_cartoon_crop_passes_through_unchanged(method):
    """Judged: blank, slide-only, padding-only and cartoon crops come back bit for bit, and are counted."""
    size = 224
    blank = np.full((size, size, 3), 245, np.uint8)                       # slide, no tissue
    padding = np.empty((size, size, 3), np.uint8)
    padding[:] = MEAN_FILL                                                 # a crop of nothing but padding
    cartoon = cv2.resize(cartoon_image(np.random.default_rng(1), 300, 260), (size, size),
                         interpolation=cv2.INTER_AREA)
    framed = tissue(4)
    framed[:40] = MEAN_FILL                                                # tissue with a band of padding
    x = to_batch(framed, blank, padding, cartoon)
    normaliser = stain.StainNormaliser(default_target(method), MEAN_FILL)
    out = normaliser(x)
    assert normaliser.last_unchanged.tolist() == [False, True, True, True]
    for i in (1, 2, 3):
        assert torch.equal(out[i], x[i])
    assert torch.equal(out[0, :, :40], x[0, :, :40])                      # padding stays the model's "nothing"
    assert (out[0, :, 40:] - x[0, :, 40:]).abs().mean() > 0.01             # the tissue is normalised


def test_a_reference_image_target_is_torchstains_fit_and_a_bad_one_is_named(tmp_path):
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    crop = tissue(5, "test")
    path = tmp_path / "reference.png"
    cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    target = stain.target_from_image(path, "macenko")
    fitted = TorchMacenkoNormalizer()
    fitted.fit(torch.from_numpy(crop).permute(2, 0, 1))
    assert np.allclose(target.values["he"], fitted.HERef.numpy(), atol=1e-5)
    assert np.allclose(target.values["max_c"], fitted.maxCRef.numpy(), atol=1e-5)
    reinhard = stain.target_from_image(path, "reinhard")
    assert len(reinhard.values["means"]) == len(reinhard.values["stds"]) == 3
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((64, 64, 3), 250, np.uint8))
    with pytest.raises(UserError, match="no H&E stain can be estimated"):
        stain.target_from_image(tmp_path / "blank.png", "macenko")
    with pytest.raises(UserError, match="not found"):
        stain.target_from_image(tmp_path / "missing.png", "macenko")


# ---------------------------------------------------------------- the embed stage, through the CLI

@pytest.fixture(scope="module")
def tiny_vit_64(tmp_path_factory) -> Path:
    """A tiny Dinov2 of Phikon-v2's architecture with 64 px input (16 patches): random, and colour-sensitive."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vit-64")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64,
                          patch_size=16)
    Dinov2Model(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def synth_and_crops(cli, root: Path, train: int, shift: float, seed: int = 0, outliers: bool = False) -> Path:
    data, run = root / "data", root / "run-none"
    args = ["synth", "--out", data, "--train", train, "--test", 4, "--seed", seed, "--min-size", 160,
            "--max-size", 224, "--stain-shift", shift]
    assert cli(*args, *([] if outliers else ["--no-outliers"])).exit_code == 0
    r = cli("crops", "--data", data, "--run", run, "--size", 64, "--k", 3, "--workers", 1)
    assert r.exit_code == 0, r.output
    return run


def embed(cli, run: Path, model: Path, *args) -> str:
    r = cli("embed", "--run", run, "--encoder", model, "--repeats", 1, "--workers", 0, *args)
    assert r.exit_code == 0, r.output
    return r.output


def test_embed_stain_norm_normalises_counts_and_keys_the_store(cli, tmp_path, tiny_vit_64):
    run = synth_and_crops(cli, tmp_path, train=12, shift=1.0, outliers=True)   # crops of the cartoon and blank too
    plain = embed(cli, run, tiny_vit_64)
    assert "stain normalisation" not in plain
    none = feature_store.read_features(feature_store.find_feature_store(run))
    out = embed(cli, run, tiny_vit_64, "--stain-norm", "macenko")
    assert "removed" in out and "stain normalisation (macenko):" in out and "passed through unchanged" in out
    store_dir = feature_store.find_feature_store(run)
    meta = store.read_meta(feature_store.feature_parts(store_dir)[0])
    assert meta["stain"]["target"]["source"] == "training crops" and meta["stain"]["fill"] == list(MEAN_FILL)
    saved = json.loads((run / store.FEATURES_DIR / "stain-macenko.json").read_text())
    assert saved["target"] == meta["stain"]["target"]
    summary = feature_store.stain_summary(store_dir)
    planted = json.loads((tmp_path / "data" / "planted.json").read_text())["flags"]
    left = {image for _, image, _ in summary["unchanged_crops"]}
    assert left == {k for k, v in planted.items() if v == "non_tissue"}   # the cartoon: not H&E
    crops = store.read_table(run / store.CROPS_FILE, "crops")
    keys = list(zip(crops["split"].to_pylist(), crops["image_id"].to_pylist()))
    assert len(summary["unchanged_crops"]) == keys.count(("train", next(iter(left))))   # every crop of it
    assert summary["normalised"] + summary["unchanged"] == len(crops)
    normalised = feature_store.read_features(store_dir)
    assert not np.allclose(normalised.embedding, none.embedding)
    assert "up to date" in embed(cli, run, tiny_vit_64, "--stain-norm", "macenko", "--batch-size", 7)
    # A reference image: its stain (not its path) keys the store; the same image elsewhere changes nothing.
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(tissue(9, "test"), cv2.COLOR_RGB2BGR))
    assert "removed" in embed(cli, run, tiny_vit_64, "--stain-norm", "macenko", "--stain-target", ref)
    other = tmp_path / "elsewhere" / "same.png"
    other.parent.mkdir()
    other.write_bytes(ref.read_bytes())
    assert "up to date" in embed(cli, run, tiny_vit_64, "--stain-norm", "macenko", "--stain-target", other)
    assert "reinhard" in embed(cli, run, tiny_vit_64, "--stain-norm", "reinhard")
    bad = cli("embed", "--run", run, "--encoder", tiny_vit_64, "--workers", 0, "--stain-norm", "macenko",
              "--stain-target", tmp_path / "nope.png")
    assert bad.exit_code == 2 and "stain target image not found" in bad.output
    shown = cli("config", "embed", "--stain-norm", "reinhard", "--stain-min-tissue", 0.2)
    assert 'stain_norm = "reinhard"' in shown.output and "stain_min_tissue = 0.2" in shown.output


def test_embed_crops_with_the_stores_normaliser_gives_the_stored_features(cli, tmp_path, tiny_vit_64):
    """What predict does for a new image: the store's metadata rebuilds the normaliser it was embedded with."""
    from histoembed.engines.forward import embed_crops
    from histoembed.inputs.pixels import decode_png
    from histoembed.models.encoders import load_encoder

    run = synth_and_crops(cli, tmp_path, train=8, shift=1.0)
    embed(cli, run, tiny_vit_64, "--stain-norm", "macenko")
    store_dir = feature_store.find_feature_store(run)
    feats = feature_store.read_features(store_dir)
    normaliser = stain.from_meta(store.read_meta(feature_store.feature_parts(store_dir)[0])["stain"])
    crops = store.read_table(run / store.CROPS_FILE, "crops")
    pixels = np.stack([decode_png(b) for b in crops["png"].to_pylist()[:5]])
    ids, index = crops["image_id"].to_pylist()[:5], crops["crop_index"].to_pylist()[:5]
    again = embed_crops(load_encoder(str(tiny_vit_64)), pixels, image_ids=ids, crop_index=index,
                        normaliser=normaliser)
    rows = {(s, i, c): e for s, i, c, e in zip(feats.split, feats.image_id, feats.crop_index, feats.embedding)}
    stored = np.stack([rows[("train", i, c)] for i, c in zip(ids, index)])
    assert np.allclose(again, stored, atol=1e-5)
    without = embed_crops(load_encoder(str(tiny_vit_64)), pixels, image_ids=ids, crop_index=index)
    assert not np.allclose(without, stored, atol=1e-3)


# ---------------------------------------------------------------- the evidence, with `histoembed compare`

def compare_norm(cli, tmp_path: Path, model: Path, shift: float) -> dict:
    """Out-of-fold macro-F1 of --stain-norm macenko minus none on 200 synthetic images, paired bootstrap."""
    run_none = synth_and_crops(cli, tmp_path, train=200, shift=shift)
    run_macenko = tmp_path / "run-macenko"
    r = cli("crops", "--data", tmp_path / "data", "--run", run_macenko, "--size", 64, "--k", 3, "--workers", 1)
    assert r.exit_code == 0, r.output
    for run, norm in ((run_none, "none"), (run_macenko, "macenko")):
        embed(cli, run, model, "--pool", "cls", "--stain-norm", norm)
        r = cli("fit", "--run", run, "--heads", "logreg", "--folds", 5, "--bootstrap", 0)
        assert r.exit_code == 0, r.output
    out = tmp_path / "compare.json"
    r = cli("compare", run_none, run_macenko, "--json", out)
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_stain_normalisation_recovers_what_a_planted_stain_shift_costs(cli, tmp_path, tiny_vit_64):
    """A stain shift between two halves of each class (strength 1.5) costs a colour-sensitive encoder; Macenko
    normalisation wins it back: the paired 95% interval of macenko minus none lies above 0."""
    result = compare_norm(cli, tmp_path, tiny_vit_64, shift=1.5)
    lo, hi = result["interval_95"]
    assert result["difference_b_minus_a"] > 0 and lo > 0, result


def test_stain_normalisation_costs_nothing_beyond_noise_on_clean_data(cli, tmp_path, tiny_vit_64):
    """The same images without the shift: the paired 95% interval of macenko minus none contains 0."""
    result = compare_norm(cli, tmp_path, tiny_vit_64, shift=0.0)
    lo, hi = result["interval_95"]
    assert lo < 0 < hi, result

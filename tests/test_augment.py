"""Augmentations: view 0 clean, each view a function of its key alone, each operation as documented."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from histoembed.core.config import IMAGENET_MEAN, AugmentSettings
from histoembed.maths.augment import (
    OD_EPS,
    _blur,
    _stain,
    augment_batch,
    draw_view_params,
    elastic_displacement,
    hash_bits,
    hash_normal,
    rgb_to_hed,
    stable_key,
)

OFF = dict(flip_p=0.0, rotation_deg=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
           stain_alpha=(1.0, 1.0), stain_beta=(0.0, 0.0), elastic_p=0.0, blur_p=0.0, noise_p=0.0,
           erase_p=0.0)
ALL_ON = AugmentSettings(flip_p=1.0, elastic_p=1.0, blur_p=1.0, noise_p=1.0, erase_p=1.0)


def only(**on) -> AugmentSettings:
    """Every operation off except the ones given."""
    return AugmentSettings(**{**OFF, **on})


def crops(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (bilinear-upsampled noise, so warps change pixels gradually)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def one(x: torch.Tensor, settings: AugmentSettings, image_id: str = "img", crop: int = 0, view: int = 1,
        seed: int = 0) -> torch.Tensor:
    return augment_batch(x, [image_id] * len(x), [crop] * len(x), [view] * len(x), settings, seed)


# ---------------------------------------------------------------- the contract

def test_view_zero_comes_back_bit_identical():
    x = crops(4)
    out = augment_batch(x, ["a", "a", "b", "b"], [0, 0, 1, 1], [0, 1, 0, 3], ALL_ON, seed=0)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert not torch.allclose(out[1], x[1]) and not torch.allclose(out[3], x[3])
    assert torch.equal(augment_batch(x, ["a"] * 4, [0] * 4, [0] * 4, ALL_ON, seed=0), x)


@pytest.mark.parametrize("settings", [ALL_ON, AugmentSettings()], ids=["all-on", "defaults"])
def test_a_view_depends_on_its_key_alone_not_on_the_batch(settings):
    x = crops(12, size=40)
    ids = [f"img{i % 4}" for i in range(12)]
    crop_index = [i // 4 for i in range(12)]
    views = [i % 3 + 1 for i in range(12)]
    together = augment_batch(x, ids, crop_index, views, settings, seed=7)
    alone = torch.cat([augment_batch(x[i:i + 1], ids[i:i + 1], crop_index[i:i + 1], views[i:i + 1], settings, 7)
                       for i in range(12)])
    order = np.random.default_rng(1).permutation(12)
    shuffled = augment_batch(x[order], [ids[i] for i in order], [crop_index[i] for i in order],
                             [views[i] for i in order], settings, seed=7)
    torch.testing.assert_close(alone, together, atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled, together[order], atol=1e-6, rtol=0)


def test_seed_view_crop_and_image_each_change_the_augmentation():
    x = crops(1)
    base = one(x, ALL_ON)
    for changed in (one(x, ALL_ON, seed=1), one(x, ALL_ON, view=2), one(x, ALL_ON, crop=1),
                    one(x, ALL_ON, image_id="other")):
        assert (changed - base).abs().max() > 0.05
    assert torch.equal(one(x, ALL_ON), base)


def test_output_keeps_shape_dtype_and_stays_in_unit_range():
    x = crops(6, size=48)
    x[:2] = 0.0      # black and white crops push every operation to its clipping edges
    x[2:4] = 1.0
    out = augment_batch(x, list("abcdef"), [0] * 6, [1, 2, 3, 1, 2, 3], ALL_ON, seed=3)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_crops_decoded_as_height_width_channel_arrays_are_accepted():
    hwc = (crops(3) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    x = hwc.permute(0, 3, 1, 2).float() / 255          # not contiguous: channels last in memory
    ids, crop_index, views = ["a", "b", "c"], [0, 1, 2], [0, 1, 2]
    torch.testing.assert_close(augment_batch(x, ids, crop_index, views, ALL_ON, 0),
                               augment_batch(x.contiguous(), ids, crop_index, views, ALL_ON, 0), atol=1e-6, rtol=0)


def test_everything_off_leaves_augmented_views_untouched():
    x = crops(3)
    assert torch.equal(one(x, only()), x)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        augment_batch(torch.zeros(2, 32, 32), ["a", "b"], [0, 0], [1, 1], ALL_ON, 0)
    with pytest.raises(ValueError, match="one entry per row"):
        augment_batch(torch.zeros(2, 3, 8, 8), ["a"], [0, 0], [1, 1], ALL_ON, 0)


# ---------------------------------------------------------------- keys and random fields

def test_stable_key_is_a_fixed_64_bit_hash():
    assert stable_key("TCGA-001") == stable_key("TCGA-001") != stable_key("TCGA-002")
    assert stable_key("img") == 0xC918AFA058518AB0  # pinned: changing it changes every stored view


def _lowbias32_reference(key: tuple[int, int], i: int) -> int:
    """The hash in plain Python integers, no wrap-around involved."""
    m = 0xFFFFFFFF
    x = (i * (key[0] | 1) + key[1]) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_bits_match_the_exact_integer_reference():
    keys = [(0xFFFFFFFF, 0xFFFFFFFF), (12345, 0), (0x9E3779B9, 0x7F4A7C15)]
    got = hash_bits(torch.tensor(keys, dtype=torch.int64), 1000)
    want = [[_lowbias32_reference(k, i) for i in range(1000)] for k in keys]
    assert got.tolist() == want


def test_hash_normal_is_standard_normal_repeatable_and_per_row():
    keys = torch.tensor([[1, 2], [3, 4], [1, 3], [2**32 - 1, 5]], dtype=torch.int64)
    z = hash_normal(keys, 40_001)
    assert z.shape == (4, 40_001) and z.dtype == torch.float32
    for row in z:
        assert abs(row.mean()) < 0.02 and abs(row.std() - 1) < 0.02
        assert abs((row.abs() < 1).float().mean() - 0.6827) < 0.01
    assert torch.equal(hash_normal(keys, 40_001), z)
    assert torch.equal(hash_normal(keys[2:3], 40_001)[0], z[2])      # a row ignores its neighbours
    assert abs(np.corrcoef(z.numpy())[np.triu_indices(4, 1)]).max() < 0.02
    lag1 = np.corrcoef(z[0, :-1].numpy(), z[0, 1:].numpy())[0, 1]
    assert abs(lag1) < 0.02


@pytest.mark.parametrize("sigma", [2.0, 7.0])
def test_elastic_field_has_the_simard_variance(sigma):
    # alpha * Gaussian(sigma) * U(-1, 1): per-axis variance alpha^2 / (12 pi sigma^2)
    keys = torch.randint(0, 2**32, (32, 2), generator=torch.Generator().manual_seed(0))
    d = elastic_displacement(keys, 96, 80, alpha=25.0, sigma=sigma)
    assert d.shape == (32, 2, 96, 80)
    expected = 25.0 / (math.sqrt(12 * math.pi) * sigma)
    assert abs(d.std().item() / expected - 1) < 0.05
    assert abs(d.mean().item()) < 0.05 * expected


# ---------------------------------------------------------------- one operation at a time

def test_flips_are_exact():
    x = crops(3, size=30)
    assert torch.equal(one(x, only(flip_p=1.0)), x.flip(-1).flip(-2))


def test_rotation_turns_counter_clockwise_about_the_centre():
    x = crops(1, size=32)
    settings = only(rotation_deg=90.0)
    p = draw_view_params(["img"], [0], [1], settings, 0, 32, 32)
    out = one(x, settings)
    angle = p.angle_deg[0]
    assert abs(angle) > 5 and not torch.allclose(out, x)
    # a disc centred in the crop is turned onto itself
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 8**2).float().expand(1, 3, 32, 32).contiguous()
    turned = one(disc, settings)
    assert (turned - disc).abs().mean() < 0.02


def test_rotation_by_ninety_degrees_is_rot90():
    from histoembed.maths.augment import _warp

    x = crops(1, size=32)
    settings = only(rotation_deg=90.0)
    p = dataclasses.replace(draw_view_params(["img"], [0], [1], settings, 0, 32, 32), angle_deg=np.array([90.0]))
    torch.testing.assert_close(_warp(x, p, settings), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_elastic_with_alpha_zero_is_the_rotation_alone():
    x = crops(4)
    rotated = one(x, only(rotation_deg=15.0))
    assert torch.equal(one(x, only(rotation_deg=15.0, elastic_p=1.0, elastic_alpha=0.0)), rotated)
    mild = one(x, only(rotation_deg=15.0, elastic_p=1.0))   # the default alpha: under a pixel RMS
    strong = one(x, only(rotation_deg=15.0, elastic_p=1.0, elastic_alpha=200.0))
    assert 1e-3 < (mild - rotated).abs().mean() < 0.5 * (strong - rotated).abs().mean()


def test_rgb_to_hed_matches_skimage():
    from skimage.color import rgb2hed
    from skimage.data import immunohistochemistry

    rng = np.random.default_rng(0)
    images = [immunohistochemistry()[100:164, 200:264], rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]
    for image in images:
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        ours = (rgb_to_hed(x) / -math.log(OD_EPS)).clamp_min(0).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, rgb2hed(image), atol=1e-5)


def test_stain_with_unit_alpha_and_zero_beta_is_the_od_round_trip():
    x = crops(3)
    x[0, :, :4, :4] = 0.0      # the 1e-6 floor of the log
    x[1, :, :4, :4] = 1.0
    p = draw_view_params(["a", "b", "c"], [0, 0, 0], [1, 1, 1], only(), 0, 32, 32)
    p = dataclasses.replace(p, stain_alpha=np.ones((3, 3)), stain_beta=np.zeros((3, 3)))
    torch.testing.assert_close(_stain(x, p), x, atol=1e-4, rtol=0)


def test_stain_scales_and_shifts_the_hed_densities():
    x = 0.2 + 0.7 * crops(2)  # away from 0 and 1, so nothing clips
    alpha, beta = 1.1, 0.05
    out = one(x, only(stain_alpha=(alpha, alpha), stain_beta=(beta, beta)))
    torch.testing.assert_close(rgb_to_hed(out), alpha * rgb_to_hed(x) + beta, atol=1e-3, rtol=0)


def he_crops(n: int, size: int = 64) -> torch.Tensor:
    """Synthetic H&E crops, [n, 3, size, size] in [0, 1]."""
    from histoembed.tools.synthetic import LABELS, tissue_image

    rgb = [tissue_image(np.random.default_rng([5, i]), size, size, LABELS[i % 4])[0] for i in range(n)]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255


def test_the_macenko_perturbation_scales_and_shifts_each_crops_own_stain_concentrations():
    from histoembed.maths import stain

    x = he_crops(3)
    ids, views = ["a", "b", "c"], [1, 2, 3]
    settings = only(macenko_p=1.0, macenko_alpha=(0.7, 1.3), macenko_beta=(-0.1, 0.1))
    out = augment_batch(x, ids, [0, 0, 0], views, settings, seed=3)
    p = draw_view_params(ids, [0, 0, 0], views, settings, 3, 64, 64)
    assert p.macenko.all() and (p.macenko_alpha != 1).all()
    he = stain.estimate(x).he
    before = torch.linalg.pinv(he) @ stain.optical_density(x)
    after = torch.linalg.pinv(he) @ stain.optical_density(out)
    unclipped = (out.reshape(3, 3, -1) * 255 < 254.5).all(dim=1) & (out.reshape(3, 3, -1) > 0).all(dim=1)
    for i in range(3):
        expected = before[i] * torch.tensor(p.macenko_alpha[i], dtype=torch.float32)[:, None] \
            + torch.tensor(p.macenko_beta[i], dtype=torch.float32)[:, None]
        torch.testing.assert_close(after[i][:, unclipped[i]], expected[:, unclipped[i]], atol=2e-3, rtol=0)
    identity = only(macenko_p=1.0, macenko_alpha=(1.0, 1.0), macenko_beta=(0.0, 0.0))
    torch.testing.assert_close(augment_batch(x, ids, [0, 0, 0], views, identity, seed=3), x, atol=1e-5, rtol=0)


def test_the_macenko_perturbation_keeps_every_other_draw_and_depends_on_the_key_alone():
    from histoembed.tools.synthetic import cartoon_image

    ids, index, views = ["a", "b", "c", "d"], [0, 1, 2, 3], [1, 1, 2, 3]
    off = draw_view_params(ids, index, views, AugmentSettings(), 0, 64, 64)
    on = draw_view_params(ids, index, views, AugmentSettings(macenko_p=1.0), 0, 64, 64)
    for field in dataclasses.fields(off):
        if not field.name.startswith("macenko"):
            assert np.array_equal(getattr(off, field.name), getattr(on, field.name)), field.name
    x = he_crops(4)
    settings = AugmentSettings(macenko_p=1.0)
    together = augment_batch(x, ids, index, views, settings, seed=7)
    alone = torch.cat([augment_batch(x[i:i + 1], ids[i:i + 1], index[i:i + 1], views[i:i + 1], settings, 7)
                       for i in range(4)])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
    cartoon = torch.from_numpy(cartoon_image(np.random.default_rng(0), 64, 64)).permute(2, 0, 1)[None].float() / 255
    strong = only(macenko_p=1.0, macenko_alpha=(0.5, 0.5), macenko_beta=(0.2, 0.2))
    assert torch.equal(one(cartoon, strong), cartoon)                # not H&E: left as it is


def test_brightness_scales_pixels_by_the_drawn_factor():
    x = 0.5 * crops(2)
    settings = only(brightness=0.3)
    p = draw_view_params(["img", "img"], [0, 0], [1, 1], settings, 0, 32, 32)
    factor = torch.tensor(p.brightness, dtype=torch.float32)[:, None, None, None]
    assert abs(p.brightness[0] - 1) > 0.01
    torch.testing.assert_close(one(x, settings), x * factor, atol=1e-6, rtol=0)


def test_contrast_scales_deviations_from_the_mean_grey():
    x = 0.25 + 0.5 * crops(1)
    settings = only(contrast=0.3)
    c = draw_view_params(["img"], [0], [1], settings, 0, 32, 32).contrast[0]
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mean_grey = (x * luma).sum(1).mean()
    torch.testing.assert_close(one(x, settings), c * x + (1 - c) * mean_grey, atol=1e-5, rtol=0)


def test_hue_and_saturation_keep_greys_grey_and_change_colours():
    settings = only(saturation=0.5, hue=0.5)
    grey = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    torch.testing.assert_close(one(grey, settings), grey, atol=1e-5, rtol=0)
    colour = 0.2 + 0.6 * crops(1)
    out = one(colour, settings)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    unclipped = ((out > 0) & (out < 1)).all(1)
    assert unclipped.float().mean() > 0.8
    kept = ((out - colour) * luma).sum(1)[unclipped]          # the chroma turns, Y stays
    torch.testing.assert_close(kept, torch.zeros_like(kept), atol=1e-5, rtol=0)
    assert (out - colour).abs().max() > 0.02


def test_blur_spreads_a_point_by_the_drawn_sigma():
    x = torch.zeros(2, 3, 33, 33)
    x[:, :, 16, 16] = 1.0
    settings = only(blur_p=1.0, blur_sigma=(0.8, 1.5))
    p = draw_view_params(["a", "b"], [0, 0], [1, 1], settings, 0, 33, 33)
    out = _blur(x, p, settings.blur_sigma[1])
    t = torch.arange(33.0) - 16
    for row, sigma in zip(out, p.blur_sigma, strict=True):
        assert abs(row.sum(dim=(1, 2)) - 1).max() < 1e-5
        variance = (row[0].sum(0) * t**2).sum().item()
        assert abs(variance / sigma**2 - 1) < 0.03
    flat = torch.full((2, 3, 33, 33), 0.4)
    torch.testing.assert_close(_blur(flat, p, 1.5), flat, atol=1e-6, rtol=0)
    assert not torch.allclose(one(crops(1), settings), crops(1))


def test_noise_has_the_drawn_sigma():
    x = torch.full((2, 3, 64, 64), 0.5)
    settings = only(noise_p=1.0)
    p = draw_view_params(["img", "img"], [0, 1], [1, 1], settings, 0, 64, 64)
    out = augment_batch(x, ["img", "img"], [0, 1], [1, 1], settings, 0)
    for row, sigma in zip(out - x, p.noise_sigma, strict=True):
        assert 0.01 <= sigma <= 0.03
        assert abs(row.std().item() / sigma - 1) < 0.03 and abs(row.mean().item()) < 0.1 * sigma


def test_erasing_fills_one_rectangle_of_the_drawn_area_with_the_mean_colour():
    size = 64
    x = crops(3, size=size)
    settings = only(erase_p=1.0, erase_scale=(0.05, 0.2))
    ids = ["a", "b", "c"]
    p = draw_view_params(ids, [0, 0, 0], [1, 1, 1], settings, 0, size, size)
    out = augment_batch(x, ids, [0, 0, 0], [1, 1, 1], settings, 0)
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    for row, src, (top, left, h, w), area in zip(out, x, p.erase_box, p.erase_area, strict=True):
        erased = (row != src).any(0)
        ys, xs = torch.nonzero(erased, as_tuple=True)
        assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (top, top + h, left, left + w)
        assert torch.equal(row[:, top:top + h, left:left + w], fill.expand(3, h, w))
        assert abs(h * w / size**2 - area) < 2 * (h + w) / size**2    # drawn area up to rounding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_augmentation():
    keys = torch.tensor([[1, 2], [2**32 - 1, 7]], dtype=torch.int64)
    assert torch.equal(hash_bits(keys.cuda(), 5000).cpu(), hash_bits(keys, 5000))
    x = crops(4, size=48)
    args = (["a", "b", "c", "d"], [0, 1, 2, 3], [0, 1, 2, 3], ALL_ON, 5)
    torch.testing.assert_close(augment_batch(x.cuda(), *args).cpu(), augment_batch(x, *args), atol=1e-3, rtol=0)

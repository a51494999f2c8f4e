"""Seeded augmentation: replayability, parameter distributions and torchvision semantics."""

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from seed_cluster.augment import (
    _blur,
    _jitter_op,
    apply_view,
    augment,
    blur_kernel_size,
    center_view,
    to_float,
)
from seed_cluster.errors import ConfigError
from seed_cluster.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES, get_recipe
from seed_cluster.view_keys import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    key_uniforms,
    pixel_boxes,
    sample_params,
)

REPO = Path(__file__).resolve().parents[1]
NO_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
# Every photometric op switched off and the crop pinned to the whole image.
IDENTITY = replace(RECIPES["mocov2"], scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0,
                   p_gray=0.0, p_blur=0.0)
# Every photometric op always on, to exercise all code paths in small batches.
EVERYTHING = replace(RECIPES["simclr"], p_jitter=1.0, p_blur=1.0, p_solarize=0.5)


def make_images(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a random colour gradient plus noise), uint8 [B, H, W, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    coef = rng.uniform(-1, 1, size=(batch, 1, 1, 3, 3))
    base = coef[..., 0] * yy[None, :, :, None] + coef[..., 1] * xx[None, :, :, None] + coef[..., 2]
    noisy = 128 + 90 * base + rng.normal(0, 20, size=base.shape)
    return torch.from_numpy(np.clip(noisy, 0, 255).astype(np.uint8))


def run(images, indices, recipe=EVERYTHING, size=32, **key):
    key = {"seed": 7, "epoch": 3, "view": 1, **key}
    return augment(images, indices, recipe=recipe, size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **key)


# --- replay equality ------------------------------------------------------------------------------


def test_same_key_gives_identical_tensors_across_calls():
    images = make_images(16, 40)
    a = run(images, np.arange(16))
    b = run(images.clone(), list(range(16)))
    c = run(images, torch.arange(16))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("batch,side,size", [(24, 48, 32), (6, 256, 224)])
def test_sample_alone_equals_sample_inside_shuffled_batch(batch, side, size):
    images, indices = make_images(batch, side), np.arange(1000, 1000 + batch)
    together = run(images, indices, size=size)
    perm = np.random.default_rng(1).permutation(batch)
    assert torch.equal(run(images[perm], indices[perm], size=size), together[perm])
    for i in (0, batch // 2, batch - 1):
        assert torch.equal(run(images[i:i + 1], indices[i:i + 1], size=size)[0], together[i])


@pytest.mark.parametrize("side,size", [(48, 32), (256, 224)])
def test_thread_count_does_not_change_output(side, size):
    images, indices = make_images(8, side), np.arange(8)
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(run(images, indices, size=size))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_replay_in_fresh_subprocess_is_bitwise_identical(tmp_path):
    out = tmp_path / "view.pt"
    script = (
        "import sys, numpy as np, torch\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from tests.test_augment import make_images, run\n"
        "torch.set_num_threads(1)\n"
        "torch.save(run(make_images(12, 40), np.arange(50, 62)), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(out), str(REPO)], check=True, cwd=REPO, timeout=120)
    assert torch.equal(torch.load(out), run(make_images(12, 40), np.arange(50, 62)))


@pytest.mark.parametrize("field", ["seed", "epoch", "view"])
def test_changing_any_key_component_changes_the_view(field):
    images, indices = make_images(8, 40), np.arange(8)
    base = run(images, indices)
    other = run(images, indices, **{field: {"seed": 8, "epoch": 4, "view": 0}[field]})
    for i in range(8):
        assert not torch.equal(base[i], other[i])


def test_same_image_at_different_index_gets_a_different_view():
    images = make_images(1, 40).expand(8, -1, -1, -1).contiguous()
    out = run(images, np.arange(8))
    assert all(not torch.equal(out[0], out[i]) for i in range(1, 8))


def test_key_uniforms_are_a_pure_function_of_the_key():
    u = key_uniforms(3, 2, np.array([5, 9, 5]), 1)
    assert np.array_equal(u[0], u[2]) and not np.array_equal(u[0], u[1])
    assert np.array_equal(u[1], key_uniforms(3, 2, [9], 1)[0])
    assert u.min() >= 0.0 and u.max() < 1.0


# --- parameter distributions ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_crop_boxes_follow_the_recipe_ranges(name):
    recipe = get_recipe(name)
    box = sample_params(0, 0, np.arange(10_000), 0, recipe).box
    x0, y0, w, h = box.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-12).all() and (y0 + h <= 1 + 1e-12).all()
    area = w * h
    assert (area >= recipe.scale[0] - 1e-12).all() and (area <= recipe.scale[1] + 1e-12).all()
    ratio = w / h
    assert (ratio >= recipe.ratio[0] - 1e-9).all() and (ratio <= recipe.ratio[1] + 1e-9).all()
    # log-uniform aspect ratio: the median is near the geometric mean of the range.
    assert abs(np.median(np.log(ratio))) < 0.05


def test_crop_falls_back_to_torchvision_central_crop_when_no_try_fits():
    recipe = replace(RECIPES["mocov2"], scale=(0.99, 1.0), ratio=(3.0, 4.0))
    box = sample_params(0, 0, np.arange(100), 0, recipe).box
    np.testing.assert_allclose(box, np.tile([0.0, 1 / 3, 1.0, 1 / 3], (100, 1)))


def test_the_numba_key_hash_the_decoder_runs_is_key_uniforms_and_view_epochs():
    from seed_cluster.view_keys import nb_key_state, nb_slot_uniform, nb_view_epoch, view_epochs

    indices = np.array([0, 1, 7, 999, 2**40 + 3])
    u = key_uniforms(2**64 - 5, 12, indices, 3)
    for row, i in enumerate(indices):
        state = nb_key_state(np.uint64(2**64 - 5), np.uint64(12), np.uint64(i), np.uint64(3))
        assert [nb_slot_uniform(np.uint64(state), k) for k in range(u.shape[1])] == u[row].tolist()
    keys = view_epochs(9, 14, indices, 5)
    assert [nb_view_epoch(np.uint64(9), 14, np.uint64(i), 5) for i in indices] == keys.tolist()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_pixel_boxes_are_torchvision_random_resized_crops_of_the_whole_image(name):
    recipe = get_recipe(name)
    heights, widths = np.full(5000, 300), np.full(5000, 457)
    top, left, h, w = pixel_boxes(1, 2, np.arange(5000), 0, recipe, heights, widths).T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 457).all()
    area = h * w / (300 * 457)
    slack = (h + w + 1) / (300 * 457)  # torchvision rounds w and h to whole pixels
    assert (area >= recipe.scale[0] - slack).all() and (area <= recipe.scale[1] + slack).all()
    # Log-uniform aspect ratio (on a square image, where rejected tries do not favour one orientation).
    _, _, sh, sw = pixel_boxes(1, 2, np.arange(5000), 0, recipe, 400, 400).T
    assert abs(np.median(np.log(sw / sh))) < 0.05
    # The same key gives the same box; another view key another one.
    assert np.array_equal(pixel_boxes(1, 2, [17], 0, recipe, 300, 457)[0], [top[17], left[17], h[17], w[17]])
    assert not np.array_equal(pixel_boxes(1, 2, [17], 1, recipe, 300, 457)[0], [top[17], left[17], h[17], w[17]])


def test_pixel_boxes_fall_back_to_torchvisions_central_crop():
    recipe = replace(RECIPES["mocov2"], scale=(0.99, 1.0), ratio=(3.0, 4.0))
    assert pixel_boxes(0, 0, np.arange(3), 0, recipe, 300, 300).tolist() == [[100, 0, 100, 300]] * 3


def test_flip_gray_jitter_and_blur_rates_match_the_recipe():
    params = sample_params(11, 0, np.arange(10_000), 0, RECIPES["mocov2"])
    for rate, expected in [(params.flip.mean(), 0.5), (params.gray.mean(), 0.2),
                           (params.jitter.mean(), 0.8), (params.blur.mean(), 0.5)]:
        assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / 10_000)
    assert not params.solarize.any()
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0


def test_jitter_factors_and_op_order_are_uniform():
    params = sample_params(2, 1, np.arange(10_000), 0, RECIPES["mocov2"])
    f = params.factors
    assert f[:, BRIGHTNESS].min() >= 0.6 and f[:, BRIGHTNESS].max() <= 1.4
    assert abs(f[:, CONTRAST].mean() - 1.0) < 0.01 and abs(f[:, HUE].mean()) < 0.005
    assert np.abs(f[:, HUE]).max() <= 0.1
    assert (np.sort(params.order, axis=1) == np.arange(4)).all()  # each row is a permutation
    for stage in range(4):
        counts = np.bincount(params.order[:, stage], minlength=4) / 10_000
        assert np.abs(counts - 0.25).max() < 0.02


# --- output contract ------------------------------------------------------------------------------


@pytest.mark.parametrize("side,size", [(28, 32), (32, 32), (256, 224), (256, 96)])
def test_output_shape_dtype_and_range(side, size):
    out = augment(make_images(4, side), np.arange(4), seed=0, epoch=0, view=0, recipe=EVERYTHING,
                  size=size, **NO_NORM)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_normalisation_uses_mean_and_std_on_the_0_1_scale():
    images = torch.full((2, 32, 32, 3), 51, dtype=torch.uint8)  # 51 / 255 = 0.2
    out = augment(images, [0, 1], seed=0, epoch=0, view=0, recipe=IDENTITY, size=16,
                  mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    np.testing.assert_allclose(out.mean(dim=(0, 2, 3)).numpy(), [0.2, 0.0, -1.0], atol=1e-5)
    with pytest.raises(ValueError, match="0-1 scale"):
        augment(images, [0, 1], seed=0, epoch=0, view=0, recipe=IDENTITY, size=16,
                mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))


def test_identity_box_without_photometric_ops_reproduces_the_input():
    images = make_images(3, 32)
    out = augment(images, [0, 1, 2], seed=0, epoch=0, view=0, recipe=IDENTITY, size=32, **NO_NORM)
    assert torch.equal(out, images.permute(0, 3, 1, 2).float() / 255.0)


@pytest.mark.parametrize("side,size", [(28, 32), (256, 224), (64, 24)])
def test_identity_box_resize_matches_antialiased_bilinear_interpolate(side, size):
    images = make_images(3, side)
    out = augment(images, [0, 1, 2], seed=0, epoch=0, view=0, recipe=IDENTITY, size=size, **NO_NORM)
    ref = F.interpolate(images.permute(0, 3, 1, 2).float() / 255.0, size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)


def test_flip_mirrors_the_crop():
    images = make_images(64, 32)
    recipe = replace(IDENTITY, p_flip=0.5)
    params = sample_params(0, 0, np.arange(64), 0, recipe)
    out = apply_view(images, params, size=32, **NO_NORM)
    plain = images.permute(0, 3, 1, 2).float() / 255.0
    assert 0 < params.flip.sum() < 64
    for i in range(64):
        assert torch.equal(out[i], plain[i].flip(-1) if params.flip[i] else plain[i])


@pytest.mark.parametrize("flip", ["none", "some", "all"])
def test_to_float_flips_on_the_uint8_pixels_exactly_as_flipping_the_floats(flip):
    images = make_images(12, 20)
    mask = {"none": np.zeros(12, bool), "some": np.arange(12) % 3 == 1, "all": np.ones(12, bool)}[flip]
    before = images.clone()
    out = to_float(images, mask)
    assert torch.equal(images, before)  # the decoder's buffer is read, never written
    plain = images.permute(0, 3, 1, 2).float() / 255.0
    assert out.is_contiguous() and out.dtype == torch.float32 and out.shape == (12, 3, 20, 20)
    for i in range(12):
        assert torch.equal(out[i], plain[i].flip(-1) if mask[i] else plain[i])
    assert torch.equal(to_float(images), plain)  # no mask, no flip


def test_mocov1_grayscale_comes_before_jitter_so_gray_views_stay_gray():
    params = sample_params(0, 0, np.arange(64), 0, RECIPES["mocov1"])
    out = apply_view(make_images(64, 40), params, size=32, **NO_NORM)
    assert params.jitter.all() and params.gray.any()
    gray = out[torch.from_numpy(params.gray)]
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-6, rtol=0)


# --- photometric ops against torchvision's definitions ----------------------------------------------


@pytest.mark.parametrize("op,factors,reference", [
    (BRIGHTNESS, (0.6, 1.0, 1.4), TF.adjust_brightness),
    (CONTRAST, (0.6, 1.0, 1.4), TF.adjust_contrast),
    (SATURATION, (0.2, 1.0, 1.8), TF.adjust_saturation),
    (HUE, (-0.4, 0.0, 0.25), TF.adjust_hue),
])
def test_jitter_ops_match_torchvision(op, factors, reference):
    x = make_images(3, 24).permute(0, 3, 1, 2).float() / 255.0
    out = _jitter_op(op, x, torch.tensor(factors, dtype=torch.float32).view(3, 1, 1, 1))
    ref = torch.stack([reference(x[i], f) for i, f in enumerate(factors)])
    # torchvision's tensor grayscale weighs red 0.2989, PIL (used by MoCo/SwAV) and this module 0.299.
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_blur_matches_torchvision_gaussian_blur():
    x = make_images(2, 48).permute(0, 3, 1, 2).float() / 255.0
    sigma = np.array([0.3, 1.7])
    kernel = blur_kernel_size(48, 0.1)
    out = _blur(x, sigma, kernel)
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [float(s), float(s)])
                       for i, s in enumerate(sigma)])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert [blur_kernel_size(s, 0.1) for s in (32, 96, 224)] == [3, 11, 23]


def test_center_view_matches_torchvision_resize_and_center_crop():
    images = make_images(2, 64)
    out = center_view(images, size=32, **NO_NORM)
    plain = images.permute(0, 3, 1, 2).float() / 255.0
    ref = TF.center_crop(TF.resize(plain, [int(32 / 0.875)], antialias=True), [32, 32])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert torch.equal(center_view(images, size=32, **NO_NORM), out)


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_recipe_name_lists_the_valid_names():
    with pytest.raises(ConfigError, match="mocov2") as info:
        get_recipe("byol")
    assert "'byol'" in str(info.value) and all(name in str(info.value) for name in RECIPES)


def test_invalid_recipe_fields_are_reported_together():
    with pytest.raises(ConfigError, match="scale=.*p_gray="):
        replace(RECIPES["mocov2"], scale=(0.5, 0.2), p_gray=1.5)


def test_bad_images_and_indices_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        run(torch.zeros(2, 3, 32, 32), [0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        run(make_images(2, 32), [0, -1])
    with pytest.raises(ValueError, match="parameter sets"):
        run(make_images(2, 32), [0, 1, 2])

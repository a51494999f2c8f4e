"""Seeded, replayable augmentation: every random choice of a view is a pure function of its key.

FFCV's own random transforms draw from numba's unseeded RNG (DESIGN.md section 4), so every
parameter of a view here is a pure function of ``(seed, epoch, sample index, view index)``: a
counter-based hash (splitmix64, in numpy uint64) turns the key plus a fixed "slot" per
parameter into uniforms in [0, 1). No global RNG state is read or advanced. That is what
makes exact resume and the teacher-feature cache possible: a view can be regenerated
bit-for-bit in another process, run, batch or world size.

Where the work runs. Training crops in the decoder: `pixel_boxes` (RandomResizedCrop on the
whole image, in pixels) is numba code that `seed_cluster.ffcv_ops.SeededCropDecoder` runs
inside FFCV's pipeline, and `finish_view` applies the flip and the photometric ops batched
on the device. `augment` / `apply_view` do the whole view (crop + resize too) in torch from
an already decoded uint8 image, for images that do not come from the decoder.

Bitwise determinism is by construction, not by luck. Parameters are computed in
float64 numpy on the host. On the device only operations whose result per
element does not depend on vectorisation, threading or batch layout are used:
gathers and copies, single IEEE-rounded mul/add/sub/div, min/max/floor/clamp,
``where`` and an integer sum (the contrast mean). No convolution, matmul,
float reduction or transcendental function runs on the device.

Pipeline of one view (torchvision semantics, float images in [0, 1]):
RandomResizedCrop + horizontal flip (in `augment`: one separable resampling with
antialiased bilinear weights, as PIL and ``antialias=True`` resize do), then
ColorJitter with a per-sample random order of its four ops (applied with
probability ``p_jitter``), RandomGrayscale, Gaussian blur, solarize, normalise.
Hue is shifted through an exact RGB -> HSV -> RGB round trip (what torchvision
and PIL do), not a YIQ rotation, which only approximates the HSV hue shift.
Unlike PIL-based pipelines, intermediate images are not quantised to uint8.

``mean`` and ``std`` are on the 0-1 scale (torchvision's ``Normalize``
convention, e.g. ``IMAGENET_MEAN``), not FFCV's 0-255 scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from seed_cluster.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ColorJitter op ids, in torchvision's order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_MAX_CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params
# Fixed hash slot of every random parameter, so adding a parameter never changes the others.
_SLOT_CROP_AREA = 0  # slots 0, 2, ..., 18: area fraction of try t
_SLOT_CROP_RATIO = 1  # slots 1, 3, ..., 19: log aspect ratio of try t
_SLOT_CROP_X, _SLOT_CROP_Y, _SLOT_FLIP, _SLOT_JITTER = 20, 21, 22, 23
_SLOT_FACTORS = 24  # 24..27: brightness, contrast, saturation, hue
_SLOT_ORDER = 28  # 28..31: sort keys of the 4 jitter ops
_SLOT_GRAY, _SLOT_BLUR, _SLOT_SIGMA, _SLOT_SOLARIZE = 32, 33, 34, 35
_NUM_SLOTS = 36


@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe; ranges and probabilities as torchvision's transforms take them."""

    scale: tuple[float, float]
    """RandomResizedCrop area fraction range of the source image."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio (w/h) range, sampled log-uniformly."""
    p_flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """ColorJitter strengths (brightness, contrast, saturation, hue)."""
    p_jitter: float = 0.8
    p_gray: float = 0.2
    gray_before_jitter: bool = False
    """MoCo v1 applies RandomGrayscale before ColorJitter."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range, in output pixels."""
    p_blur: float = 0.0
    blur_kernel_frac: float = 0.1
    """Blur kernel size as a fraction of the output size (SimCLR: 10%), made odd, at least 3."""
    p_solarize: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            problems.append(f"scale={self.scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio={self.ratio} must satisfy 0 < lo <= hi")
        for name in ("p_flip", "p_jitter", "p_gray", "p_blur", "p_solarize"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            problems.append(f"jitter={self.jitter} must be >= 0, hue <= 0.5")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            problems.append(f"blur_sigma={self.blur_sigma} must satisfy 0 < lo <= hi")
        if problems:
            raise ConfigError("invalid augmentation recipe: " + "; ".join(problems))


_SIMCLR_COLOR = dict(jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_gray=0.2)  # color distortion s = 1
RECIPES: dict[str, Recipe] = {
    # MoCo v2 (Chen et al. 2020, arXiv 2003.04297), facebookresearch/moco main_moco.py `aug_plus`:
    # RandomResizedCrop(224, scale=(0.2, 1.)), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
    # RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip().
    # SEED (Fang et al. 2021) trains with this recipe.
    "mocov2": Recipe(scale=(0.2, 1.0), p_blur=0.5),
    # MoCo v1 (He et al. 2020, arXiv 1911.05722), same file without `aug_plus`:
    # RandomResizedCrop(224, scale=(0.2, 1.)), RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4)
    # (always applied, after the grayscale), RandomHorizontalFlip(); no blur.
    "mocov1": Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, gray_before_jitter=True),
    # SimCLR (Chen et al. 2020, arXiv 2002.05709) appendix A: crop area 0.08-1, aspect 3/4-4/3, flip,
    # color distortion s=1 (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) p 0.8, grayscale p 0.2), Gaussian blur
    # p 0.5 with sigma in [0.1, 2.0] and a kernel of 10% of the image side.
    "simclr": Recipe(scale=(0.08, 1.0), p_blur=0.5, **_SIMCLR_COLOR),
    # SwAV (Caron et al. 2020, arXiv 2006.09882), facebookresearch/swav src/multicropdataset.py:
    # RandomResizedCrop(size, scale=(min_scale, max_scale)), RandomHorizontalFlip(p=0.5),
    # get_color_distortion(s=1.0) (as SimCLR), PILRandomGaussianBlur (p 0.5, radius 0.1-2).
    # Multi-crop as in its README: 224 px crops with scale 0.14-1, 96 px crops with scale 0.05-0.14.
    "swav_global": Recipe(scale=(0.14, 1.0), p_blur=0.5, **_SIMCLR_COLOR),
    "swav_small": Recipe(scale=(0.05, 0.14), p_blur=0.5, **_SIMCLR_COLOR),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`; raises ConfigError listing the valid names."""
    if name not in RECIPES:
        raise ConfigError(
            f"augmentation recipe {name!r} is unknown; use one of: {', '.join(sorted(RECIPES))}"
        )
    return RECIPES[name]


@dataclass(frozen=True)
class ViewParams:
    """Random parameters of one view for N samples (host numpy arrays, float64 where real)."""

    box: np.ndarray
    """[N, 4] crop (x0, y0, w, h) relative to the source square, before the flip."""
    flip: np.ndarray  # [N] bool
    jitter: np.ndarray  # [N] bool: ColorJitter applied
    factors: np.ndarray
    """[N, 4] brightness, contrast, saturation factors (1 = identity) and hue shift (0 = identity)."""
    order: np.ndarray  # [N, 4] int: order[i, k] is the jitter op (BRIGHTNESS..HUE) sample i runs at stage k
    gray: np.ndarray  # [N] bool
    blur: np.ndarray  # [N] bool
    sigma: np.ndarray  # [N] blur sigma in output pixels
    solarize: np.ndarray  # [N] bool
    recipe: Recipe

    def __len__(self) -> int:
        return len(self.flip)


# --- counter-based hashing -------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (Steele, Lea, Flood 2014): a bijection on uint64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _as_indices(indices) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"indices must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("indices must be non-negative dataset sample indices")
    return arr.astype(np.uint64)


def key_uniforms(seed: int, epoch, indices, view: int, num_slots: int = _NUM_SLOTS) -> np.ndarray:
    """[N, num_slots] float64 uniforms in [0, 1), a pure function of (seed, epoch, index, view, slot).

    `epoch` is one number for the whole batch or one per sample (the feature cache replays, per sample,
    one of K view keys: `seed_cluster.cache.view_epochs`)."""
    idx = _as_indices(indices)
    epochs = np.broadcast_to(_as_indices(np.atleast_1d(epoch)), idx.shape)
    with np.errstate(over="ignore"):
        h = _mix64(np.full(idx.shape, seed % 2**64, dtype=np.uint64) + _GAMMA)
        for value in (epochs, idx,
                      np.full(idx.shape, view % 2**64, dtype=np.uint64)):
            h = _mix64(h + _mix64(value + _GAMMA))  # injective in `value` for a fixed prefix
        slots = np.arange(1, num_slots + 1, dtype=np.uint64) * _GAMMA  # splitmix64 stream from state h
        z = _mix64(h[:, None] + slots[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# View keys reserved for `view_epochs`' per-sample offsets: never a real (epoch, view) pair.
_OFFSET_EPOCH, _OFFSET_VIEW = 2**63, 2**32


def view_epochs(seed: int, epoch: int, indices, views: int) -> np.ndarray:
    """With K = `views` replayed views per image: the view key [N] that sample `indices[i]` shows at `epoch`,
    (epoch + offset_i) mod K with a per-sample offset in [0, K) keyed by (seed, index). Every sample cycles
    through its K views once every K epochs, and a batch mixes view keys (no epoch where all samples show
    view 0). These keys are what the feature cache stores and what `augment` takes as `epoch`."""
    offsets = np.floor(key_uniforms(seed, _OFFSET_EPOCH, indices, _OFFSET_VIEW, num_slots=1)[:, 0] * views)
    return ((epoch + offsets.astype(np.int64)) % views).astype(np.int64)


def _uniform(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def _crop_boxes(u: np.ndarray, scale, ratio) -> np.ndarray:
    """RandomResizedCrop.get_params on a unit square, vectorised over samples and the 10 tries."""
    area = _uniform(u[:, _SLOT_CROP_AREA:2 * _MAX_CROP_TRIES:2], *scale)
    aspect = np.exp(_uniform(u[:, _SLOT_CROP_RATIO:2 * _MAX_CROP_TRIES:2], math.log(ratio[0]), math.log(ratio[1])))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(u))
    w, h = w[rows, first], h[rows, first]
    x0 = u[:, _SLOT_CROP_X] * (1.0 - w)
    y0 = u[:, _SLOT_CROP_Y] * (1.0 - h)
    # No try fits: torchvision's fallback, a central crop of the whole image clamped to the ratio range.
    fb_w, fb_h = (1.0, 1.0 / ratio[0]) if ratio[0] > 1 else (ratio[1], 1.0) if ratio[1] < 1 else (1.0, 1.0)
    missed = ~fits.any(axis=1)
    w, h = np.where(missed, fb_w, w), np.where(missed, fb_h, h)
    x0, y0 = np.where(missed, (1.0 - fb_w) / 2, x0), np.where(missed, (1.0 - fb_h) / 2, y0)
    return np.stack([x0, y0, w, h], axis=1)


# --- pixel crop boxes on the whole image: what the FFCV decoder crops (seed_cluster.ffcv_ops) --------
# The same key hash as `key_uniforms`, compiled with numba so that the decoder (inside FFCV's compiled
# pipeline) and the host (`pixel_boxes`) run one and the same function: the box is bitwise the same in
# both. Tests check the hash against `key_uniforms`.

_NB_GAMMA = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True)
def _nb_mix64(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def nb_key_state(seed, epoch, index, view):
    """The hash state of key (seed, epoch, index, view), all uint64 (as `key_uniforms` computes it)."""
    h = _nb_mix64(np.uint64(seed) + _NB_GAMMA)
    h = _nb_mix64(h + _nb_mix64(np.uint64(epoch) + _NB_GAMMA))
    h = _nb_mix64(h + _nb_mix64(np.uint64(index) + _NB_GAMMA))
    return _nb_mix64(h + _nb_mix64(np.uint64(view) + _NB_GAMMA))


@numba.njit(cache=True)
def nb_slot_uniform(state, slot):
    """Uniform in [0, 1) of hash slot `slot` (column `slot` of `key_uniforms`)."""
    z = _nb_mix64(state + np.uint64(slot + 1) * _NB_GAMMA)
    return np.float64(z >> np.uint64(11)) * 2.0 ** -53


@numba.njit(cache=True)
def nb_view_epoch(seed, epoch, index, views):
    """`view_epochs` for one sample: the view key sample `index` shows at `epoch` with K = `views`."""
    u = nb_slot_uniform(nb_key_state(seed, np.uint64(_OFFSET_EPOCH), index, np.uint64(_OFFSET_VIEW)), 0)
    return (epoch + np.int64(np.floor(u * views))) % views


@numba.njit(cache=True)
def nb_pixel_box(state, height, width, scale_lo, scale_hi, ratio_lo, ratio_hi):
    """torchvision's RandomResizedCrop.get_params on a height x width image, its random draws taken from
    key hash `state` (same slots as `sample_params`): (top, left, crop height, crop width) in pixels."""
    area = np.float64(height) * np.float64(width)
    log_lo, log_hi = np.log(ratio_lo), np.log(ratio_hi)
    for t in range(_MAX_CROP_TRIES):
        target = area * (scale_lo + (scale_hi - scale_lo) * nb_slot_uniform(state, _SLOT_CROP_AREA + 2 * t))
        aspect = np.exp(log_lo + (log_hi - log_lo) * nb_slot_uniform(state, _SLOT_CROP_RATIO + 2 * t))
        w = np.int64(np.round(np.sqrt(target * aspect)))
        h = np.int64(np.round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(nb_slot_uniform(state, _SLOT_CROP_Y) * (height - h + 1))
            left = np.int64(nb_slot_uniform(state, _SLOT_CROP_X) * (width - w + 1))
            return top, left, h, w
    # No try fits: torchvision's fallback, a central crop of the whole image clamped to the ratio range.
    w, h = np.int64(width), np.int64(height)
    if width / height < ratio_lo:
        h = np.int64(np.round(width / ratio_lo))
    elif width / height > ratio_hi:
        w = np.int64(np.round(height * ratio_hi))
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(cache=True)
def _nb_pixel_boxes(seed, epochs, indices, view, heights, widths, scale_lo, scale_hi, ratio_lo, ratio_hi):
    out = np.empty((len(indices), 4), dtype=np.int64)
    for i in range(len(indices)):
        state = nb_key_state(seed, epochs[i], indices[i], view)
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = nb_pixel_box(state, heights[i], widths[i], scale_lo,
                                                                  scale_hi, ratio_lo, ratio_hi)
    return out


def pixel_boxes(seed: int, epoch, indices, view: int, recipe: Recipe, heights, widths) -> np.ndarray:
    """[N, 4] int64 (top, left, height, width): the crop of view `view` of each whole image (heights[i] x
    widths[i] pixels), as RandomResizedCrop(recipe.scale, recipe.ratio) draws it from key (seed, epoch (or
    epoch[i]), indices[i], view). Exactly the box `ffcv_ops.SeededCropDecoder` cuts out."""
    idx = _as_indices(indices)
    epochs = np.ascontiguousarray(np.broadcast_to(_as_indices(np.atleast_1d(epoch)), idx.shape))
    heights, widths = (np.broadcast_to(np.asarray(a, dtype=np.int64), idx.shape).copy() for a in (heights, widths))
    return _nb_pixel_boxes(np.uint64(seed % 2**64), epochs, idx, np.uint64(view % 2**64), heights, widths,
                           float(recipe.scale[0]), float(recipe.scale[1]), float(recipe.ratio[0]),
                           float(recipe.ratio[1]))


def sample_params(seed: int, epoch, indices, view: int, recipe: Recipe) -> ViewParams:
    """All random choices of view `view` of samples `indices` at `epoch` of run `seed`."""
    u = key_uniforms(seed, epoch, indices, view)
    factors = np.empty((len(u), 4))
    for op in (BRIGHTNESS, CONTRAST, SATURATION):
        strength = recipe.jitter[op]
        factors[:, op] = _uniform(u[:, _SLOT_FACTORS + op], max(0.0, 1.0 - strength), 1.0 + strength)
    factors[:, HUE] = _uniform(u[:, _SLOT_FACTORS + HUE], -recipe.jitter[HUE], recipe.jitter[HUE])
    return ViewParams(
        box=_crop_boxes(u, recipe.scale, recipe.ratio),
        flip=u[:, _SLOT_FLIP] < recipe.p_flip,
        jitter=u[:, _SLOT_JITTER] < recipe.p_jitter,
        factors=factors,
        order=np.argsort(u[:, _SLOT_ORDER:_SLOT_ORDER + 4], axis=1, kind="stable"),
        gray=u[:, _SLOT_GRAY] < recipe.p_gray,
        blur=u[:, _SLOT_BLUR] < recipe.p_blur,
        sigma=_uniform(u[:, _SLOT_SIGMA], *recipe.blur_sigma),
        solarize=u[:, _SLOT_SOLARIZE] < recipe.p_solarize,
        recipe=recipe,
    )


# --- crop + resize + flip: separable resampling with per-sample tap tables ------------------------


def _taps(start: np.ndarray, length: np.ndarray, in_size: int, out_size: int, flip: np.ndarray | None):
    """Source indices and weights [N, out_size, T] of a 1-D antialiased bilinear resize of a crop.

    Output pixel o samples source position start + (o + 0.5) * length / out_size (pixel centres,
    align_corners=False) with a triangle filter widened by the downscale factor, truncated to the
    image and renormalised, as PIL's and torch's antialiased bilinear resize do. T depends only on
    (in_size, out_size), so a sample's taps never depend on the rest of the batch.
    """
    num_taps = math.ceil(2 * max(in_size / out_size, 1.0)) + 1
    scale = length / out_size
    support = np.maximum(scale, 1.0)[:, None, None]
    centre = (start[:, None] + (np.arange(out_size) + 0.5) * scale[:, None])[:, :, None]
    first = np.floor(centre - support - 0.5) + 1
    src = first + np.arange(num_taps)
    weight = np.maximum(0.0, 1.0 - np.abs((src + 0.5 - centre) / support))
    weight = np.where((src >= 0) & (src < in_size), weight, 0.0)
    weight /= weight.sum(axis=2, keepdims=True)
    src = np.clip(src, 0, in_size - 1).astype(np.int64)
    if flip is not None:
        src[flip], weight[flip] = src[flip, ::-1], weight[flip, ::-1]
    return src, weight


def _prefix_order(need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Samples sorted by how many taps they need (descending), and how many need more than t taps.

    Skipping a tap whose weights are all zero is exact (acc + 0 * x == acc), so working on the
    prefix of samples that need tap t gives bitwise the result of computing every tap for all.
    """
    order = np.argsort(-need, kind="stable")
    return order, (need[None, :] > np.arange(need.max())[:, None]).sum(axis=1)


def _resample_rows(flat: torch.Tensor, batch: int, rows_per_image: int, src: np.ndarray, weight: np.ndarray):
    """out[b, o] = sum_t weight[b, o, t] * image_b[src[b, o, t]] over rows of flat [batch * rows, L]."""
    used = (weight > 0).any(axis=1)  # [B, T]
    need = src.shape[2] - np.argmax(used[:, ::-1], axis=1)
    order, counts = _prefix_order(need)
    device = flat.device
    global_rows = src[order] + (order * rows_per_image)[:, None, None]
    global_rows = torch.from_numpy(global_rows).to(device)
    w = torch.from_numpy(weight[order].astype(np.float32)).to(device)
    out = None
    for t, count in enumerate(counts):
        term = flat.index_select(0, global_rows[:count, :, t].reshape(-1)).float()
        term = term.view(count, src.shape[1], -1) * w[:count, :, t, None]
        if out is None:
            out = term
        else:
            out.narrow(0, 0, count).add_(term)
    if (order == np.arange(batch)).all():
        return out
    return out.index_select(0, torch.from_numpy(np.argsort(order)).to(device))


def _crop_resize(images: torch.Tensor, box: np.ndarray, flip: np.ndarray | None, size: int) -> torch.Tensor:
    """uint8 [B, H, W, C] and relative boxes -> float32 [B, C, size, size] in [0, 1]."""
    b, h, w, c = images.shape
    ysrc, yw = _taps(box[:, 1] * h, box[:, 3] * h, h, size, None)
    xsrc, xw = _taps(box[:, 0] * w, box[:, 2] * w, w, size, flip)
    rows = _resample_rows(images.reshape(b * h, w * c), b, h, ysrc, yw)  # [B, size, W*C]
    cols = rows.view(b, size, w, c).transpose(1, 2).reshape(b * w, size * c)
    out = _resample_rows(cols, b, w, xsrc, xw)  # [B, size(x), size(y)*C]
    return (out.view(b, size, size, c).permute(0, 3, 2, 1) / 255.0).contiguous()


# --- photometric ops on float [n, 3, S, S] in [0, 1], per-sample factors [n, 1, 1, 1] --------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale: [n, 1, S, S]."""
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor + other * (1.0 - factor)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Mean grey level via an exact integer sum (order-independent, unlike a float reduction).
    fixed = torch.round(_gray(x) * 2.0**24).to(torch.int64).sum(dim=(1, 2, 3))
    mean = (fixed.to(torch.float64) / (2.0**24 * x.shape[2] * x.shape[3])).to(torch.float32)
    return _blend(x, mean.view(-1, 1, 1, 1), factor)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns; value and saturation are kept exactly."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    vmax = torch.maximum(torch.maximum(r, g), b)
    chroma = vmax - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(vmax == r, (g - b) / safe, torch.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = hue6 / 6.0 + shift
    hue = hue - torch.floor(hue)  # wrap to [0, 1)
    hue6 = hue * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B of hsv -> rgb: v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
        k = hue6 + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        channels.append(vmax - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.cat(channels, dim=1)


def _jitter_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if op == BRIGHTNESS:
        return (x * factor).clamp_(0.0, 1.0)
    if op == CONTRAST:
        return _contrast(x, factor)
    if op == SATURATION:
        return _blend(x, _gray(x), factor)
    return _hue(x, factor)


def _blur(x: torch.Tensor, sigma: np.ndarray, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma and reflect padding (torchvision GaussianBlur).

    Taps weighing under 2^-30 of the centre (beyond ~6.4 sigma, below float32 resolution) are set
    to exactly zero, so each sample only pays for the taps its own sigma needs.
    """
    radius = kernel_size // 2
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = np.where(kernel < 2.0**-30, 0.0, kernel)
    kernel /= kernel.sum(axis=1, keepdims=True)
    half = kernel[:, radius:]
    order, counts = _prefix_order((half > 0).sum(axis=1))
    k = torch.from_numpy(half[order].astype(np.float32)).to(x.device).view(len(sigma), -1, 1, 1, 1)
    if not (order == np.arange(len(order))).all():
        x = x.index_select(0, torch.from_numpy(order).to(x.device))
    size = x.shape[-1]
    for dim in (3, 2):
        pad = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        padded = torch.nn.functional.pad(x, pad, mode="reflect")
        out = padded.narrow(dim, radius, size) * k[:, 0]
        for j in range(1, len(counts)):  # symmetric kernel: w_j * (x[i - j] + x[i + j])
            n = counts[j]
            pair = padded[:n].narrow(dim, radius - j, size) + padded[:n].narrow(dim, radius + j, size)
            out.narrow(0, 0, n).add_(pair * k[:n, j])
        x = out
    if (order == np.arange(len(order))).all():
        return x
    return x.index_select(0, torch.from_numpy(np.argsort(order)).to(x.device))


def _subset_apply(x: torch.Tensor, mask: np.ndarray, fn) -> torch.Tensor:
    """x[mask] = fn(x[mask], selected positions), computing only the selected samples."""
    if not mask.any():
        return x
    rows = np.flatnonzero(mask)
    if len(rows) == len(mask):
        return fn(x, rows)
    sel = torch.from_numpy(rows).to(x.device)
    return x.index_copy_(0, sel, fn(x.index_select(0, sel), rows))  # x is this module's own buffer


def _per_sample(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(values.astype(np.float32)).to(device).view(-1, 1, 1, 1)


def _color_jitter(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """ColorJitter with each sample's own op order; each stage runs each op once on its group."""
    strengths = params.recipe.jitter
    for stage in range(4):
        for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
            if strengths[op] == 0:
                continue  # torchvision skips an op whose range is None
            group = params.jitter & (params.order[:, stage] == op)
            x = _subset_apply(x, group, lambda t, rows, op=op: _jitter_op(
                op, t, _per_sample(params.factors[rows, op], t.device)))
    return x


def _grayscale(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    return _subset_apply(x, params.gray, lambda t, rows: _gray(t).expand(-1, 3, -1, -1).contiguous())


def blur_kernel_size(size: int, frac: float) -> int:
    """Odd kernel size of about `frac` of `size`, at least 3 (224 px, 10% -> 23)."""
    k = max(3, int(round(frac * size)))
    return k if k % 2 else k + 1


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t, std_t = (torch.tensor([float(v) for v in vals], dtype=torch.float32, device=x.device)
                     for vals in (mean, std))
    if len(mean_t) != x.shape[1] or len(std_t) != x.shape[1]:
        raise ValueError(f"mean and std need {x.shape[1]} values, got {len(mean_t)} and {len(std_t)}")
    if mean_t.max() > 1 or std_t.max() > 1:
        raise ValueError(f"mean={tuple(mean)} std={tuple(std)} look 0-255 scaled; pass them on the 0-1 scale")
    return (x - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3] (channels-last), got {images.dtype} "
                         f"{tuple(images.shape)}")


def apply_view(images: torch.Tensor, params: ViewParams, *, size: int, mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """Apply sampled `params` to uint8 [B, H, W, 3] images: float32 [B, 3, size, size], normalised."""
    _check_images(images)
    if len(params) != images.shape[0]:
        raise ValueError(f"{len(params)} parameter sets for {images.shape[0]} images")
    return _photometric(_crop_resize(images, params.box, params.flip, size), params, mean, std)


def _photometric(x: torch.Tensor, params: ViewParams, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    recipe = params.recipe
    if recipe.gray_before_jitter:
        x = _grayscale(x, params)
    x = _color_jitter(x, params)
    if not recipe.gray_before_jitter:
        x = _grayscale(x, params)
    kernel = blur_kernel_size(x.shape[-1], recipe.blur_kernel_frac)
    x = _subset_apply(x, params.blur, lambda t, rows: _blur(t, params.sigma[rows], kernel))
    x = _subset_apply(x, params.solarize, lambda t, rows: torch.where(t >= 0.5, 1.0 - t, t))
    return _normalize(x, mean, std)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1] (contiguous, a new tensor)."""
    _check_images(images)
    return (images.permute(0, 3, 1, 2).float() / 255.0).contiguous()


def finish_view(crops: torch.Tensor, indices, *, seed: int, epoch, view: int, recipe: Recipe,
                mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The rest of a view whose crop the decoder already cut (`ffcv_ops.SeededCropDecoder`, the box of
    `pixel_boxes`): horizontal flip and the photometric ops of key (seed, epoch (or epoch[i]), indices[i],
    view), on the crops' device. crops: uint8 [B, S, S, 3]. Returns float32 [B, 3, S, S], normalised."""
    params = sample_params(seed, epoch, indices, view, recipe)
    if len(params) != crops.shape[0]:
        raise ValueError(f"{len(params)} indices for {crops.shape[0]} crops")
    x = _subset_apply(to_float(crops), params.flip, lambda t, rows: t.flip(3))
    return _photometric(x, params, mean, std)


def normalize_images(images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] (the eval views the decoder already cropped)."""
    return _normalize(to_float(images), mean, std)


def augment(images: torch.Tensor, indices, *, seed: int, epoch, view: int, recipe: Recipe,
            size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One random view of each image, a pure function of (seed, epoch (or epoch[i]), indices[i], view).

    images: uint8 [B, H, W, 3] channels-last (as FFCV yields), any device. indices: [B] dataset
    sample indices. mean/std: per channel, 0-1 scale. Returns float32 [B, 3, size, size] on the
    images' device, bitwise identical for the same key whatever the batch, process or thread count.
    """
    params = sample_params(seed, epoch, indices, view, recipe)
    return apply_view(images, params, size=size, mean=mean, std=std)


def center_view(images: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float],
                crop_fraction: float = 0.875) -> torch.Tensor:
    """Eval transform: Resize(int(size / crop_fraction)) of the shorter side + CenterCrop(size)."""
    _check_images(images)
    b, h, w, _ = images.shape
    resized = int(size / crop_fraction)
    side_h, side_w = size * min(h, w) / (resized * h), size * min(h, w) / (resized * w)
    if side_h > 1 or side_w > 1:
        raise ValueError(f"crop_fraction={crop_fraction} must be <= 1")
    # torchvision's CenterCrop offset is rounded to whole pixels of the resized image.
    top = round((resized * h / min(h, w) - size) / 2) * min(h, w) / (resized * h)
    left = round((resized * w / min(h, w) - size) / 2) * min(h, w) / (resized * w)
    box = np.tile(np.array([[left, top, side_w, side_h]]), (b, 1))
    return _normalize(_crop_resize(images, box, None, size), mean, std)

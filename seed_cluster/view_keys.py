"""View keys: every random choice of a view is a pure function of (seed, epoch, sample index, view index).

FFCV's own random transforms draw from numba's unseeded RNG (DESIGN.md section 4), so every
parameter of a view here is a pure function of its key: a counter-based hash (splitmix64, in numpy
uint64) turns the key plus a fixed "slot" per parameter into uniforms in [0, 1). No global RNG state
is read or advanced. That is what makes exact resume and the teacher-feature cache possible: a view
can be regenerated bit-for-bit in another process, run, batch or world size.

`sample_params` gives all of a view's parameters (host numpy, float64), which `seed_cluster.augment`
applies; `pixel_boxes` is the crop in pixels of a whole image, computed by the same numba code that
`seed_cluster.ffcv_ops.SeededCropDecoder` runs inside FFCV's pipeline; `view_epochs` is the per-sample
view key when a run replays K views per image (the teacher feature cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from seed_cluster.recipes import Recipe

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
    one of K view keys: `view_epochs`)."""
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
    view 0). These keys are what the feature cache stores and what `sample_params` and `pixel_boxes` take as `epoch`."""
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

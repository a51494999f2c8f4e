"""Seeded, replayable augmentation: a view's pixels from its parameters, which its key decides.

`seed_cluster.view_keys` draws every random choice of a view from the key (seed, epoch, sample
index, view index); this module applies them, so a view can be regenerated bit-for-bit in another
process, run, batch or world size.

Where the work runs. Training crops in the decoder: `view_keys.pixel_boxes` (RandomResizedCrop on the
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

import numpy as np
import torch

from seed_cluster.recipes import Recipe
from seed_cluster.view_keys import BRIGHTNESS, CONTRAST, HUE, SATURATION, ViewParams, sample_params

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
    return _unit(out.view(b, size, size, c).permute(0, 3, 2, 1))


# --- photometric ops on float [n, 3, S, S] in [0, 1], per-sample factors [n, 1, 1, 1] --------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale: [n, 1, S, S]."""
    return x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).add_(other * (1.0 - factor)).clamp_(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Mean grey level via an exact integer sum (order-independent, unlike a float reduction).
    fixed = torch.round(_gray(x) * 2.0**24).to(torch.int64).sum(dim=(1, 2, 3))
    mean = (fixed.to(torch.float64) / (2.0**24 * x.shape[2] * x.shape[3])).to(torch.float32)
    return _blend(x, mean.view(-1, 1, 1, 1), factor)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns; value and saturation are kept exactly.

    In-place steps on its own temporaries where it can: a plane allocated and written per step made this
    op 1.4-1.8x slower on the CPU (same floats either way: every step is the same IEEE operation)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    vmax = torch.maximum(torch.maximum(r, g), b)
    chroma = vmax - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, 1.0)
    hue6 = torch.where(vmax == r, (g - b).div_(safe),
                       torch.where(vmax == g, (b - r).div_(safe).add_(2.0), (r - g).div_(safe).add_(4.0)))
    hue = hue6.div_(6.0).add_(shift)
    hue6 = hue.sub_(torch.floor(hue)).mul_(6.0)  # wrapped to [0, 1), then in sixths of a turn
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):  # R, G, B of hsv -> rgb: v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
        k = hue6 + n
        k.sub_((k >= 6.0) * 6.0)
        torch.sub(vmax, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(chroma), out=out[:, c:c + 1])
    return out


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
        pair = torch.empty_like(out)  # one buffer for every tap: allocating per tap cost more than the sums
        for j in range(1, len(counts)):  # symmetric kernel: w_j * (x[i - j] + x[i + j])
            n = counts[j]
            torch.add(padded[:n].narrow(dim, radius - j, size), padded[:n].narrow(dim, radius + j, size),
                      out=pair[:n])
            out[:n].add_(pair[:n].mul_(k[:n, j]))
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
    return x.sub_(mean_t.view(1, -1, 1, 1)).div_(std_t.view(1, -1, 1, 1))  # x is always this module's own


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


def _unit(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous float32 tensor of x's shape holding x / 255, x any dtype and strides (a permuted view):
    one transposing copy and an in-place divide. (`(x.float() / 255).contiguous()` made three passes, the
    last a strided one, and took 4x as long on the CPU.)"""
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x).div_(255.0)


def to_float(images: torch.Tensor, flip: np.ndarray | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1] (contiguous, a new tensor), sample i mirrored
    left-right where flip[i] (on the uint8 pixels: a quarter of the bytes of flipping floats)."""
    _check_images(images)
    if flip is not None and flip.any():
        mirror = torch.from_numpy(np.asarray(flip, dtype=bool)).to(images.device).view(-1, 1, 1, 1)
        images = torch.where(mirror, images.flip(2), images)
    return _unit(images.permute(0, 3, 1, 2))


def finish_view(crops: torch.Tensor, indices, *, seed: int, epoch, view: int, recipe: Recipe,
                mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The rest of a view whose crop the decoder already cut (`ffcv_ops.SeededCropDecoder`, the box of
    `pixel_boxes`): horizontal flip and the photometric ops of key (seed, epoch (or epoch[i]), indices[i],
    view), on the crops' device. crops: uint8 [B, S, S, 3]. Returns float32 [B, 3, S, S], normalised."""
    params = sample_params(seed, epoch, indices, view, recipe)
    if len(params) != crops.shape[0]:
        raise ValueError(f"{len(params)} indices for {crops.shape[0]} crops")
    return _photometric(to_float(crops, params.flip), params, mean, std)


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

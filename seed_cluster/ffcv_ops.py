"""FFCV decoder operations that cut each view's seeded crop out of the whole image while decoding.

`SeededCropDecoder` decodes an image once and writes every view of it: for view v, the box
`view_keys.pixel_boxes` gives for key (seed, epoch, sample index, v) (RandomResizedCrop on the
whole image, torchvision's semantics), resized to the view's side: with OpenCV's INTER_AREA
(what FFCV's own RandomResizedCropRGBImageDecoder does) when the box is at least the view's
side both ways, else bilinearly (`resize_bilinear`; INTER_AREA enlarges almost like nearest
neighbour, which made small crops of small images blocky). The box is computed inside FFCV's
compiled pipeline by the very numba function `view_keys.pixel_boxes` runs, so host and decoder
agree bit for bit. Flip and photometric ops then run batched on the device
(`augment.finish_view`), keyed the same way.

Each JPEG is decoded whole, once, whatever its number of views. Decoding only the union of the
boxes costs more, not less: FFCV's region decode is a lossless crop (turbojpeg re-encodes the
region) followed by a decode, 1.05-2.6x a whole decode for regions of 20-90% of the image and
0.8-0.9x only below 10% (`python bench/jpeg_region.py`), where SEED's boxes and their union cover
14-100% of it (5-14% for a lone swav_small view).

The epoch. numba freezes a NumPy array captured by a compiled function into a compile-time
constant (DESIGN.md §4), and FFCV compiles its pipeline once. So the decoder keeps the epoch in
a one-element array of its own and the compiled code captures only that array's *address*,
loading the value through it at every batch: `set_epoch` changes the crops of the next batches
without recompiling. Call it before iterating the loader for that epoch (FFCV's thread decodes
batches ahead), never while an epoch's batches are still wanted. With `replayed_views` K > 0 the decoder turns the epoch into each sample's
view key (`view_keys.view_epochs`, the feature cache's keys) inside the pipeline too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.state import State
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .recipes import Recipe
from .view_keys import nb_key_state, nb_pixel_box, nb_view_epoch


@intrinsic
def _load_int64(typingctx, address):
    """The int64 stored at memory address `address` (an integer), read when the code runs."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))
        return builder.load_atomic(pointer, "monotonic", 8)

    return types.int64(address), codegen


_FRAC = 11  # fixed-point fraction bits of the bilinear weights (as OpenCV's INTER_LINEAR on uint8)


@numba.njit(cache=True)
def _taps(out_len, length, offset):
    """First source index, next one and fixed-point weight of the second, per output position (integers only:
    the result cannot depend on compiler flags such as the fast-math FFCV compiles its pipeline with)."""
    one = np.int64(1) << _FRAC
    first, second, weight = np.empty(out_len, np.int64), np.empty(out_len, np.int64), np.empty(out_len, np.int64)
    for o in range(out_len):
        # source position (o + 1/2) * length / out_len - 1/2, clamped at 0, in 1/2^_FRAC pixels
        p = max(np.int64(0), ((2 * o + 1) * length - out_len) * one // (2 * out_len))
        i = p >> _FRAC
        w = p & (one - 1)
        if i >= length - 1:
            i, w = length - 1, np.int64(0)
        first[o], second[o], weight[o] = offset + i, offset + min(i + 1, length - 1), w
    return first, second, weight


@numba.njit(cache=True)
def resize_bilinear(image, top, left, height, width, out):
    """out[:] = the box (top, left, height, width) of uint8 image [H, W, 3] resized bilinearly to out's shape
    (pixel centres, align_corners=False, edges clamped; 11-bit fixed-point weights, rounded to nearest):
    torchvision's bilinear resize without antialiasing, for enlarging. Separable (each output row blends two
    source rows, then columns), in integers: the same sums as the 2-D formula, exactly."""
    one = np.int64(1) << _FRAC
    x0, x1, wx = _taps(out.shape[1], width, 0)
    y0, y1, wy = _taps(out.shape[0], height, top)
    half = np.int64(1) << (2 * _FRAC - 1)
    rows = np.empty((width, 3), np.int64)
    for oy in range(out.shape[0]):
        upper, lower = image[y0[oy], left:left + width], image[y1[oy], left:left + width]
        a, b = one - wy[oy], wy[oy]
        for x in range(width):
            for c in range(3):
                rows[x, c] = np.int64(upper[x, c]) * a + np.int64(lower[x, c]) * b
        for ox in range(out.shape[1]):
            i, j, w = x0[ox], x1[ox], wx[ox]
            for c in range(3):
                out[oy, ox, c] = np.uint8((rows[i, c] * (one - w) + rows[j, c] * w + half) >> (2 * _FRAC))


class SeededCropDecoder(SimpleRGBImageDecoder):
    """Decode an RGBImageField and write all views of each image into one flat uint8 row per sample:
    view v is [size_v, size_v, 3] at byte `offsets[v]` (see `split_views`). (A SimpleRGBImageDecoder
    subclass only because FFCV recognises a pipeline's decoder by the field's decoder class.)"""

    def __init__(self, views: Sequence[tuple[Recipe, int]], seed: int, replayed_views: int = 0):
        """`views`: (recipe, side) of each view, in view-index order. `replayed_views` K > 0: sample i at
        epoch e uses view key `view_keys.view_epochs(seed, e, i, K)` instead of e."""
        super().__init__()
        if not views:
            raise ValueError("SeededCropDecoder needs at least one view")
        self.views = tuple(views)
        self.sizes = np.array([size for _, size in self.views], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes ** 2)]).astype(np.int64)
        self.seed, self.replayed_views = seed, replayed_views
        self._epoch = np.zeros(1, dtype=np.int64)  # read by the compiled code through its address

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Crops of batches decoded from now on use `epoch` (a view key when replayed_views == 0)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self._epoch[0] = epoch

    def split_views(self, rows):
        """Flat rows [B, total] (numpy or torch) -> one [B, size, size, 3] view (no copy) per view."""
        return [rows[:, self.offsets[v]:self.offsets[v + 1]].reshape(len(rows), size, size, 3)
                for v, size in enumerate(self.sizes.tolist())]

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        max_width = np.uint64(self.metadata["width"].max())
        max_height = np.uint64(self.metadata["height"].max())
        shape = (int(self.offsets[-1]),)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")),
                 AllocationQuery((max_height * max_width * np.uint64(3),), np.dtype("<u1"))))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        num_views = len(self.views)
        sizes, offsets = self.sizes, self.offsets
        params = np.array([[r.scale[0], r.scale[1], r.ratio[0], r.ratio[1]] for r, _ in self.views])
        seed = np.uint64(self.seed % 2**64)
        replayed = self.replayed_views
        epoch_address = self._epoch.ctypes.data  # an int: frozen, but what it points to is not

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = _load_int64(epoch_address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                key = nb_view_epoch(seed, epoch, np.uint64(source_ix), replayed) if replayed > 0 else epoch
                if field["mode"] == jpg:
                    image = temp_storage[dst_ix].reshape(-1)[:3 * height * width].reshape(height, width, 3)
                    imdecode_c(image_data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    image = image_data.reshape(height, width, 3)
                row = destination[dst_ix]
                for v in range(num_views):
                    state = nb_key_state(seed, np.uint64(key), np.uint64(source_ix), np.uint64(v))
                    top, left, h, w = nb_pixel_box(state, height, width, params[v, 0], params[v, 1],
                                                   params[v, 2], params[v, 3])
                    out = row[offsets[v]:offsets[v + 1]].reshape(sizes[v], sizes[v], 3)
                    if h < sizes[v] or w < sizes[v]:
                        resize_bilinear(image, top, left, h, w, out)
                    else:
                        resize_crop_c(image, top, top + h, left, left + w, out)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

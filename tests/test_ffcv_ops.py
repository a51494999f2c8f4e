"""SeededCropDecoder on real JPEGs: the crops are augment's boxes of the full decode, the epoch reaches the
compiled pipeline, and the output does not depend on the thread count."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from ffcv.libffcv import imdecode
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from PIL import Image

from ffcv_build import build_imagefolder
from seed_cluster.data import _pipelines
from seed_cluster.ffcv_ops import SeededCropDecoder
from seed_cluster.recipes import RECIPES
from seed_cluster.view_keys import pixel_boxes

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SIZES = [(300, 200), (180, 320), (256, 256), (400, 300), (220, 240), (333, 251), (97, 130), (512, 384)]
# One global and two small views: the 64 px one is often enlarged (bilinear) while the others shrink
# (INTER_AREA).
VIEWS = [(RECIPES["swav_global"], 48), (RECIPES["swav_small"], 24), (RECIPES["swav_small"], 64)]


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour structure plus fine texture, so a crop off by a pixel changes the result."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    channels = [127 + 90 * np.sin(x / w * rng.uniform(2, 9) + rng.uniform(0, 3)) *
                np.cos(y / h * rng.uniform(2, 9) + rng.uniform(0, 3)) + rng.normal(0, 12, (h, w))
                for _ in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def jpeg_beton(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    for k in range(24):
        w, h = SIZES[k % len(SIZES)]
        (root / "src" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        photo_like(w, h, k).save(root / "src" / f"c{k % 2}" / f"{k:02d}.jpg", quality=90)
    build_imagefolder(root / "src", root / "train.beton", max_side=None, write_mode="jpg", workers=1)
    return root / "train.beton"


def full_decodes(beton: Path) -> list[np.ndarray]:
    """Every image decoded whole by FFCV's own JPEG decoder (libffcv.imdecode), in file order."""
    reader = Reader(str(beton))
    raw = np.fromfile(beton, dtype=np.uint8)
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist(), strict=True))
    images = []
    for meta in reader.metadata["f0"]:
        h, w, ptr = int(meta["height"]), int(meta["width"]), int(meta["data_ptr"])
        image = np.zeros((h, w, 3), np.uint8)
        assert imdecode(raw[ptr:ptr + sizes[ptr]], image, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        images.append(image)
    return images


def decode_epochs(beton: Path, decoder: SeededCropDecoder, epochs, workers: int = 1) -> list[np.ndarray]:
    """[N, total] rows of every sample (file order) for each epoch, from ONE compiled loader."""
    loader = Loader(str(beton), batch_size=10, num_workers=workers, order=OrderOption.SEQUENTIAL,
                    pipelines=_pipelines(decoder), drop_last=False)
    code = loader.code
    out = []
    for epoch in epochs:
        decoder.set_epoch(epoch)
        out.append(np.concatenate([rows.numpy().copy() for rows, _, _ in loader]))
    assert loader.code is code  # never recompiled
    return out


def expected_crops(images: list[np.ndarray], seed: int, epoch: int, view: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's resize of augment's box of each whole image: INTER_AREA when shrinking both ways (as the
    decoder must give exactly), else INTER_LINEAR (the decoder's own bilinear: within 1 of OpenCV's
    fixed-point one). Returns (crops, enlarged [N] bool)."""
    recipe, size = VIEWS[view]
    crops, enlarged = [], []
    for i, image in enumerate(images):
        t, x, h, w = pixel_boxes(seed, epoch, [i], view, recipe, *image.shape[:2])[0]
        enlarged.append(h < size or w < size)
        method = cv2.INTER_LINEAR if enlarged[-1] else cv2.INTER_AREA
        crops.append(cv2.resize(image[t:t + h, x:x + w], (size, size), interpolation=method))
    return np.stack(crops), np.array(enlarged)


def assert_crops_match(got: np.ndarray, images: list[np.ndarray], seed: int, epoch: int, view: int) -> None:
    expected, enlarged = expected_crops(images, seed, epoch, view)
    assert np.array_equal(got[~enlarged], expected[~enlarged])
    diff = np.abs(got[enlarged].astype(int) - expected[enlarged])
    if diff.size:
        assert diff.max() <= 1 and diff.mean() < 0.2


def test_crops_are_augments_pixel_boxes_of_the_whole_decoded_image_resized(jpeg_beton):
    images = full_decodes(jpeg_beton)
    decoder = SeededCropDecoder(VIEWS, seed=4)
    (rows,) = decode_epochs(jpeg_beton, decoder, [3])
    enlarged = []
    for v in range(len(VIEWS)):
        assert_crops_match(decoder.split_views(rows)[v], images, 4, 3, v)
        enlarged.append(expected_crops(images, 4, 3, v)[1])
    assert np.concatenate(enlarged).any() and not np.concatenate(enlarged).all()  # both resize paths ran


def test_set_epoch_reaches_the_compiled_pipeline_and_epochs_replay(jpeg_beton):
    decoder = SeededCropDecoder(VIEWS, seed=4)
    first, second, again = decode_epochs(jpeg_beton, decoder, [0, 1, 0])
    assert np.array_equal(first, again)
    differs = [not np.array_equal(a, b) for a, b in zip(first, second, strict=True)]
    assert all(differs)  # every image's crops changed with the epoch
    images = full_decodes(jpeg_beton)
    assert_crops_match(decoder.split_views(second)[1], images, 4, 1, 1)


def test_output_does_not_depend_on_the_thread_count_or_the_seed_only_on_the_key(jpeg_beton):
    one = decode_epochs(jpeg_beton, SeededCropDecoder(VIEWS, seed=4), [2], workers=1)[0]
    two = decode_epochs(jpeg_beton, SeededCropDecoder(VIEWS, seed=4), [2], workers=2)[0]
    other_seed = decode_epochs(jpeg_beton, SeededCropDecoder(VIEWS, seed=5), [2], workers=1)[0]
    assert np.array_equal(one, two)
    assert not np.array_equal(one, other_seed)


def test_bilinear_enlargement_is_torchvisions_bilinear_resize_without_antialias():
    import torch
    import torch.nn.functional as F

    from seed_cluster.ffcv_ops import resize_bilinear

    image = np.array(photo_like(40, 30, 1))  # a writable copy: torch.from_numpy warns on read-only arrays
    out = np.zeros((37, 37, 3), np.uint8)
    resize_bilinear(image, 5, 7, 20, 25, out)
    crop = torch.from_numpy(image[5:25, 7:32]).permute(2, 0, 1)[None].double()
    reference = F.interpolate(crop, size=(37, 37), mode="bilinear", align_corners=False, antialias=False)
    diff = (torch.from_numpy(out).permute(2, 0, 1)[None].double() - reference).abs()
    assert diff.max() <= 0.75  # rounding to uint8 (0.5) and 11-bit weights (255 / 2^11)


def test_decoder_refuses_no_views_and_negative_epochs():
    with pytest.raises(ValueError, match="at least one view"):
        SeededCropDecoder([], seed=0)
    with pytest.raises(ValueError, match="epoch=-1"):
        SeededCropDecoder(VIEWS, seed=0).set_epoch(-1)

"""Data-loader throughput on realistic JPEGs: FFCV + seeded augmentation vs torchvision, seeded vs unseeded.

    python bench/data_loader.py            # 2000 images, whole epochs (about 10 minutes on 2 cores)
    python bench/data_loader.py --quick    # 600 images, a few batches per pipeline (a few minutes)
    python bench/data_loader.py --device cuda   # on a GPU node: flip + photometric ops on the GPU

The images are real photographs that ship with scikit-image and scikit-learn (astronaut,
coffee, rocket, chelsea, retina, hubble, textures, ...; `pip install -e .[dev]`), cut into
many distinct crops with random position, aspect and scale, rescaled to a 300-500 px
longer side and saved as JPEG quality 90 in an ImageFolder tree; the .beton is built from
that tree with `ffcv_build` (JPEG, max side 512). Every pipeline runs on the same cores
with the same thread / worker count and batch size; figures are images/s from ONE run
(no timing claims are tested: others share this machine, so expect noise of 10-20%).
Pipelines that a ratio compares are timed in one group, taking turns in interleaved rounds
(`--rounds`), so the machine's drift hits both sides alike; each ratio is printed with the
median and range of its per-round ratios. Each turn starts after a pause and a few untimed
batches, so no pipeline is timed on batches it prefetched during another's turn.

Pipelines (all end in normalised float32 [B, 3, 224, 224] tensors):
- ffcv seed (1 view), ffcv mocov2 (2 views): `seed_cluster.data.TrainStream` on this CPU,
  i.e. FFCV's SeededCropDecoder decodes each JPEG once and cuts the seeded crops of the
  whole image at 224, then the seeded flip + photometric ops run in torch on the same
  cores (with --device cuda, on the GPU instead, as in training on a GPU node).
- torchvision: ImageFolder + DataLoader(num_workers=threads), PIL ops of the same recipe
  (RandomResizedCrop 0.2-1, ColorJitter .4/.4/.4/.1 p .8, grayscale p .2, blur p .5, flip).
- geometric ops only: FFCV's own unseeded RandomResizedCropRGBImageDecoder +
  RandomHorizontalFlip (+ ToTensor/ToTorchImage/NormalizeImage) vs the seeded path
  (SeededCropDecoder + seeded flip and normalisation in torch); and the two crop decoders
  alone (uint8 out, same scale 0.2-1).
- small patch: 1 global (swav_global, 224) + 6 small (swav_small, 96) views vs two views.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# This machine is shared: with OpenMP's default spin-waiting, torch's threads stall whenever another
# process holds a core (a batch of augmentation took 17x longer). Passive waiting avoids that; set
# before torch is imported, for every pipeline alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
          "retina.jpg", "hubble_deep_field.jpg", "ihc.png", "camera.png", "coins.png", "moon.png", "brick.png",
          "grass.png", "gravel.png"]
NUM_CLASSES = 10
BATCH = 64


def source_photos() -> list:
    from PIL import Image

    try:
        import skimage
    except ImportError:
        sys.exit("bench/data_loader.py needs scikit-image's sample photographs: pip install -e '.[dev]'")
    import sklearn.datasets

    data_dir = Path(skimage.__file__).parent / "data"
    photos = [Image.open(data_dir / name).convert("RGB") for name in PHOTOS]
    photos += [Image.fromarray(a) for a in sklearn.datasets.load_sample_images().images]  # china, flower
    return photos


def make_jpeg_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` distinct JPEGs (300-500 px longer side) cut from the sample photographs, in NUM_CLASSES folders."""
    from PIL import Image

    folder = root / f"jpegs-{count}"
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    photos = source_photos()
    for k in range(count):
        photo = photos[rng.integers(len(photos))]
        w, h = photo.size
        area = rng.uniform(0.25, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(np.sqrt(area * aspect))), min(h, int(np.sqrt(area / aspect)))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        side = rng.integers(300, 501)
        scale = side / max(cw, ch)
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))),
                                                            Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        out = folder / f"class{k % NUM_CLASSES}" / f"{k:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=90)
    (folder / "done").touch()
    return folder


def build_beton(folder: Path) -> Path:
    from ffcv_build import build_imagefolder

    beton = folder.with_suffix(".beton")
    if not beton.exists():
        build_imagefolder(folder, beton, max_side=512, quality=90, write_mode="jpg")
    return beton


# --- timing ----------------------------------------------------------------------------------------


def batch_size(batch) -> int:
    if isinstance(batch, (tuple, list)):  # (images or views, labels, ...) or (images,)
        return len(batch[1] if len(batch) > 1 else batch[0])
    return len(batch.indices)  # a TrainStream Batch


SETTLE_S = 3.0
"""Pause before each turn: the pipeline timed last refills its prefetch buffers alone, not during the next turn."""
DRAIN = 5
"""Untimed batches at the start of each turn: FFCV keeps 3 batches ahead and torchvision 2 per worker; a turn's
first batches were decoded during the others' turns, so timing them would flatter whoever buffers most."""


def timed_group(makers: dict, num_batches: int, rounds: int, sync, warmup: int = 2) -> tuple[dict, dict]:
    """Time the pipelines of one group in `rounds` rounds of num_batches // rounds batches each, taking
    turns within a round (the order reversed every other round), so the machine's drift hits them alike.
    `sync()` waits for the device's queued work (CUDA runs it asynchronously). Returns {name: images/s over
    all rounds} and {name: [images/s of each round]}."""
    iterators = {}
    for name, make in makers.items():
        iterators[name] = iter(make())
        for _ in range(warmup):  # compilation, worker start-up, page cache
            next(iterators[name])
    per_round = max(1, num_batches // rounds)
    images, seconds, rates = {n: 0 for n in makers}, {n: 0.0 for n in makers}, {n: [] for n in makers}
    for r in range(rounds):
        for name in (list(makers) if r % 2 == 0 else list(makers)[::-1]):
            time.sleep(SETTLE_S)
            for _ in range(DRAIN):
                next(iterators[name])
            start, count = time.perf_counter(), 0
            for _ in range(per_round):
                count += batch_size(next(iterators[name]))
            sync()
            elapsed = time.perf_counter() - start
            images[name] += count
            seconds[name] += elapsed
            rates[name].append(count / elapsed)
    return {n: images[n] / seconds[n] for n in makers}, rates


def data_cfg(beton: Path, threads: int):
    from seed_cluster.config import DataConfig

    return DataConfig(train=str(beton), resolution=224, batch_size_per_rank=BATCH, num_workers=threads)


def ffcv_stream(beton: Path, threads: int, num_views, device: str = "cpu"):
    import torch

    from seed_cluster.data import TrainStream

    return TrainStream(data_cfg(beton, threads), seed=0, rank=0, world_size=1, num_views=num_views,
                       device=torch.device(device))


def torchvision_loader(folder: Path, threads: int, two_views: bool):
    import torch
    from torchvision import datasets, transforms

    from seed_cluster.recipes import IMAGENET_MEAN, IMAGENET_STD

    one = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    transform = (lambda img: (one(img), one(img))) if two_views else one
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=threads,
                                         drop_last=True, persistent_workers=True)
    return endless(lambda: loader)


def endless(make):
    while True:
        yield from make()


def ffcv_unseeded(beton: Path, threads: int):
    """FFCV's own random ops (numba RNG, not seeded): the ffcv-imagenet training pipeline."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    from seed_cluster.recipes import IMAGENET_MEAN, IMAGENET_STD

    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    # NormalizeImage's CPU version is numba code on HWC arrays: it goes before ToTensor (after it,
    # ffcv 1.0.2's pipeline grouping loops forever).
    pipelines = {"image": [RandomResizedCropRGBImageDecoder((224, 224), scale=(0.2, 1.0)), RandomHorizontalFlip(),
                           NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()],
                 "label": [IntDecoder(), ToTensor(), Squeeze(1)], "index": [IntDecoder(), ToTensor(), Squeeze(1)]}
    loader = Loader(str(beton), batch_size=BATCH, num_workers=threads, order=OrderOption.RANDOM,
                    pipelines=pipelines, drop_last=True)
    return endless(lambda: loader)


def ffcv_unseeded_crop_only(beton: Path, threads: int):
    """FFCV's own unseeded RandomResizedCropRGBImageDecoder alone (uint8 out): the decoder to compare the
    seeded crop decoder with, op for op."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor

    pipelines = {"image": [RandomResizedCropRGBImageDecoder((224, 224), scale=(0.2, 1.0)), ToTensor()],
                 "label": [IntDecoder(), ToTensor(), Squeeze(1)], "index": [IntDecoder(), ToTensor(), Squeeze(1)]}
    loader = Loader(str(beton), batch_size=BATCH, num_workers=threads, order=OrderOption.RANDOM,
                    pipelines=pipelines, drop_last=True)
    return endless(lambda: loader)


def seeded_geometric(beton: Path, threads: int, device: str = "cpu"):
    """The seeded path with the same geometric ops only: seeded crop in the decoder, seeded flip in torch."""
    from seed_cluster.data import ViewSpec
    from seed_cluster.recipes import get_recipe

    crop_flip = replace(get_recipe("mocov2"), p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    return ffcv_stream(beton, threads, [ViewSpec(crop_flip, 224)], device)


def decode_only(beton: Path, threads: int, num_views=1):
    """FFCV's part of the seeded path alone: decode + seeded crops at 224, no flip or photometric ops."""
    stream = ffcv_stream(beton, threads, num_views)
    return endless(lambda: stream.loader)


def augment_only(beton: Path, threads: int, recipe: str = "mocov2", size: int = 224, device: str = "cpu"):
    """The torch part alone (flip + photometric ops), on one batch of crops decoded once (same thread count)."""
    import torch

    from seed_cluster.augment import finish_view
    from seed_cluster.data import ViewSpec
    from seed_cluster.recipes import IMAGENET_MEAN, IMAGENET_STD, get_recipe

    stream = ffcv_stream(beton, threads, [ViewSpec(recipe, size)])
    rows, _, indices = next(iter(stream.loader))
    (crops,), indices = stream.decoder.split_views(rows.clone().to(device)), indices.clone()
    torch.set_num_threads(threads)

    def batches():
        epoch = 0
        while True:
            epoch += 1
            yield (finish_view(crops, indices, seed=0, epoch=epoch, view=0, recipe=get_recipe(recipe),
                               mean=IMAGENET_MEAN, std=IMAGENET_STD),)
    return batches()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="600 images and 6 timed batches per pipeline")
    parser.add_argument("--images", type=int, default=None, help="number of JPEGs (default 2000, quick 600)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="FFCV threads = torchvision DataLoader workers (default: all CPUs of this process)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/seed-cluster-bench"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the seeded flip + photometric ops run (cuda: the CPU only decodes and crops)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these pipelines (names as printed)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per group (default 3, quick 2): ratios come with their spread")
    args = parser.parse_args(argv)
    count = args.images or (600 if args.quick else 2000)
    timed_batches = 6 if args.quick else (count // BATCH) - 2
    args.rounds = args.rounds or (2 if args.quick else 3)
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():  # before the minutes of preparing the JPEGs
        sys.exit("bench/data_loader.py --device cuda: no CUDA device is visible; run it on a GPU node")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    threads = args.threads

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = make_jpeg_folder(args.workdir, count)
    beton = build_beton(folder)
    print(f"{count} JPEGs in {folder} and {beton} ({time.perf_counter() - t0:.0f} s to prepare); "
          f"{threads} threads/workers, batch {BATCH}, {timed_batches} timed batches per pipeline", flush=True)

    from seed_cluster.data import ViewSpec

    small_patch = [ViewSpec("swav_global", 224)] + [ViewSpec("swav_small", 96)] * 6
    pipelines = {
        "torchvision 1 view": lambda: torchvision_loader(folder, threads, False),
        "ffcv seed 1 view": lambda: ffcv_stream(beton, threads, 1, device),
        "torchvision mocov2 2 views": lambda: torchvision_loader(folder, threads, True),
        "ffcv mocov2 2 views": lambda: ffcv_stream(beton, threads, 2, device),
        "ffcv unseeded crop+flip": lambda: ffcv_unseeded(beton, threads),
        "ffcv seeded crop+flip": lambda: seeded_geometric(beton, threads, device),
        "ffcv small patch 1+6": lambda: ffcv_stream(beton, threads, small_patch, device),
        "ffcv unseeded crop only (decoder)": lambda: ffcv_unseeded_crop_only(beton, threads),
        "ffcv decode+crop only, 1 view": lambda: decode_only(beton, threads),
        "ffcv decode+crop only, 2 views": lambda: decode_only(beton, threads, 2),
        "torch flip+photometric only, mocov2 224": lambda: augment_only(beton, threads, device=device),
        "torch flip+photometric only, swav_small 96": lambda: augment_only(beton, threads, "swav_small", 96,
                                                                            device=device),
    }
    # Pipelines compared by a ratio below are timed in one group, in turns.
    groups = [["torchvision 1 view", "ffcv seed 1 view", "ffcv decode+crop only, 1 view",
               "ffcv unseeded crop only (decoder)"],
              ["torchvision mocov2 2 views", "ffcv mocov2 2 views", "ffcv decode+crop only, 2 views",
               "ffcv small patch 1+6"],
              ["ffcv unseeded crop+flip", "ffcv seeded crop+flip"],
              ["torch flip+photometric only, mocov2 224", "torch flip+photometric only, swav_small 96"]]
    results, rounds = {}, {}
    for group in groups:
        makers = {name: pipelines[name] for name in group if not args.only or name in args.only}
        if not makers:
            continue
        rates, per_round = timed_group(makers, timed_batches, args.rounds, sync)
        gc.collect()  # stop this group's workers / prefetch threads before the next group
        results.update(rates)
        rounds.update(per_round)
        for name, rate in rates.items():
            print(f"  {name:42s} {rate:8.0f} img/s  {rate / threads:7.0f} img/s per thread", flush=True)

    def ratio(a: str, b: str, goal: str = "") -> None:
        if a in results and b in results:
            each = sorted(x / y for x, y in zip(rounds[a], rounds[b], strict=True))
            spread = f" (rounds: median {statistics.median(each):.2f}x, {each[0]:.2f}-{each[-1]:.2f})" \
                if len(each) > 1 else ""
            print(f"  {a} / {b}: {results[a] / results[b]:.2f}x{spread} {goal}")

    print(f"ratios (one run, {args.rounds} interleaved rounds):")
    ratio("ffcv seed 1 view", "torchvision 1 view", "(goal >= 3x)")
    ratio("ffcv mocov2 2 views", "torchvision mocov2 2 views", "(goal >= 3x)")
    ratio("ffcv seeded crop+flip", "ffcv unseeded crop+flip", "(goal >= 0.85x)")
    ratio("ffcv decode+crop only, 1 view", "ffcv unseeded crop only (decoder)",
          "(goal >= 0.85x: the seeded crop decoder vs FFCV's unseeded one, both uint8 224 out)")
    ratio("ffcv small patch 1+6", "ffcv mocov2 2 views")
    print("CPU side when flip + photometric ops run on the GPU (this machine has none; vs torchvision's all-CPU):")
    ratio("ffcv decode+crop only, 1 view", "torchvision 1 view", "(goal >= 3x)")
    ratio("ffcv decode+crop only, 2 views", "torchvision mocov2 2 views", "(goal >= 3x; one decode feeds both views)")


if __name__ == "__main__":
    main()

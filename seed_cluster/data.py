"""The data path: FFCV decodes and crops, this module orders, `augment` finishes the views on the device.

FFCV's own random ops are not seeded (DESIGN.md §4). Here FFCV's decoder is
`ffcv_ops.SeededCropDecoder`: it cuts every view's RandomResizedCrop box out of the
whole image while decoding, the box a pure function of (seed, epoch, sample index, view)
(`view_keys.pixel_boxes`), and resizes it to the view's side. The flip and the photometric
ops, keyed the same way, run batched on the device (`augment.finish_view`). The epoch
order is a permutation keyed by (seed, epoch), split across ranks, so the stream is a pure
function of its position (epoch, batches consumed): a loader can start anywhere in an
epoch without decoding what it skips.

Views: a method asks for `num_views` views of `data.recipe` at `data.resolution`, or for a
list of `ViewSpec` (recipe, side) — multi-crop, e.g. 1 global + 6 small crops for SEED's
small-patch variant. All views of an image come from one decode; view `v` is keyed by view
index `v`, whatever its recipe or size.

Order: training drops the incomplete tail (the permutation is cut to a multiple of the
world size, each rank's shard to a multiple of the batch size), so every step has the same
batch shape on every rank; evaluation reads every sample once, in file order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numba
import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.transforms import Squeeze, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from .augment import finish_view, normalize_images
from .config import DataConfig
from .errors import DataError
from .ffcv_ops import SeededCropDecoder
from .recipes import Recipe, get_recipe
from .view_keys import view_epochs

if TYPE_CHECKING:
    from .cache import FeatureCache

logger = logging.getLogger(__name__)


def loader_threads(num_workers: int) -> int:
    """The threads FFCV's pipeline really runs on: numba's pool (NUMBA_NUM_THREADS, by default this machine's
    CPUs) caps data.num_workers, where numba itself would fail the loader thread with a traceback."""
    return max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))


_capped: set[int] = set()


def _set_loader_threads(compiler: type, n: int) -> None:
    """FFCV's `Compiler.set_num_threads`, less its `torch.set_num_threads(n)`: FFCV calls it with 1 when it is
    imported and with `data.num_workers` from its loader thread at every epoch, which changes torch's intra-op
    thread count for the whole process and silently ran every CPU step on that many threads, whatever
    cluster.cpus_per_task (OMP_NUM_THREADS) said. numba's count is all FFCV's pipeline needs."""
    threads = loader_threads(n)
    if threads < n and n not in _capped:  # once per value, not at every epoch
        _capped.add(n)
        logger.warning("data.num_workers=%d: numba runs at most %d threads here (NUMBA_NUM_THREADS), so FFCV "
                       "decodes on %d", n, threads, threads)
    compiler.num_threads = threads
    numba.set_num_threads(threads)


def _torch_threads_default() -> int:
    """What torch would run on had FFCV not set it: OMP_NUM_THREADS, else the CPUs this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


Compiler.set_num_threads = classmethod(_set_loader_threads)
torch.set_num_threads(_torch_threads_default())  # undo what FFCV's import did


def check_dataset(path: str, key: str) -> dict:
    """The dataset's manifest; a one-line DataError when `path` is missing or is no readable .beton."""
    from ffcv_build.manifest import check_beton

    try:
        return check_beton(path)
    except DataError as e:
        raise DataError(f"{key}: {e}") from e


@dataclass(frozen=True)
class ViewSpec:
    """One view per image: an augmentation recipe (a name in `seed_cluster.recipes.RECIPES`, or a Recipe)
    and the view's side."""

    recipe: Union[str, Recipe]
    size: int

    def get_recipe(self) -> Recipe:
        """The Recipe itself; ConfigError naming the valid names when the name is unknown."""
        return self.recipe if isinstance(self.recipe, Recipe) else get_recipe(self.recipe)


def epoch_order(num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's samples for `epoch`, in order: a (seed, epoch)-keyed permutation, tail dropped so ranks
    get equal shares, then strided across ranks (every sample at most once per epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    per_rank = num_samples // world_size
    return perm[: per_rank * world_size][rank::world_size]


class _PositionedOrder(TraversalOrder):
    """An FFCV traversal order that returns `epoch_order` from the current position on.

    ffcv 1.0.2 checks `isinstance(order, TraversalOrder)` and then calls `order(loader)`,
    so the instance is callable and binds itself to the loader.
    """

    def __init__(self, stream: "TrainStream"):
        self.stream = stream

    def __call__(self, loader: Loader) -> "_PositionedOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        s = self.stream
        order = epoch_order(len(self.indices), seed=s.seed, epoch=s.epoch, rank=s.rank, world_size=s.world_size)
        # Only the batches still to come are handed to FFCV: skipped ones are never read nor decoded.
        return order[s.batches_consumed * s.batch_size: s.steps_per_epoch * s.batch_size]


EVAL_CROP_FRACTION = 0.875
"""Evaluation view: the centred square of this fraction of the shorter side (Resize 256 + CenterCrop 224)."""


def _pipelines(image_decoder: Operation) -> dict:
    return {
        "image": [image_decoder, ToTensor()],
        "label": [IntDecoder(), ToTensor(), Squeeze(1)],
        "index": [IntDecoder(), ToTensor(), Squeeze(1)],
    }


def view_decoder(specs: Sequence["ViewSpec"], seed: int, replayed_views: int = 0) -> SeededCropDecoder:
    """The decoder that cuts the crops of `specs` (view v keyed by index v) out of each image."""
    return SeededCropDecoder([(spec.get_recipe(), spec.size) for spec in specs], seed, replayed_views)


class _FixedOrder(TraversalOrder):
    """An FFCV traversal order that reads exactly `order` (one pass; used by the feature-cache precompute)."""

    def __init__(self, order: np.ndarray):
        self.order = order

    def __call__(self, loader: Loader) -> "_FixedOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        return self.order


@dataclass
class Batch:
    views: list[torch.Tensor]
    """Augmented, normalised float views [B, 3, R, R] on the device, one per view index."""
    labels: torch.Tensor
    indices: torch.Tensor
    """Dataset sample indices [B] on the device: with `epoch` and the view index, the key of every view."""
    epoch: int = 0
    targets: Optional[list[torch.Tensor]] = None
    """With the feature cache: the teacher's embedding [B, D] of each view, read instead of computed."""


def make_views(rows: torch.Tensor, decoder: SeededCropDecoder, indices, epochs, specs: Sequence[ViewSpec],
               cfg: DataConfig, seed: int) -> list[torch.Tensor]:
    """Every view of a decoded batch (`decoder`'s uint8 rows, on the device): view v of sample i is keyed by
    (seed, epochs (or epochs[i]), index, v), the key the decoder cut its crop with. The one place views
    are made, for training and for the feature-cache precompute alike."""
    return [finish_view(crops, indices, seed=seed, epoch=epochs, view=v, recipe=spec.get_recipe(), mean=cfg.mean,
                        std=cfg.std)
            for v, (spec, crops) in enumerate(zip(specs, decoder.split_views(rows), strict=True))]


class KeyedViews:
    """The views of data.train samples in a given order under one view key per pass (the feature-cache
    precompute): `batches(order, key)` yields (views on `device`, sample indices) in batches of `batch_size`.
    One FFCV loader is compiled once and reused for every pass; `order` may be at most `max_len` long."""

    def __init__(self, cfg: DataConfig, specs: Sequence[ViewSpec], seed: int, batch_size: int, max_len: int,
                 device: torch.device):
        self.cfg, self.specs, self.seed, self.device = cfg, tuple(specs), seed, device
        self.decoder = view_decoder(self.specs, seed)
        num_samples = int(check_dataset(cfg.train, "data.train")["num_samples"])
        self.order = _FixedOrder(np.arange(min(max_len, num_samples)))  # FFCV sizes its epochs on this one
        self.loader = Loader(cfg.train, batch_size=batch_size, num_workers=cfg.num_workers, order=self.order,
                             pipelines=_pipelines(self.decoder), drop_last=False, os_cache=cfg.os_cache)

    def batches(self, order: np.ndarray, key: int) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
        if len(order) > len(self.order.order):
            raise ValueError(f"an order of {len(order)} samples is longer than this loader's {len(self.order.order)}")
        self.order.order = np.asarray(order)
        self.decoder.set_epoch(key)
        for rows, _, indices in self.loader:
            keys = indices.numpy().copy()
            yield (make_views(rows.to(self.device, non_blocking=True), self.decoder, keys, key, self.specs,
                              self.cfg, self.seed), keys)


class TrainStream:
    """An endless stream of batches whose position is (epoch, batches_consumed) and nothing else."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 num_views: int | Sequence[ViewSpec] = 1, device: torch.device, replayed_views: int = 0,
                 cache: Optional["FeatureCache"] = None):
        """`num_views`: a count (that many views of data.recipe at data.resolution) or one ViewSpec per view
        (multi-crop methods expose theirs as `method.num_views`). `replayed_views` K > 0: each image shows one
        of K fixed view keys per epoch (`view_keys.view_epochs`, cache.views); `cache`: read the teacher's
        embedding of those views into `Batch.targets`. Raises DataError (one line, naming data.train) when
        the .beton is missing, truncated or not this project's format."""
        manifest = check_dataset(cfg.train, "data.train")
        self.cfg = cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = device
        if isinstance(num_views, int):
            num_views = [ViewSpec(cfg.recipe, cfg.resolution)] * num_views
        self.view_specs = tuple(num_views)
        self.num_views = len(self.view_specs)
        for spec in self.view_specs:
            spec.get_recipe()  # an unknown recipe fails here, at start-up
        self.replayed_views, self.cache = replayed_views, cache
        self.decoder = view_decoder(self.view_specs, seed, replayed_views)
        self.batch_size = cfg.batch_size_per_rank
        self.epoch = 0
        self.batches_consumed = 0
        self.num_samples = int(manifest["num_samples"])
        self.steps_per_epoch = (self.num_samples // world_size) // self.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"data.train={cfg.train} has {self.num_samples} samples, fewer than one batch of "
                            f"data.batch_size_per_rank={self.batch_size} per rank x {world_size} ranks; "
                            "lower the batch size")
        self.loader = Loader(cfg.train, batch_size=self.batch_size, num_workers=cfg.num_workers,
                             order=_PositionedOrder(self), pipelines=_pipelines(self.decoder),
                             drop_last=True, os_cache=cfg.os_cache, seed=seed)
        assert self.loader.reader.num_samples == self.num_samples, "manifest and .beton disagree"
        self.manifest = manifest

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        if state["world_size"] != self.world_size and self.batches_consumed:
            # The order of a partly consumed epoch depends on the world size: continue at the next epoch.
            logger.warning("world size changed from %d to %d mid-epoch: skipping the rest of epoch %d",
                           state["world_size"], self.world_size, self.epoch)
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        if self.batches_consumed >= self.steps_per_epoch:  # saved right after an epoch's last batch
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self.batches_consumed >= self.steps_per_epoch:
                self.epoch, self.batches_consumed = self.epoch + 1, 0
            self.decoder.set_epoch(self.epoch)  # before FFCV starts decoding the epoch's first batch
            for rows, labels, indices in self.loader:  # FFCV reuses these buffers: views are new tensors
                rows = rows.to(self.device, non_blocking=True)
                keys = indices.numpy()
                epochs = view_epochs(self.seed, self.epoch, keys, self.replayed_views) if self.replayed_views \
                    else self.epoch
                batch = Batch(views=make_views(rows, self.decoder, keys, epochs, self.view_specs, self.cfg,
                                               self.seed),
                              labels=labels.to(self.device).clone(), indices=indices.to(self.device).clone(),
                              epoch=self.epoch,
                              targets=self.cache.targets(keys, epochs, self.device) if self.cache else None)
                self.batches_consumed += 1
                yield batch
            self.epoch, self.batches_consumed = self.epoch + 1, 0


def eval_decoder(resolution: int, crop_fraction: float = EVAL_CROP_FRACTION) -> CenterCropRGBImageDecoder:
    """Resize(int(resolution / crop_fraction)) + CenterCrop(resolution) (torchvision's eval transform), as one
    centred crop of the shorter side resized to the output in FFCV."""
    return CenterCropRGBImageDecoder((resolution, resolution), ratio=resolution / int(resolution / crop_fraction))


def eval_batches(path: str, cfg: DataConfig, device: torch.device, key: str = "data.val",
                 batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(centre view, label) batches over every sample of `path`, in file order."""
    check_dataset(path, key)
    loader = Loader(path, batch_size=batch_size, num_workers=cfg.num_workers, order=OrderOption.SEQUENTIAL,
                    pipelines=_pipelines(eval_decoder(cfg.resolution)), drop_last=False, os_cache=cfg.os_cache)
    for images, labels, _ in loader:
        yield (normalize_images(images.to(device), mean=cfg.mean, std=cfg.std), labels.to(device).clone())

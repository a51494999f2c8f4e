"""The training stream and eval pipeline: order, shards, resume, replay across processes, multi-crop, bad input."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import ffcv.loader.loader as ffcv_loader
import numpy as np
import pytest
import torch
from PIL import Image

from ffcv_build import build_imagefolder
from seed_cluster.augment import finish_view
from seed_cluster.config import DataConfig
from seed_cluster.data import TrainStream, ViewSpec, epoch_order, eval_batches
from seed_cluster.errors import DataError
from seed_cluster.recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES
from seed_cluster.view_keys import pixel_boxes, view_epochs

# numba's dispatcher finalizer raises a harmless KeyError when an FFCV Loader is garbage-collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
B = 64  # 2000 Fashion-MNIST images: 31 batches per epoch on one rank


def data_cfg(data: Path, **kw) -> DataConfig:
    defaults = dict(name="fashion_mnist", train=str(data / "train.beton"), val=str(data / "test.beton"),
                    resolution=32, batch_size_per_rank=B, num_workers=1,
                    mean=[0.286] * 3, std=[0.353] * 3)
    return DataConfig(**{**defaults, **kw})


def stream(data: Path, *, seed: int = 0, rank: int = 0, world_size: int = 1, num_views=1, **kw) -> TrainStream:
    return TrainStream(data_cfg(data, **kw), seed=seed, rank=rank, world_size=world_size, num_views=num_views,
                       device=CPU)


def take(s: TrainStream, n: int) -> list:
    it = iter(s)
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.epoch == y.epoch
        assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))


# --- order -------------------------------------------------------------------------------------------


def test_epoch_order_is_a_pure_function_of_seed_epoch_rank_and_world_size():
    key = dict(seed=3, epoch=2, rank=1, world_size=4)
    assert np.array_equal(epoch_order(1000, **key), epoch_order(1000, **key))
    for change in (dict(seed=4), dict(epoch=3), dict(rank=2), dict(world_size=3)):
        assert not np.array_equal(epoch_order(1000, **{**key, **change})[:50], epoch_order(1000, **key)[:50])
    # Fixed values: the order must not drift between numpy versions or code changes unnoticed.
    assert epoch_order(10, seed=0, epoch=0, rank=0, world_size=1).tolist() == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_distributed_shards_are_disjoint_and_cover_the_epoch_once_minus_the_tail(world_size):
    n = 1003
    shards = [epoch_order(n, seed=5, epoch=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # equal shares: every rank takes the same number of steps
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union) == (n // world_size) * world_size
    assert union.min() >= 0 and union.max() < n


def test_stream_yields_this_ranks_shard_in_full_batches_and_each_rank_its_own(fmnist_small):
    ranks = [stream(fmnist_small, rank=r, world_size=3) for r in range(3)]
    assert ranks[0].steps_per_epoch == (2000 // 3) // B == 10
    seen = []
    for r, s in enumerate(ranks):
        batches = take(s, s.steps_per_epoch)
        got = torch.cat([b.indices for b in batches]).numpy()
        assert all(len(b.indices) == B for b in batches)  # drop_last: no partial batch
        assert np.array_equal(got, epoch_order(2000, seed=0, epoch=0, rank=r, world_size=3)[:10 * B])
        assert s.state_dict() == {"epoch": 0, "batches_consumed": 10, "world_size": 3}
        seen.append(got)
    assert len(np.unique(np.concatenate(seen))) == 3 * 10 * B


# --- resume ------------------------------------------------------------------------------------------


def test_resume_at_batch_b_yields_the_same_remaining_batches_bitwise_without_decoding_the_skipped(
        fmnist_small, monkeypatch):
    straight = stream(fmnist_small, seed=7, num_views=2)
    steps = straight.steps_per_epoch
    expected = take(straight, steps + 2)  # the rest of epoch 0 and the start of epoch 1
    expected = [replace(b, views=[v.clone() for v in b.views]) for b in expected]

    handed_to_ffcv = []
    real = ffcv_loader.EpochIterator
    monkeypatch.setattr(ffcv_loader, "EpochIterator",
                        lambda loader, order: handed_to_ffcv.append(list(order)) or real(loader, order))
    resumed = stream(fmnist_small, seed=7, num_views=2)
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 20, "world_size": 1})
    got = take(resumed, steps - 20 + 2)
    assert_same_batches(got, expected[20:])
    # FFCV was given only the batches still to come of epoch 0, then all of epoch 1.
    assert [len(o) for o in handed_to_ffcv[:2]] == [(steps - 20) * B, steps * B]
    assert handed_to_ffcv[0] == expected[20].indices.tolist() + sum((b.indices.tolist() for b in expected[21:steps]), [])
    assert resumed.state_dict() == {"epoch": 1, "batches_consumed": 2, "world_size": 1}


def test_a_position_saved_after_an_epochs_last_batch_resumes_at_the_next_epoch(fmnist_small):
    s = stream(fmnist_small)
    s.load_state_dict({"epoch": 4, "batches_consumed": s.steps_per_epoch, "world_size": 1})
    (batch,) = take(s, 1)
    assert batch.epoch == 5 and s.state_dict()["batches_consumed"] == 1
    assert np.array_equal(batch.indices.numpy(), epoch_order(2000, seed=0, epoch=5, rank=0, world_size=1)[:B])


def test_world_size_change_mid_epoch_moves_to_the_next_epoch_and_says_so(fmnist_small, caplog):
    s = stream(fmnist_small, rank=1, world_size=2)
    with caplog.at_level(logging.WARNING, logger="seed_cluster.data"):
        s.load_state_dict({"epoch": 3, "batches_consumed": 5, "world_size": 4})
    assert s.state_dict() == {"epoch": 4, "batches_consumed": 0, "world_size": 2}
    assert "world size changed from 4 to 2 mid-epoch" in caplog.text
    # At an epoch boundary the world size may change freely.
    s.load_state_dict({"epoch": 3, "batches_consumed": 0, "world_size": 4})
    assert s.state_dict()["epoch"] == 3


# --- replay ------------------------------------------------------------------------------------------

_DUMP = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_data import stream
from pathlib import Path
s = stream(Path({data!r}), seed=11, rank={rank}, world_size={world_size}, num_workers={workers}, num_views=2)
s.load_state_dict({{"epoch": 2, "batches_consumed": 0, "world_size": {world_size}}})
batches = [b for _, b in zip(range(3), s)]
torch.save({{"indices": torch.cat([b.indices for b in batches]),
            "views": [torch.cat([b.views[v] for b in batches]) for v in range(2)]}}, {out!r})
"""


def run_fresh(template: str, omp_threads: int, **fields) -> str:
    """Run `template` (filled with `fields` and `tests`, this folder) in a new Python process with
    OMP_NUM_THREADS=`omp_threads`; its stdout."""
    code = template.format(tests=str(Path(__file__).parent), **fields)
    env = {**os.environ, "OMP_NUM_THREADS": str(omp_threads)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def dump_views(data: Path, out: Path, *, rank: int, world_size: int, workers: int) -> dict:
    run_fresh(_DUMP, workers, data=str(data), rank=rank, world_size=world_size, workers=workers, out=str(out))
    return torch.load(out)


_THREADS = """
import sys, torch
sys.path.insert(0, {tests!r})
import ffcv  # FFCV's own import sets torch's thread count to 1
from test_data import stream
from pathlib import Path
seen = [torch.get_num_threads()]
torch.set_num_threads(3)
s = stream(Path({data!r}), num_workers=1, batch_size_per_rank=500)
for _, batch in zip(range(6), s):  # 4 batches per epoch: FFCV's loader thread starts 2 epochs
    seen.append(torch.get_num_threads())
print(seen, s.epoch)
"""


def test_ffcv_leaves_torchs_thread_count_to_omp_num_threads_and_the_user(fmnist_small):
    """FFCV's Compiler.set_num_threads also sets torch's thread count (1 at import, data.num_workers at every
    epoch): importing seed_cluster.data restores OMP_NUM_THREADS and stops it from happening again."""
    stdout = run_fresh(_THREADS, 2, data=str(fmnist_small))
    assert stdout.split("\n")[-2] == "[2, 3, 3, 3, 3, 3, 3] 1"


def test_more_workers_than_numba_can_run_are_capped_with_a_warning_not_a_traceback(fmnist_small, caplog):
    """numba.set_num_threads raises for more threads than its pool (NUMBA_NUM_THREADS, the CPUs by default),
    which killed FFCV's loader thread for the default data.num_workers=8 on a smaller machine."""
    import numba

    too_many = numba.config.NUMBA_NUM_THREADS + 3
    with caplog.at_level(logging.WARNING, logger="seed_cluster.data"):
        batch = take(stream(fmnist_small, num_workers=too_many), 1)[0]
    assert batch.views[0].shape == (B, 3, 32, 32)
    assert f"data.num_workers={too_many}: numba runs at most {numba.config.NUMBA_NUM_THREADS} threads" in caplog.text


def test_same_key_gives_the_same_views_in_other_processes_thread_counts_world_sizes_and_batches(
        fmnist_small, tmp_path):
    a = dump_views(fmnist_small, tmp_path / "a.pt", rank=0, world_size=1, workers=1)
    b = dump_views(fmnist_small, tmp_path / "b.pt", rank=1, world_size=2, workers=2)
    pos_a = {int(i): k for k, i in enumerate(a["indices"])}
    common = [(pos_a[int(i)], k) for k, i in enumerate(b["indices"]) if int(i) in pos_a]
    assert len(common) >= 50  # rank 1 of 2 holds every other image of the same epoch permutation
    for v in range(2):
        for ka, kb in common:
            assert torch.equal(a["views"][v][ka], b["views"][v][kb])
    assert not torch.equal(a["views"][0][common[0][0]], a["views"][1][common[0][0]])  # views differ


def test_other_seeds_and_epochs_give_other_views_of_the_same_image(fmnist_small):
    def first_view_of(s: TrainStream, epoch: int, index: int) -> torch.Tensor:
        s.load_state_dict({"epoch": epoch, "batches_consumed": 0, "world_size": 1})
        for batch in take(s, s.steps_per_epoch):
            hit = (batch.indices == index).nonzero()
            if len(hit):
                return batch.views[0][hit[0, 0]]
        raise AssertionError(f"{index} not in epoch {epoch}")

    index = int(epoch_order(2000, seed=0, epoch=0, rank=0, world_size=1)[0])
    base = first_view_of(stream(fmnist_small, seed=0), 0, index)
    assert not torch.equal(base, first_view_of(stream(fmnist_small, seed=1), 0, index))
    assert not torch.equal(base, first_view_of(stream(fmnist_small, seed=0), 1, index))


# --- multi-crop ----------------------------------------------------------------------------------------


def full_images(data: Path, indices: torch.Tensor) -> np.ndarray:
    """The whole decoded images of `indices` ([N, 28, 28, 3] Fashion-MNIST, read in file order)."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from seed_cluster.data import _pipelines
    images = {}
    loader = Loader(str(data / "train.beton"), batch_size=500, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines=_pipelines(SimpleRGBImageDecoder()), drop_last=False)
    for imgs, _, idx in loader:
        images.update({int(i): img.numpy().copy() for i, img in zip(idx, imgs, strict=True)})
    return np.stack([images[int(i)] for i in indices])


def expected_views(images: np.ndarray, indices: torch.Tensor, *, seed: int, epoch, view: int, spec: ViewSpec,
                   mean=(0.286,) * 3, std=(0.353,) * 3) -> torch.Tensor:
    """What the pipeline must give: augment's pixel box of the whole image, resized as the decoder resizes
    (INTER_AREA to shrink, its bilinear to enlarge: tests/test_ffcv_ops.py checks both against references),
    then augment's flip and photometric ops."""
    import cv2

    from seed_cluster.ffcv_ops import resize_bilinear

    recipe = RECIPES[spec.recipe]
    boxes = pixel_boxes(seed, epoch, indices, view, recipe, images.shape[1], images.shape[2])
    crops = np.zeros((len(images), spec.size, spec.size, 3), np.uint8)
    for img, (t, x, h, w), out in zip(images, boxes, crops, strict=True):
        if h < spec.size or w < spec.size:
            resize_bilinear(img, t, x, h, w, out)
        else:
            out[:] = cv2.resize(img[t:t + h, x:x + w], (spec.size, spec.size), interpolation=cv2.INTER_AREA)
    return finish_view(torch.from_numpy(crops), indices, seed=seed, epoch=epoch, view=view, recipe=recipe,
                       mean=mean, std=std)


def test_view_specs_give_one_global_and_small_crops_from_one_decode_keyed_by_view_index(fmnist_small):
    specs = [ViewSpec("swav_global", 32)] + [ViewSpec("swav_small", 14)] * 6
    s = stream(fmnist_small, seed=3, num_views=specs)
    assert s.num_views == 7
    (batch,) = take(s, 1)
    assert [tuple(v.shape) for v in batch.views] == [(B, 3, 32, 32)] + [(B, 3, 14, 14)] * 6
    images = full_images(fmnist_small, batch.indices)
    for v, spec in enumerate(specs):
        assert torch.equal(batch.views[v], expected_views(images, batch.indices, seed=3, epoch=0, view=v, spec=spec)), v
    assert not torch.equal(batch.views[1], batch.views[2])


def test_the_epoch_reaches_the_compiled_decoder_every_epoch_and_replayed_views_use_view_epochs(fmnist_small):
    """numba freezes captured arrays, so an epoch that never reached the compiled pipeline would repeat epoch
    0's crops: check each epoch's views against augment's boxes for that epoch (and for replayed view keys)."""
    spec = ViewSpec("mocov2", 20)
    s = stream(fmnist_small, seed=5, num_views=[spec])
    replayed = TrainStream(data_cfg(fmnist_small), seed=5, rank=0, world_size=1, num_views=[spec], device=CPU,
                           replayed_views=3)
    firsts = []
    for epoch in (0, 1, 2):
        for st in (s, replayed):
            st.load_state_dict({"epoch": epoch, "batches_consumed": st.steps_per_epoch - 1, "world_size": 1})
        (batch,), (rbatch,) = take(s, 1), take(replayed, 1)
        assert batch.epoch == epoch
        images = full_images(fmnist_small, batch.indices)
        assert torch.equal(batch.views[0], expected_views(images, batch.indices, seed=5, epoch=epoch, view=0,
                                                          spec=spec))
        keys = view_epochs(5, epoch, rbatch.indices.numpy(), 3)
        assert torch.equal(rbatch.views[0], expected_views(images, rbatch.indices, seed=5, epoch=keys, view=0,
                                                           spec=spec))
        firsts.append(batch.views[0])
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])


# --- evaluation --------------------------------------------------------------------------------------


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour image with structure in both axes, so misplaced crops or scales show clearly."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    channels = [127 + 120 * np.sin(x / w * rng.uniform(2, 6) + rng.uniform(0, 3)) *
                np.cos(y / h * rng.uniform(2, 6) + rng.uniform(0, 3)) for _ in range(3)]
    return Image.fromarray(np.stack(channels, axis=2).round().astype(np.uint8))


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("eval")
    images = []
    for k, (w, h) in enumerate([(300, 200), (180, 320), (256, 256), (400, 300), (220, 240)]):
        img, cls = photo_like(w, h, k), f"class{k % 2}"
        (root / "src" / cls).mkdir(parents=True, exist_ok=True)
        img.save(root / "src" / cls / f"{k}.png")
        images.append((cls, img))
    build_imagefolder(root / "src", root / "val.beton", max_side=None, write_mode="raw", workers=1)
    return root / "val.beton", images


def test_eval_batches_resize_and_centre_crop_like_torchvision_with_labels(eval_folder):
    from torchvision import transforms

    beton, images = eval_folder
    classes = json.loads(beton.with_suffix(".json").read_text())["classes"]
    order = sorted(images, key=lambda ci: ci[0])  # ImageFolder order: by class, then by file name
    cfg = DataConfig(train=str(beton), resolution=224, num_workers=1)
    views, labels = zip(*eval_batches(str(beton), cfg, CPU, batch_size=2), strict=True)
    views, labels = torch.cat(views), torch.cat(labels)
    assert views.shape == (5, 3, 224, 224)
    assert labels.tolist() == [classes.index(cls) for cls, _ in order]
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for view, (_, img) in zip(views, order, strict=True):
        diff = (view - reference(img)).abs().mean().item()
        assert diff < 0.02, diff  # resampling differs (measured <= 0.01); a crop off by 1/8 is > 0.2
    # And scaled down for small datasets: Resize(36) + CenterCrop(32).
    small = replace(cfg, resolution=32)
    (view, _), *_ = eval_batches(str(beton), small, CPU, batch_size=8)
    assert view.shape == (5, 3, 32, 32)


def test_a_crop_shifted_by_an_eighth_would_fail_the_eval_comparison(eval_folder):
    """Guards the tolerance above: the same comparison against a crop moved 28 px sideways fails clearly."""
    from torchvision import transforms

    _, images = eval_folder
    resized = transforms.ToTensor()(transforms.Resize(256)(images[3][1]))  # 400x300 -> 341x256
    left = (resized.shape[2] - 224 + 1) // 2
    centre, shifted = resized[:, 16:240, left:left + 224], resized[:, 16:240, left - 28:left - 28 + 224]
    assert (centre - shifted).abs().mean().item() / np.mean(IMAGENET_STD) > 0.2


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_or_truncated_beton_is_a_one_line_data_error_naming_data_train(fmnist_small, tmp_path):
    with pytest.raises(DataError) as missing:
        stream(tmp_path)
    assert "data.train" in str(missing.value) and "\n" not in str(missing.value)

    shutil.copy(fmnist_small / "train.beton", tmp_path / "train.beton")
    shutil.copy(fmnist_small / "train.json", tmp_path / "train.json")
    size = (tmp_path / "train.beton").stat().st_size
    with open(tmp_path / "train.beton", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataError) as truncated:
        stream(tmp_path)
    message = str(truncated.value)
    assert message.startswith("data.train: ") and "\n" not in message
    assert "train.beton" in message


def test_a_batch_larger_than_a_ranks_shard_is_a_data_error(fmnist_small):
    with pytest.raises(DataError, match="data.batch_size_per_rank=1024"):
        TrainStream(replace(data_cfg(fmnist_small), batch_size_per_rank=1024), seed=0, rank=0, world_size=2,
                    num_views=1, device=CPU)

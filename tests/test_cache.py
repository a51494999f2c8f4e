"""The teacher feature cache: precompute (resumable, multi-process), training from it, and its refusals.

Real .beton files, real FFCV loaders, real signals; the multi-process precompute runs through the
launcher on two local ranks.
"""

from __future__ import annotations

import filecmp
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_launcher

from seed_cluster.cache import CacheError, FeatureCache, open_for_training, read_manifest
from seed_cluster.distributed import DistEnv
from seed_cluster.launcher import load_config
from seed_cluster.methods import view_specs
from seed_cluster.precompute import precompute, writer_for
from seed_cluster.preemption import Preemption
from seed_cluster.teachers import load_teacher, teacher_identity
from seed_cluster.trainer import Trainer

pytestmark = pytest.mark.slow
VIEWS = 2


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return ["cluster=local", "cluster.cpus_per_task=1", "data=fashion_mnist", f"data.train={data / 'train.beton'}",
            "data.val=null", "data.batch_size_per_rank=32", "data.num_workers=1", "student=convnet_s",
            "teacher=convnet_m", "method.dim=32", "method.queue_size=64", "method.tau_t=0.05",
            f"output_dir={out}", "logging.progress_bar=false", f"cache.views={VIEWS}", "cache.dtype=fp32",
            "cache.chunk_size=500", *extra]


def cfg_for(data: Path, out: Path, *extra: str):
    return load_config(overrides(data, out, *extra))


def chunk_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def cached(fmnist_small, tmp_path_factory):
    """One uninterrupted single-process precompute (fp32, 2 views per image, 4 chunks of 512 samples)."""
    out = tmp_path_factory.mktemp("cache")
    cfg = cfg_for(fmnist_small, out, "mode=precompute")
    summary = precompute(cfg, DistEnv.detect(), Preemption(), torch.device("cpu"))
    return out, Path(summary["path"])


def test_precompute_writes_a_complete_manifested_cache(cached, fmnist_small):
    out, path = cached
    manifest = read_manifest(path)
    assert manifest["num_samples"] == 2000 and manifest["views"] == VIEWS and manifest["crops"] == 1
    # chunk_size 500 is rounded up to whole batches of 32 (512), so no batch straddles two chunks.
    assert [(c["start"], c["end"]) for c in manifest["chunks"]] == [(0, 512), (512, 1024), (1024, 1536), (1536, 2000)]
    assert not path.with_name(path.name + ".partial").exists()
    cache = FeatureCache.open(path, manifest["fingerprint"], verify=True)
    rows = cache.targets([0, 1999], [0, 1], torch.device("cpu"))[0]
    assert rows.shape == (2, 32) and torch.allclose(rows.norm(dim=1), torch.ones(2))


def test_interrupted_precompute_resumes_to_a_byte_identical_cache(cached, fmnist_small, tmp_path):
    """A real USR2 after the first chunk: the job stops (submitit's requeue replaced by an exception),
    the next attempt computes only the missing chunks, and every file equals the uninterrupted cache's."""
    _, reference = cached
    cfg = cfg_for(fmnist_small, tmp_path, "mode=precompute", f"cache.path={tmp_path / 'resumed'}")
    partial = tmp_path / "resumed.partial"

    class Requeued(BaseException):
        pass

    def submitit_stand_in(signum, frame):
        raise Requeued()

    def signal_after_first_chunk():
        deadline = time.time() + 300
        while not list(partial.glob("chunk-*.sha256")) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    old = signal.signal(signal.SIGUSR2, submitit_stand_in)
    try:
        sender = threading.Thread(target=signal_after_first_chunk, daemon=True)
        sender.start()
        with pytest.raises(Requeued):
            precompute(cfg, DistEnv.detect(), Preemption().install(), torch.device("cpu"))
        sender.join(timeout=60)
    finally:
        signal.signal(signal.SIGUSR2, old)
    done_before = len(list(partial.glob("chunk-*.sha256")))
    assert 1 <= done_before < 4 and read_manifest(tmp_path / "resumed") is None
    summary = precompute(cfg, DistEnv.detect(), Preemption(), torch.device("cpu"))
    assert summary["computed_chunks"] == 4 - done_before, "finished chunks must not be recomputed"
    resumed = Path(summary["path"])
    assert chunk_files(resumed) == chunk_files(reference)
    for name in chunk_files(reference):
        assert filecmp.cmp(resumed / name, reference / name, shallow=False), name


def test_two_rank_precompute_equals_the_single_process_cache(cached, fmnist_small, tmp_path):
    _, reference = cached
    result = run_launcher(*overrides(fmnist_small, tmp_path, "mode=precompute", "cluster.tasks_per_node=2",
                                     f"cache.path={tmp_path / 'two'}"), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0/4 chunks done" in result.stdout, "the launcher prints the size and progress before starting"
    for name in chunk_files(reference):
        assert filecmp.cmp(tmp_path / "two" / name, reference / name, shallow=False), name


def test_training_from_the_cache_computes_the_live_losses(cached, fmnist_small):
    """Same seed, same replayed views: the cached teacher's losses equal the live teacher's (fp32 cache)."""
    out, _ = cached
    losses = {}
    for mode in ("on", "off"):
        trainer = Trainer(cfg_for(fmnist_small, out, f"teacher.cache={mode}", "optim.max_steps=5"),
                          DistEnv.detect(), Preemption())
        assert (trainer.cache is None) == (mode == "off")
        assert (getattr(trainer.method, "teacher", None) is None) == (mode == "on"), "no teacher with the cache"
        batches = iter(trainer.data)
        losses[mode] = [trainer.train_step(next(batches)).loss.item() for _ in range(5)]
        queue = trainer.method.queue.queue.clone()
        losses[f"{mode}-queue"] = queue
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["on-queue"], losses["off-queue"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change, field", [
    ("teacher.hidden_dim=16", "teacher"),
    ("data.mean=[0.5,0.5,0.5]", "normalisation"),
    ("data.recipe=simclr", "recipe"),
    ("data.resolution=28", "resolution"),
])
def test_a_cache_computed_for_another_run_is_refused_naming_the_field(cached, fmnist_small, change, field):
    out, path = cached
    cfg = cfg_for(fmnist_small, out, "teacher.cache=on", f"cache.path={path}", change)
    with pytest.raises(CacheError, match=rf"differs in (.*; )?{field} \(set by"):
        open_for_training(cfg, view_specs(cfg))


def test_a_cache_of_another_dataset_is_refused(cached, fmnist_small):
    out, path = cached
    cfg = cfg_for(fmnist_small, out, "teacher.cache=on", f"cache.path={path}",
                  f"data.train={fmnist_small / 'test.beton'}")
    with pytest.raises(CacheError, match=r"differs in dataset"):
        open_for_training(cfg, view_specs(cfg))


def test_a_corrupt_chunk_is_reported_with_its_sample_range(cached, fmnist_small, tmp_path):
    _, path = cached
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in chunk_files(path):
        (copy / name).write_bytes((path / name).read_bytes())
    data = bytearray((copy / "chunk-000002.npy").read_bytes())
    data[-5] ^= 0xFF
    (copy / "chunk-000002.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"chunk 2 \(samples 1024 to 1535, chunk-000002.npy\) is missing or corrupt"):
        FeatureCache.open(copy, read_manifest(path)["fingerprint"], verify=True)


def test_an_incomplete_cache_is_refused_with_on_and_ignored_with_auto(cached, fmnist_small, tmp_path, caplog):
    _, path = cached
    partial = tmp_path / "half.partial"
    partial.mkdir()
    for name in ("chunk-000000.npy", "chunk-000000.sha256"):
        (partial / name).write_bytes((path / name).read_bytes())
    on = cfg_for(fmnist_small, tmp_path, "teacher.cache=on", f"cache.path={tmp_path / 'half'}")
    with pytest.raises(CacheError, match=r"only a partial precompute exists \(1 of its chunks done\)"):
        open_for_training(on, view_specs(on))
    auto = cfg_for(fmnist_small, tmp_path, "teacher.cache=auto", f"cache.path={tmp_path / 'half'}")
    with caplog.at_level(logging.INFO, logger="seed_cluster.cache"):
        assert open_for_training(auto, view_specs(auto)) is None
    assert "running the teacher live" in caplog.text


def test_launcher_refuses_cache_on_without_a_cache_in_one_line(fmnist_small, tmp_path):
    result = run_launcher(*overrides(fmnist_small, tmp_path, "teacher.cache=on"), timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no complete teacher feature cache at "), result.stderr


def test_config_requires_views_for_the_cache_and_a_teacher(fmnist_small, tmp_path):
    from seed_cluster.errors import ConfigError

    with pytest.raises(ConfigError, match="needs cache.views=K > 0"):
        load_config([f"data.train={fmnist_small / 'train.beton'}", "mode=precompute"])
    with pytest.raises(ConfigError, match="method=mocov2 has no teacher to cache"):
        load_config([f"data.train={fmnist_small / 'train.beton'}", "teacher.cache=on", "cache.views=2",
                     "method=mocov2"])


def test_teacher_identity_equals_the_loaded_teachers_fingerprint_without_building_it(tmp_path):
    cfg = load_config(["data.train=/unused.beton", "teacher=convnet_m", "method.dim=32"]).teacher
    teacher = load_teacher(cfg, 32, seed=3)
    assert teacher_identity(cfg, 32, seed=3) == teacher.fingerprint
    assert teacher_identity(cfg, 32, seed=4) != teacher.fingerprint
    file = tmp_path / "teacher.pt"
    torch.save(teacher.encoder.state_dict(), file)
    from dataclasses import replace

    from_file = replace(cfg, checkpoint=str(file))
    assert teacher_identity(from_file, 32) == load_teacher(from_file, 32).fingerprint


def test_writer_refuses_a_partial_precompute_of_another_cache(fmnist_small, tmp_path):
    first = writer_for(cfg_for(fmnist_small, tmp_path, "mode=precompute", f"cache.path={tmp_path / 'c'}"))
    first.prepare()
    other = writer_for(cfg_for(fmnist_small, tmp_path, "mode=precompute", f"cache.path={tmp_path / 'c'}", "seed=5"))
    with pytest.raises(CacheError, match=r"started for another cache \(differs in .*seed"):
        other.prepare()


def test_small_patch_training_from_the_cache_computes_the_live_losses(fmnist_small, tmp_path):
    """seed_small_patch caches the global and every small crop's embedding; both queues fill as live."""
    small = ("method=seed_small_patch", "method.num_small_crops=2", "cache.views=1")
    summary = precompute(cfg_for(fmnist_small, tmp_path, "mode=precompute", *small), DistEnv.detect(), Preemption(),
                         torch.device("cpu"))
    assert read_manifest(Path(summary["path"]))["crops"] == 3
    losses, queues = {}, {}
    for mode in ("on", "off"):
        trainer = Trainer(cfg_for(fmnist_small, tmp_path, f"teacher.cache={mode}", "optim.max_steps=3", *small),
                          DistEnv.detect(), Preemption())
        batches = iter(trainer.data)
        losses[mode] = [trainer.train_step(next(batches)).loss.item() for _ in range(3)]
        queues[mode] = trainer.method.small_queue.queue.clone()
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(queues["on"], queues["off"], rtol=0, atol=1e-5)

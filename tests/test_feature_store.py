"""Resumable feature extraction: chunk files, a real USR2 mid-extraction, and the resumed kNN's equality.

Signals are real (os.kill to this process); submitit's requeue is replaced by a stand-in that raises
`Requeued`, and the "requeued job" is a second `run_knn` in the same process, as in test_cache.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from eval_fixtures import seed_cluster_checkpoint

from seed_cluster.errors import CheckpointError
from seed_cluster.eval_config import load_eval_config
from seed_cluster.evaluate import run_knn
from seed_cluster.feature_store import FeatureStore, my_chunks, progress
from seed_cluster.preemption import Preemption


class Requeued(BaseException):
    """What the stand-in for submitit's USR2 handler raises instead of `scontrol requeue` + exit."""


def _cfg(root: Path, source: Path, out: Path, *extra: str):
    return load_eval_config([f"source.checkpoint={source}", f"run_dir={out}", "device=cpu", "data=fashion_mnist",
                             f"data.train={root / 'train.beton'}", f"data.val={root / 'test.beton'}",
                             "data.num_workers=1", "knn.batch_size=32", "knn.batches_per_chunk=2",
                             "knn.keep_features=true", *extra])


def _chunks(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every finished chunk file under `directory`."""
    return {f"{p.parent.name}/{p.name}": (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(directory.glob("*/chunk-*.pt"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory, fmnist_small) -> Path:
    run = tmp_path_factory.mktemp("knn_source") / "run"
    seed_cluster_checkpoint(run / "checkpoints" / "step-00000007.pt", "convnet_s",
                            train_beton=str(fmnist_small / "train.beton"))
    return run


def test_knn_interrupted_by_usr2_resumes_from_its_finished_chunks_to_the_uninterrupted_result(
        fmnist_small, source, tmp_path):
    reference = run_knn(_cfg(fmnist_small, source, tmp_path / "whole"))

    # 2000 train + 2000 val samples in chunks of 2 batches of 32: 32 + 32 chunks. USR2 once the first is on disk.
    features = tmp_path / "resumed" / "features"
    cfg = _cfg(fmnist_small, source, tmp_path / "resumed")

    def signal_after_first_chunk():
        deadline = time.time() + 300
        while not list(features.glob("train/chunk-*.pt")) and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    def submitit_stand_in(signum, frame):
        raise Requeued()

    old = signal.signal(signal.SIGUSR2, submitit_stand_in)
    try:
        sender = threading.Thread(target=signal_after_first_chunk, daemon=True)
        sender.start()
        with pytest.raises(Requeued):
            run_knn(cfg, preemption=Preemption().install())
        sender.join(timeout=60)
    finally:
        signal.signal(signal.SIGUSR2, old)
    before = _chunks(features)
    assert 1 <= len(before) < 64, "stopped after the first chunk and before the last"
    assert not list(features.glob("*/.chunk-*")), "the chunk in progress is dropped, not left half written"
    assert "train.beton" in progress(features) and f"{len(before)}/" in progress(features)

    resumed = run_knn(cfg)
    after = _chunks(features)
    assert len(after) == 64
    assert {name: after[name] for name in before} == before, "finished chunks must not be recomputed"
    timing = {"knn_extract_s", "knn_search_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in reference.items() if k not in timing}
    for split in ("train", "val"):
        whole = torch.load(tmp_path / "whole" / "features" / split / "chunk-000001.pt", weights_only=True)
        again = torch.load(features / split / "chunk-000001.pt", weights_only=True)
        assert torch.equal(whole["features"], again["features"]) and torch.equal(whole["labels"], again["labels"])


def test_features_are_deleted_after_the_results_unless_kept(fmnist_small, source, tmp_path):
    results = run_knn(_cfg(fmnist_small, source, tmp_path / "e", "knn.keep_features=false",
                           "knn.batches_per_chunk=100"))
    assert results["knn_train_samples"] == 2000 and results["knn_val_samples"] == 2000
    assert not (tmp_path / "e" / "features").exists()
    assert (tmp_path / "e" / "knn.json").is_file() and (source / "results.json").is_file()


def test_a_temporary_is_never_a_finished_chunk_and_a_wrong_range_is_refused(fmnist_small, tmp_path):
    store = FeatureStore(tmp_path / "s", str(fmnist_small / "test.beton"), 500, 200, "ckpt.pt")
    assert store.ranges == [(0, 200), (200, 400), (400, 500)]
    store.prepare()
    store.write(0, torch.ones(200, 4), torch.zeros(200, dtype=torch.int64), rank=0)
    killed_writer = tmp_path / "s" / ".chunk-000001.pt.tmp-4242"
    killed_writer.write_bytes(b"half a chunk")
    assert store.done() == [0]
    store.prepare()  # the next start
    assert not killed_writer.exists() and store.done() == [0]
    with pytest.raises(CheckpointError, match=r"chunk-000001.pt \(samples 200 to 399\) is missing"):
        store.read()
    torch.save({"start": 0, "end": 200, "rank": 1, "features": torch.ones(200, 4),
                "labels": torch.zeros(200, dtype=torch.int64)}, tmp_path / "s" / "chunk-000001.pt")
    store.write(2, torch.ones(100, 4), torch.zeros(100, dtype=torch.int64), rank=1)
    with pytest.raises(CheckpointError, match=r"chunk-000001.pt holds samples 0 to 199 .* not 200 to 399"):
        store.read()


def test_a_store_of_another_extraction_is_refused(fmnist_small, tmp_path):
    FeatureStore(tmp_path / "s", str(fmnist_small / "test.beton"), 500, 200, "a.pt").prepare()
    with pytest.raises(CheckpointError, match=r"differs in chunk_size, num_chunks, source\); delete it"):
        FeatureStore(tmp_path / "s", str(fmnist_small / "test.beton"), 500, 100, "b.pt").prepare()


def test_remaining_chunks_are_dealt_round_robin_in_increasing_order():
    shares = [my_chunks([0, 3], 8, rank, 3) for rank in range(3)]
    assert shares == [[1, 5], [2, 6], [4, 7]]
    assert sorted(i for s in shares for i in s) == [1, 2, 4, 5, 6, 7]
    assert my_chunks(list(range(8)), 8, 0, 2) == []


@pytest.mark.slow
def test_two_rank_local_knn_job_signalled_mid_extraction_requeues_and_matches_one_process(
        fmnist_small, source, tmp_path):
    """cluster=local (two gloo processes): USR2 to rank 0 mid-extraction -> submitit's local requeue ->
    the next attempt extracts only what is missing; the results equal a single-process run."""
    import subprocess
    import sys

    from conftest import ROOT
    from test_preemption import local_rank0_pid

    reference = run_knn(_cfg(fmnist_small, source, tmp_path / "whole"))
    out = tmp_path / "job"
    job = subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "eval.py"), f"source.checkpoint={source}", f"run_dir={out}",
         "device=cpu", "data=fashion_mnist", f"data.train={fmnist_small / 'train.beton'}",
         f"data.val={fmnist_small / 'test.beton'}", "data.num_workers=1", "knn.batch_size=32",
         "knn.batches_per_chunk=2", "knn.keep_features=true", "cluster=local", "cluster.tasks_per_node=2",
         "cluster.cpus_per_task=1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((out / "features").glob("train/chunk-*.pt")):
        assert time.monotonic() < deadline and job.poll() is None, "no feature chunk written"
        time.sleep(0.05)
    os.kill(local_rank0_pid(out / "submitit"), signal.SIGUSR2)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-3000:]
    assert "requeueing kNN evaluation" in output and "chunks done" in output, output[-3000:]
    assert "resuming the kNN feature extraction" in output, output[-3000:]
    knn = json.loads((out / "knn.json").read_text())["results"]
    timing = {"knn_extract_s", "knn_search_s"}
    assert {k: v for k, v in knn.items() if k not in timing} == pytest.approx(
        {k: v for k, v in reference.items() if k not in timing})

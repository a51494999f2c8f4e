"""End-to-end training through the real launcher: local DDP (gloo), checkpoints, TensorBoard, resume, NaN."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from conftest import run_launcher
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from seed_cluster.checkpoint import Checkpointer, load

pytestmark = pytest.mark.slow


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["cluster=local", "cluster.cpus_per_task=1", "data=fashion_mnist", f"data.train={data / 'train.beton'}",
            f"data.val={data / 'test.beton'}", "data.batch_size_per_rank=32", "data.num_workers=1",
            "student=convnet_s", "teacher=convnet_l", "teacher.hidden_dim=64", "method.dim=32",
            "method.queue_size=100", f"output_dir={out}", "logging.progress_bar=false", *extra]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def only_run_dir(out: Path) -> Path:
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_two_rank_ddp_run_writes_checkpoint_and_tensorboard_scalars(fmnist_small, tmp_path):
    result = run_launcher(*tiny_run(fmnist_small, tmp_path, "cluster.tasks_per_node=2", "optim.max_steps=6",
                                    "checkpoint.every_steps=3", "logging.every_steps=2",
                                    "knn.every_steps=6", "knn.train_samples=200", "knn.val_samples=100"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tensorboard --logdir" in result.stdout
    run = only_run_dir(tmp_path)

    ckpts = Checkpointer(run / "checkpoints").paths()
    assert [p.name for p in ckpts] == ["step-00000003.pt", "step-00000006.pt"]
    state = load(ckpts[-1])
    assert state["step"] == 6 and len(state["rng"]) == 2
    assert state["data"] == {"epoch": 0, "batches_consumed": 6, "world_size": 2}
    assert not any(k.startswith("teacher.") for k in state["model"]), "the frozen teacher must not be saved"
    # 6 steps x 2 ranks x 32 keys, gathered into a 100-slot queue: full, pointer wrapped to 384 % 100.
    assert state["model"]["queue.ptr"].item() == 384 % 100
    assert state["model"]["queue.filled"].item() == 100

    logged = scalars(run)
    for tag in ("loss/train", "lr/student", "throughput/images_per_s", "time/data_loading(%)", "queue/fill",
                "entropy_student", "entropy_teacher", "agreement_top1", "checkpoint/save_s", "knn/top1"):
        assert any(t.endswith(tag) for t in logged), f"{tag} missing from {sorted(logged)}"
    assert [s for s, _ in logged["loss/train"]] == [2, 4, 6]
    assert all(math.isfinite(v) for _, v in logged["loss/train"])


def test_resume_auto_continues_from_the_latest_checkpoint_bitwise(fmnist_small, tmp_path):
    common = tiny_run(fmnist_small, tmp_path / "a", "checkpoint.every_steps=2", "logging.every_steps=2")
    straight = run_launcher(*common, "optim.max_steps=4", "run_dir=" + str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Same schedule length, but interrupted: stop after step 2 by deleting the later checkpoint.
    resumed_dir = tmp_path / "resumed"
    first = run_launcher(*common, "optim.max_steps=4", f"run_dir={resumed_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    (resumed_dir / "checkpoints" / "step-00000004.pt").unlink()
    second = run_launcher(*common, "optim.max_steps=4", f"run_dir={resumed_dir}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step 2" in second.stdout

    a = load(tmp_path / "straight" / "checkpoints" / "step-00000004.pt")
    b = load(resumed_dir / "checkpoints" / "step-00000004.pt")
    assert b["train_state"]["restarts"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_each_rank_runs_torch_on_cluster_cpus_per_task_threads_despite_ffcv(fmnist_small, tmp_path):
    """The launcher exports cluster.cpus_per_task as OMP_NUM_THREADS; FFCV's loader used to reset torch to
    data.num_workers threads (1 here), so the rank logged 'torch 1'."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = run_launcher(*tiny_run(fmnist_small, tmp_path, "optim.max_steps=2"), "cluster.cpus_per_task=2", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "threads per rank: torch 2, FFCV 1 (cluster.cpus_per_task, data.num_workers)" in result.stdout


def test_nan_loss_fails_with_one_line_and_keeps_the_last_good_checkpoint(fmnist_small, tmp_path):
    result = run_launcher(*tiny_run(fmnist_small, tmp_path, "optim.max_steps=20", "optim.base_lr=1e30",
                                    "optim.warmup_epochs=0", "checkpoint.every_steps=1", "logging.every_steps=100"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss became non-finite at step"), result.stderr[-2000:]
    good = Checkpointer(only_run_dir(tmp_path) / "checkpoints").paths()
    assert good, "the checkpoint saved before the NaN must survive"
    state = load(good[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

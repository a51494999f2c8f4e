"""Training jobs on the real local SLURM cluster (launch/local_cluster.sh), submitted as a user would:
`python launch/slurm.py cluster=slurm nodes=2 ...`.

One uninterrupted 2-node run is the reference; runs that are signalled, preempted by the high
partition, or lose a rank to kill -9 and are resubmitted must end bitwise equal to it (CPU).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import run_launcher
from test_trainer import scalars

from seed_cluster.checkpoint import Checkpointer, load

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

STEPS = 90  # 2000 images / (2 ranks x 32) = 31 steps per epoch: 90 steps cross two epoch boundaries


def slurm_run(data: Path, out: Path, *extra: str) -> list[str]:
    return ["cluster=slurm", "nodes=2", "cluster.tasks_per_node=1", "cluster.gpus_per_node=0",
            "cluster.cpus_per_task=1", "cluster.timeout_min=30", "device=cpu", "data=fashion_mnist",
            f"data.train={data / 'train.beton'}", f"data.val={data / 'test.beton'}", "data.batch_size_per_rank=32", "data.num_workers=1",
            "student=convnet_s", "teacher=convnet_l", "teacher.hidden_dim=64", "method.dim=32",
            "method.queue_size=100", f"output_dir={out}", "logging.progress_bar=false", "logging.every_steps=1",
            f"optim.max_steps={STEPS}", "checkpoint.every_steps=10", *extra]


def submit(*overrides: str, timeout: float = 120) -> tuple[int, Path]:
    """Run the launcher (it returns once sbatch accepted the job); returns (job id, run directory)."""
    result = run_launcher(*overrides, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    job_id = int(re.search(r"^job (\d+) \(slurm, 2 ranks\)", result.stdout, re.M).group(1))
    directory = Path(re.search(r"^run directory: (.+)$", result.stdout, re.M).group(1))
    assert "tensorboard --logdir" in result.stdout
    if "cluster.wait=true" in overrides:  # the launcher streamed rank 0's log until the job ended
        assert "Job completed successfully" in result.stdout, result.stdout[-3000:]
    return job_id, directory


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(poll)
    return value


def rank0_log(directory: Path, job_id: int) -> str:
    path = directory / "submitit" / f"{job_id}_0_log.out"
    return path.read_text(errors="replace") if path.exists() else ""


def finished(cluster, job_id: int, directory: Path, timeout: float = 240) -> dict:
    """Wait for COMPLETED; returns the final checkpoint."""
    try:
        cluster.wait_for_state(job_id, "COMPLETED", timeout=timeout, poll=1)
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n--- rank 0 log ---\n{rank0_log(directory, job_id)[-4000:]}") from None
    return load(Checkpointer(directory / "checkpoints").latest())


def checkpoint_reached(directory: Path, step: int) -> bool:
    latest = Checkpointer(directory / "checkpoints").latest()
    return latest is not None and int(latest.stem.split("-")[1]) >= step


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["data"] == b["data"]
    for key, value in a["model"].items():  # student, heads, queue and its pointer
        assert torch.equal(value, b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"]), ka


def assert_continuous_tensorboard(directory: Path) -> dict:
    logged = scalars(directory)
    assert [s for s, _ in logged["loss/train"]] == list(range(1, STEPS + 1)), "duplicate or missing steps"
    return logged


@pytest.fixture(scope="module")
def reference(slurm_cluster, fmnist_small, tmp_path_factory) -> dict:
    """The uninterrupted 2-node run every interrupted run is compared with."""
    job_id, directory = submit(*slurm_run(fmnist_small, tmp_path_factory.mktemp("reference")), "cluster.wait=true",
                               timeout=300)
    state = finished(slurm_cluster, job_id, directory)
    return {"job_id": job_id, "dir": directory, "state": state}


def test_two_node_job_trains_checkpoints_and_finishes(slurm_cluster, reference):
    state, directory = reference["state"], reference["dir"]
    assert state["step"] == STEPS and len(state["rng"]) == 2 and state["train_state"]["restarts"] == 0
    assert [p.name for p in Checkpointer(directory / "checkpoints").paths()] == [
        "step-00000070.pt", "step-00000080.pt", "step-00000090.pt"]
    record = slurm_cluster.sacct_records(reference["job_id"])[-1]
    assert record["ExitCode"] == "0:0" and record["NodeList"] in ("n[1-2]", "n[2-3]", "n[3-4]"), record
    assert "DistEnv(rank=0, local_rank=0, world_size=2, master_addr='n" in rank0_log(directory, reference["job_id"])
    assert_continuous_tensorboard(directory)


def test_usr2_mid_epoch_requeues_and_ends_bitwise_equal(slurm_cluster, fmnist_small, tmp_path, reference):
    job_id, directory = submit(*slurm_run(fmnist_small, tmp_path))
    wait_for(lambda: checkpoint_reached(directory, 10), 120, "the first checkpoint")
    slurm_cluster.run(["scancel", "--signal=USR2", str(job_id)])
    state = finished(slurm_cluster, job_id, directory)

    log = rank0_log(directory, job_id)
    assert "this job is preempted" in log and "requeueing through submitit" in log, log[-3000:]
    assert state["train_state"]["restarts"] == 1 and state["train_state"]["preemptions"] == 1
    assert slurm_cluster.job_info(job_id).get("Restarts") == "1"
    stopped_at = int(re.search(r"stopping at step (\d+)", log).group(1))
    assert re.search(rf"resumed from \S+step-{stopped_at:08d}\.pt at step {stopped_at} ", log), "nothing recomputed"
    assert stopped_at % 31 != 0, "the signal should land mid-epoch"
    assert_bitwise_equal(reference["state"], state)
    logged = assert_continuous_tensorboard(directory)
    assert [s for s, _ in logged["preemption/time_lost_s"]] == [stopped_at + 1]


def test_high_partition_job_preempts_and_the_run_requeues_and_finishes(slurm_cluster, fmnist_small, tmp_path,
                                                                      reference):
    job_id, directory = submit(*slurm_run(fmnist_small, tmp_path, "cluster.partition=low"))
    wait_for(lambda: checkpoint_reached(directory, 10), 120, "the first checkpoint")
    # Every CPU of every node: only possible by preempting the low job.
    high = slurm_cluster.sbatch("-p", "high", "-N4", f"--ntasks-per-node={slurm_cluster.cpus_per_node}", "-t", "2",
                                "-J", "high", "-o", str(tmp_path / "high.out"), script="#!/bin/bash\nsleep 3\n")
    state = finished(slurm_cluster, job_id, directory)
    assert slurm_cluster.wait_for_state(high, "COMPLETED", timeout=30) == "COMPLETED"
    log = rank0_log(directory, job_id)
    assert "stopping at step" in log and state["train_state"]["preemptions"] >= 1, log[-3000:]
    assert_bitwise_equal(reference["state"], state)
    assert_continuous_tensorboard(directory)


def test_time_limit_requeues_through_the_timeout_path_until_max_num_timeout(slurm_cluster, fmnist_small, tmp_path):
    # timeout_min=1 with the USR2 30 s before the limit: every attempt is stopped by the timeout
    # signal; after max_num_timeout=2 requeues submitit gives up and the job fails, saying why. (With the
    # USR2 45 s before, a backfill-started attempt once got it 1 s after its start, before Python had
    # loaded the job, and died of it: slurmctld's end time for such a job can be some seconds early.)
    overrides = slurm_run(fmnist_small, tmp_path, "cluster.timeout_min=1", "cluster.signal_delay_s=30",
                          "cluster.max_num_timeout=2", "optim.max_steps=1000000")
    job_id, directory = submit(*overrides)
    try:
        slurm_cluster.wait_for_state(job_id, "FAILED", timeout=360, poll=1)
    except (AssertionError, TimeoutError) as e:
        raise AssertionError(f"{e}\n--- rank 0 log ---\n{rank0_log(directory, job_id)[-4000:]}") from None
    log = rank0_log(directory, job_id)
    assert log.count("this job is timed-out") == 3, log[-4000:]
    assert "Job not requeued because: timed-out too many times" in log
    stops = [int(s) for s in re.findall(r"stopping at step (\d+)", log)]
    assert len(stops) == 3 and stops == sorted(set(stops)), stops  # progress in every attempt
    final = load(Checkpointer(directory / "checkpoints").latest())
    assert final["step"] == stops[-1] and final["train_state"]["restarts"] == 2
    logged = scalars(directory)
    assert [s for s, _ in logged["loss/train"]] == list(range(1, stops[-1] + 1))


def rank_pid(job_id: int, rank: int) -> int | None:
    """The pid of the Python process of `rank` in SLURM job `job_id` (all "nodes" are this host)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ \
                and f"SLURM_PROCID={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_kill_9_of_one_rank_ends_the_job_and_resubmitting_resumes(slurm_cluster, fmnist_small, tmp_path, reference):
    overrides = slurm_run(fmnist_small, tmp_path)
    job_id, directory = submit(*overrides)
    wait_for(lambda: checkpoint_reached(directory, 20), 120, "the second checkpoint")
    os.kill(wait_for(lambda: rank_pid(job_id, 1), 10, "rank 1's process"), 9)
    state = slurm_cluster.wait_for_state(job_id, {"FAILED", "CANCELLED", "COMPLETED"}, timeout=120, poll=1)
    assert state == "FAILED", rank0_log(directory, job_id)[-3000:]
    last = int(Checkpointer(directory / "checkpoints").latest().stem.split("-")[1])
    assert last < STEPS

    again, same_dir = submit(*overrides)  # the same command: same run directory, resumes
    assert same_dir == directory and again != job_id
    final = finished(slurm_cluster, again, directory)
    assert f"resumed from {directory / 'checkpoints' / f'step-{last:08d}.pt'} at step {last} " in rank0_log(
        directory, again)
    assert final["train_state"]["restarts"] == 1
    assert_bitwise_equal(reference["state"], final)
    assert_continuous_tensorboard(directory)  # what the killed attempt logged after step `last` is purged

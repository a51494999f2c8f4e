"""Preemption: the handler only sets a flag, the trainer saves at a step boundary, and a run stopped
several times (mid-epoch) ends bitwise equal to the same run uninterrupted.

Signals are real (os.kill to this process) but submitit's requeue is replaced by a stand-in that
raises `Requeued`; the "requeued job" is a fresh Trainer in the same process. The same flow on
the real SLURM cluster is in test_slurm_jobs.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from seed_cluster.checkpoint import Checkpointer, load
from seed_cluster.distributed import DistEnv
from seed_cluster.launcher import load_config
from seed_cluster.preemption import (
    NO_SIGNAL,
    REQUEUE,
    TERMINATE,
    Preemption,
    RequeueLoopError,
    RestartGuard,
    StalledError,
)

USR2 = signal.SIGUSR2


class Requeued(BaseException):
    """What the stand-in for submitit's USR2 handler raises instead of `scontrol requeue` + exit."""


@pytest.fixture
def submitit_handler():
    """Installs a stand-in for submitit's USR2 handler (as submitit does before the job runs)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Requeued()

    old_usr2, old_term = signal.signal(USR2, handler), signal.getsignal(signal.SIGTERM)
    yield calls
    signal.signal(USR2, old_usr2)
    signal.signal(signal.SIGTERM, old_term)


# -- the handler ---------------------------------------------------------------------------------------

def test_signal_handler_only_sets_a_flag_and_keeps_the_first_time(submitit_handler):
    p = Preemption().install()
    try:
        assert p.received == NO_SIGNAL and p.agree() == NO_SIGNAL
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.received == TERMINATE and p.count == 1
        first = p.received_at
        os.kill(os.getpid(), USR2)
        os.kill(os.getpid(), USR2)
        assert p.received == REQUEUE and p.count == 3 and p.received_at == first
        assert p.agree() == REQUEUE  # one process: the all-reduce is the local value
        assert submitit_handler == [], "submitit's handler must not run inside the signal"
    finally:
        p.uninstall()


def test_uninstall_puts_submitits_handlers_back(submitit_handler):
    before = signal.getsignal(USR2), signal.getsignal(signal.SIGTERM)
    p = Preemption().install()
    assert signal.getsignal(USR2) == p.on_signal
    p.uninstall()
    assert (signal.getsignal(USR2), signal.getsignal(signal.SIGTERM)) == before


def test_rank0_requeues_through_submitits_handler(submitit_handler):
    p = Preemption().install()
    with pytest.raises(Requeued):
        p.requeue_or_exit(REQUEUE, rank=0, step=7)
    assert submitit_handler == [USR2]


@pytest.mark.parametrize("decision, rank, code", [(REQUEUE, 1, 0), (TERMINATE, 1, 0), (TERMINATE, 0, 143)])
def test_other_ranks_and_sigterm_exit_without_requeueing(submitit_handler, decision, rank, code):
    p = Preemption().install()
    with pytest.raises(SystemExit) as exit_:
        p.requeue_or_exit(decision, rank=rank, step=7)
    assert exit_.value.code == code
    assert submitit_handler == []


def test_restart_guard_counts_consecutive_starts_from_one_step(tmp_path):
    guard = RestartGuard(tmp_path / "restarts.json")
    assert [guard.record(10), guard.record(10), guard.record(20), guard.record(20), guard.record(20)] == [1, 2, 1, 2, 3]
    assert json.loads((tmp_path / "restarts.json").read_text())["count"] == 3


def test_waiting_for_ranks_that_make_no_progress_fails_with_one_line_instead_of_hanging():
    with pytest.raises(StalledError) as info:
        Preemption().wait_until(lambda: False, 0, lambda: "3/8 chunks done", poll_s=0.02, stall_s=0.2)
    message = str(info.value)
    assert "\n" not in message and "3/8 chunks done" in message and "submitting the same command" in message


def test_waiting_goes_on_past_the_stall_time_while_other_ranks_make_progress():
    polls = []

    def progress():
        polls.append(None)  # every poll sees one more chunk done
        return f"{len(polls)} chunks done"

    started = time.monotonic()
    Preemption().wait_until(lambda: len(polls) >= 20, 0, progress, poll_s=0.02, stall_s=0.1)
    assert time.monotonic() - started > 0.1  # longer than stall_s in all, but never that long without progress


# -- the trainer, in this process ----------------------------------------------------------------------

def tiny(data: Path, run: Path, *extra: str):
    return load_config(["cluster=local", "cluster.cpus_per_task=1", "data=fashion_mnist",
                        f"data.train={data / 'train.beton'}", f"data.val={data / 'test.beton'}", "data.batch_size_per_rank=32", "data.num_workers=1",
                        "student=convnet_s", "teacher=convnet_l", "teacher.hidden_dim=64", "method.dim=32",
                        "method.queue_size=100", f"run_dir={run}", "logging.progress_bar=false",
                        "logging.every_steps=1", "checkpoint.every_steps=1000", "device=cpu", *extra])


def run_with_signals(cfg, at_steps: dict[int, int], during_save: bool = False) -> int:
    """Train to the end in one process, delivering `signal` after step `k` for each k in `at_steps`;
    each stop is followed by a fresh Trainer (the requeued job). Returns the number of attempts."""
    from seed_cluster.trainer import Trainer

    attempts = 0
    while True:
        attempts += 1
        preemption = Preemption().install()
        trainer = Trainer(cfg, DistEnv.detect(), preemption)
        step_fn = trainer.train_step

        def step_then_signal(batch, with_stats=False, trainer=trainer, step_fn=step_fn):
            out = step_fn(batch, with_stats)
            if trainer.state.step + 1 in at_steps:
                os.kill(os.getpid(), at_steps.pop(trainer.state.step + 1))
            return out

        trainer.train_step = step_then_signal
        if during_save:  # a second signal while the checkpoint is written changes nothing
            save = trainer.checkpointer.save

            def save_with_signal(state, step, save=save):
                os.kill(os.getpid(), USR2)
                return save(state, step)

            trainer.checkpointer.save = save_with_signal
        try:
            trainer.train()
            return attempts
        except Requeued:
            pass
        finally:
            preemption.uninstall()


def final_state(run: Path) -> dict:
    return load(Checkpointer(run / "checkpoints").latest())


def test_preempted_three_times_mid_epoch_ends_bitwise_equal_to_uninterrupted(fmnist_small, tmp_path,
                                                                             submitit_handler):
    # 2000 images / 32 = 62 steps per epoch; 70 steps cross the epoch boundary.
    straight = tiny(fmnist_small, tmp_path / "straight", "optim.max_steps=70")
    assert run_with_signals(straight, {}) == 1
    stopped = tiny(fmnist_small, tmp_path / "stopped", "optim.max_steps=70")
    assert run_with_signals(stopped, {5: USR2, 31: USR2, 64: USR2}, during_save=True) == 4
    assert submitit_handler == [USR2] * 3

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert a["step"] == b["step"] == 70
    assert b["train_state"]["restarts"] == 3 and b["train_state"]["preemptions"] == 3
    for key, value in a["model"].items():  # student, heads, queue and its pointer
        assert torch.equal(value, b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"]), ka
    assert a["data"] == b["data"] and a["scaler"] is None


def test_stop_saves_the_exact_step_with_the_signal_and_resume_logs_time_lost(fmnist_small, tmp_path,
                                                                              submitit_handler):
    from seed_cluster.trainer import Trainer

    cfg = tiny(fmnist_small, tmp_path / "run", "optim.max_steps=30")
    preemption = Preemption().install()
    trainer = Trainer(cfg, DistEnv.detect(), preemption)
    step_fn = trainer.train_step

    def step_then_signal(batch, with_stats=False):
        out = step_fn(batch, with_stats)
        if trainer.state.step + 1 == 12:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    with pytest.raises(SystemExit) as exit_:
        trainer.train()
    preemption.uninstall()
    assert exit_.value.code == 143 and submitit_handler == []  # SIGTERM: SLURM requeues or ends the job
    saved = final_state(tmp_path / "run")
    assert saved["step"] == 12 and saved["data"]["batches_consumed"] == 12
    assert saved["preemption"]["signals"] == 2 and saved["preemption"]["signal_at"] <= saved["preemption"]["saved_at"]
    assert saved["config"]["optim"]["max_steps"] == 30 and saved["scaler"] is None  # the resolved config

    resumed = Trainer(cfg, DistEnv.detect())
    resumed.train()
    from test_trainer import scalars

    logged = scalars(tmp_path / "run")
    assert [s for s, _ in logged["loss/train"]] == list(range(1, 31)), "no duplicate or missing steps"
    assert [s for s, _ in logged["preemption/time_lost_s"]] == [13]
    assert [v for _, v in logged["progress/restarts"]][-1] == 1.0


def test_a_run_that_keeps_restarting_from_one_checkpoint_fails_with_one_line(fmnist_small, tmp_path):
    from seed_cluster.trainer import MAX_STARTS_FROM_SAME_STEP, Trainer

    cfg = tiny(fmnist_small, tmp_path / "run", "optim.max_steps=4", "checkpoint.every_steps=2")
    Trainer(cfg, DistEnv.detect()).train()
    (tmp_path / "run" / "checkpoints" / "step-00000004.pt").unlink()  # as if every attempt died after step 2
    for _ in range(MAX_STARTS_FROM_SAME_STEP):
        trainer = Trainer(cfg, DistEnv.detect())
        trainer.restore()
    with pytest.raises(RequeueLoopError, match="times in a row from the checkpoint of step 2"):
        Trainer(cfg, DistEnv.detect()).restore()


@pytest.mark.slow
def test_resume_on_another_world_size_continues_at_the_next_epoch_boundary(fmnist_small, tmp_path,
                                                                           submitit_handler):
    from conftest import run_launcher

    from seed_cluster.trainer import Trainer

    # One rank: 62 steps per epoch; stopped (SIGTERM) at step 70 = epoch 1, batch 8.
    common = ["optim.epochs=3", "optim.warmup_epochs=1", "checkpoint.every_steps=1000"]
    preemption = Preemption().install()
    trainer = Trainer(tiny(fmnist_small, tmp_path / "run", *common), DistEnv.detect(), preemption)
    step_fn = trainer.train_step

    def step_then_signal(batch, with_stats=False):
        out = step_fn(batch, with_stats)
        if trainer.state.step + 1 == 70:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    with pytest.raises(SystemExit):
        trainer.train()
    preemption.uninstall()
    assert final_state(tmp_path / "run")["data"] == {"epoch": 1, "batches_consumed": 8, "world_size": 1}

    # Two ranks (31 steps per epoch): the rest of epoch 1 is skipped, epoch 2 is step 62..93.
    result = run_launcher("cluster=local", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1", "data=fashion_mnist",
                          f"data.train={fmnist_small / 'train.beton'}", f"data.val={fmnist_small / 'test.beton'}", "data.batch_size_per_rank=32",
                          "data.num_workers=1", "student=convnet_s", "teacher=convnet_l", "teacher.hidden_dim=64",
                          "method.dim=32", "method.queue_size=100", f"run_dir={tmp_path / 'run'}",
                          "logging.progress_bar=false", "logging.every_steps=1", "device=cpu", *common)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size changed from 1 to 2: continuing at epoch 2, step 62" in result.stdout
    final = final_state(tmp_path / "run")
    assert final["step"] == 93 and final["train_state"]["restarts"] == 1
    assert final["data"]["world_size"] == 2 and len(final["rng"]) == 2


def local_rank0_pid(submitit_folder: Path) -> int | None:
    """The pid of global rank 0 of the local (LocalExecutor) job whose submitit folder is given."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and str(submitit_folder).encode() in cmdline \
                and b"SUBMITIT_LOCAL_GLOBALID=0" in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_two_rank_local_job_signalled_mid_epoch_requeues_and_ends_bitwise_equal(fmnist_small, tmp_path):
    """cluster=local (two gloo processes): USR2 to rank 0 -> collective save -> submitit's local requeue."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    def launch(run: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "slurm.py"), "cluster=local", "cluster.tasks_per_node=2",
             "cluster.cpus_per_task=1", "device=cpu", "data=fashion_mnist", f"data.train={fmnist_small / 'train.beton'}", f"data.val={fmnist_small / 'test.beton'}",
             "data.batch_size_per_rank=32", "data.num_workers=1", "student=convnet_s", "teacher=convnet_l",
             "teacher.hidden_dim=64", "method.dim=32", "method.queue_size=100", f"run_dir={run}",
             "logging.progress_bar=false", "optim.max_steps=60", "checkpoint.every_steps=10"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, stopped = launch(tmp_path / "straight"), launch(tmp_path / "stopped")
    deadline = time.monotonic() + 240
    while not (tmp_path / "stopped" / "checkpoints" / "step-00000010.pt").exists():
        assert time.monotonic() < deadline and stopped.poll() is None, "no checkpoint"
        time.sleep(0.2)
    os.kill(local_rank0_pid(tmp_path / "stopped" / "submitit"), USR2)
    outputs = [p.communicate(timeout=300)[0] for p in (straight, stopped)]
    assert straight.returncode == 0 and stopped.returncode == 0, outputs[1][-3000:]
    assert "requeueing through submitit" in outputs[1] and "resumed from" in outputs[1]

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert a["step"] == b["step"] == 60 and b["train_state"]["preemptions"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"]), ka

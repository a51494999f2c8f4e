"""The training loop: restore, step until the schedule ends, log, save.

`train_step` is the method's algorithm in order; everything else (data, schedule,
checkpoints, metrics) is a component with one job, built once in `__init__`.
"""

from __future__ import annotations

import logging
import math
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .cache import FeatureCache, open_for_training
from .checkpoint import Checkpointer
from .config import Derived, TrainConfig, config_hash, derive, run_dir, to_dict
from .data import Batch, TrainStream, loader_threads
from .distributed import DistEnv, all_reduce_max, is_distributed
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .methods import StepOutput, build_method, view_specs
from .metrics import MetricsLogger
from .online_knn import OnlineKNN
from .preemption import NO_SIGNAL, Preemption, RequeueLoopError, RestartGuard
from .schedule import learning_rate
from .step import TrainStep

logger = logging.getLogger(__name__)

MAX_STARTS_FROM_SAME_STEP = 3
"""Consecutive starts from one checkpoint after which a run refuses to go on (see RestartGuard)."""


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken so far (the schedule's only state)."""
    restarts: int = 0
    """How many times this run has been resumed from a checkpoint."""
    preemptions: int = 0
    """How many times it saved and stopped on a preemption or time-out signal."""


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or run on a GPU node")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return f"{sha}{'-dirty' if dirty else ''}" if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Trainer:
    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    # model
    method: nn.Module
    step: TrainStep
    """One optimisation step, set up for speed (perf config section); holds the student's DDP wrapper."""
    optimizer: torch.optim.Optimizer
    # data and bookkeeping
    cache: Optional[FeatureCache]
    """The teacher feature cache the run reads instead of running the teacher (None: live teacher)."""
    teacher_fingerprint: Optional[str]
    data: TrainStream
    derived: Derived
    state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsLogger
    online_knn: OnlineKNN
    """Opened by `train()` after the restore, so that a resumed run continues the same event stream."""
    # fault tolerance
    preemption: Preemption
    resumed_from_signal: Optional[float]
    """Wall-clock time of the signal that stopped the previous attempt (None unless resumed after one)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, preemption: Optional[Preemption] = None):
        self.cfg, self.env = cfg, env
        self.preemption = preemption or Preemption()
        self.resumed_from_signal = None
        self.device = pick_device(cfg.device, env.local_rank)
        self.run_dir = run_dir(cfg)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        if env.rank == 0:
            self.checkpointer.prepare()
        self.cache = open_for_training(cfg, view_specs(cfg))  # None: the teacher runs live
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.method = build_method(cfg, with_teacher=self.cache is None).to(self.device)
        self.teacher_fingerprint = self.cache.teacher if self.cache else \
            getattr(getattr(self.method, "teacher", None), "fingerprint", None)
        self.data = TrainStream(cfg.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                num_views=self.method.num_views, device=self.device,
                                replayed_views=cfg.cache.views, cache=self.cache)
        self.online_knn = OnlineKNN(cfg.knn, cfg.data, self.device, env.rank, env.world_size)
        self.derived = derive(cfg, self.data.num_samples, env.world_size)
        bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and self.device.type == "cuda")
        self.step = TrainStep(self.method, cfg.optim, cfg.perf, self.device, lr=self.derived.lr, bf16=bf16,
                              distributed=is_distributed())
        self.optimizer = self.step.optimizer
        self.state = TrainState()
        torch.manual_seed(cfg.seed * 1000 + env.rank)  # per-rank stream for in-step randomness

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        self.restore()
        self.open_metrics()
        self.log_startup()
        total = self.derived.total_steps
        bar = tqdm(total=total, initial=self.state.step, disable=not (self.env.rank == 0 and self.cfg.logging.progress_bar),
                   desc=f"{self.cfg.method.name} {self.cfg.student.arch}", unit="step", dynamic_ncols=True)
        batches = iter(self.data)
        last: dict[str, float] = {}
        while self.state.step < total:
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - wait_start
            log_now = (self.state.step + 1) % self.cfg.logging.every_steps == 0 or self.state.step + 1 == total
            out = self.train_step(batch, with_stats=log_now)
            self.state.step += 1
            self.metrics.add_step(self.derived.global_batch, data_wait)
            self.metrics.add({"loss/train": out.loss, **out.stats})
            self.log_online_knn()
            if log_now:
                self.check_finite(out.loss)
                last = self.log()
                bar.set_postfix(loss=f"{last['loss/train']:.4f}", img_s=f"{last['throughput/images_per_s']:.0f}")
            bar.update(1)
            if self.resumed_from_signal is not None:
                self.log_time_lost()
            if self.state.step % self.cfg.checkpoint.every_steps == 0 or self.state.step == total:
                self.check_finite(out.loss)
                self.save()
            if self.state.step < total and (decision := self.preemption.agree()) != NO_SIGNAL:
                self.stop(decision, out.loss)  # saves, then requeues (rank 0) or exits: never returns
        bar.close()
        self.metrics.close()
        return last

    def train_step(self, batch: Batch, with_stats: bool = False) -> StepOutput:
        """The lr of this step is a pure function of the step; `self.step` (seed_cluster.step) runs the teacher
        (or reads its cached embeddings, `batch.targets`), the student, the loss against the queue, backward,
        the optimizer step and the enqueue."""
        return self.step(batch.views, batch.targets, lr=self.current_lr(), with_stats=with_stats)

    def current_lr(self) -> float:
        d = self.derived
        return learning_rate(self.state.step, peak_lr=d.lr, warmup_steps=d.warmup_steps, total_steps=d.total_steps)

    def log_online_knn(self) -> None:
        """Every rank takes part (features are extracted in shards); rank 0 writes the scalars."""
        knn = self.online_knn.maybe_run(self.state.step, self.method.student)
        if knn is not None and self.metrics.writer is not None:
            for tag, value in knn.items():
                self.metrics.writer.add_scalar(tag, value, self.state.step)

    def check_finite(self, loss: torch.Tensor) -> None:
        """All ranks agree, so that none of them saves or continues past a NaN alone."""
        if all_reduce_max(not math.isfinite(loss.item())):
            raise NonFiniteLossError(
                f"the loss became non-finite at step {self.state.step} (run {self.run_dir}); the last checkpoint "
                "is intact: lower optim.base_lr, enable optim.grad_clip, or use optim.precision=fp32")

    def log(self) -> dict[str, float]:
        extra = {"lr/student": self.current_lr(), "queue/fill": self.method.queue.fill_fraction().item(),
                 "progress/epoch": self.data.epoch + self.data.batches_consumed / self.derived.steps_per_epoch,
                 "progress/restarts": float(self.state.restarts)}
        return self.metrics.flush(self.state.step, extra)

    # -- preemption -------------------------------------------------------------------------------------
    def stop(self, decision: int, loss: torch.Tensor) -> None:
        """Every rank, at the same step boundary: one collective save of this exact step, then leave."""
        logger.info("stopping at step %d on a signal received %.1f s ago", self.state.step,
                    self.preemption.lost_since_signal() or 0.0)
        self.check_finite(loss)  # never checkpoint a NaN: the job fails here instead of requeueing it
        self.state.preemptions += 1
        self.save()  # also when the periodic save just wrote this step: this one records the signal
        self.metrics.close()
        self.preemption.requeue_or_exit(decision, self.env.rank, self.state.step)

    def log_time_lost(self) -> None:
        """After the first step of a resumed attempt: seconds from the previous attempt's signal until now."""
        lost = time.time() - self.resumed_from_signal
        self.resumed_from_signal = None
        logger.info("first step after the preemption: %.1f s lost since the signal", lost)
        if self.metrics.writer is not None:
            self.metrics.writer.add_scalar("preemption/time_lost_s", lost, self.state.step)
            self.metrics.writer.add_scalar("preemption/count", self.state.preemptions, self.state.step)

    def open_metrics(self) -> None:
        """TensorBoard on rank 0. A resumed run hides what an earlier attempt logged after the checkpoint
        (`purge_step`), so the step axis stays continuous: no duplicate and no missing steps."""
        directory = self.run_dir / "tensorboard" if self.env.rank == 0 else None
        self.metrics = MetricsLogger(directory, purge_step=self.state.step + 1 if self.state.step else None)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self) -> None:
        rng = [None] * self.env.world_size
        if is_distributed():
            dist.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if self.env.rank == 0:
            _, seconds = self.checkpointer.save({
                "step": self.state.step,
                "train_state": asdict(self.state),
                "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "data": self.data.state_dict(),
                "rng": rng,
                "scaler": None,  # bf16 autocast needs no loss scaling (fp16, which would, is not offered)
                "preemption": {"signal_at": self.preemption.received_at, "signals": self.preemption.count,
                               "saved_at": time.time()} if self.preemption.received_at else None,
                "config": to_dict(self.cfg),
                "config_hash": config_hash(self.cfg),
                "teacher_fingerprint": self.teacher_fingerprint,
                "git": git_revision(),
            }, self.state.step)
            if self.metrics.writer is not None:
                self.metrics.writer.add_scalar("checkpoint/save_s", seconds, self.state.step)
        if is_distributed():
            dist.barrier()

    def restore(self) -> None:
        found = self.checkpointer.load_latest()
        if found is None:
            return
        path, ckpt = found
        if self.cfg.checkpoint.resume == "never":
            raise ConfigError(f"{self.run_dir} already holds checkpoint {path.name} and checkpoint.resume=never; "
                              "use checkpoint.resume=auto to continue it or choose another name/run_dir")
        if ckpt["config_hash"] != config_hash(self.cfg):
            raise CheckpointError(f"{path} was written by a different configuration "
                                  f"({ckpt['config_hash']} vs {config_hash(self.cfg)}); use another run_dir")
        if ckpt["teacher_fingerprint"] != self.teacher_fingerprint:
            raise CheckpointError(f"{path} was distilled from teacher {ckpt['teacher_fingerprint']}, but the "
                                  f"configured teacher is {self.teacher_fingerprint}; use another run_dir")
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.data.load_state_dict(ckpt["data"])
        self.state = TrainState(**ckpt["train_state"])
        self.state.restarts += 1
        if len(ckpt["rng"]) == self.env.world_size:
            set_rng_state(ckpt["rng"][self.env.rank])
        else:
            self.continue_on_new_world_size(ckpt)
        if ckpt.get("preemption"):
            self.resumed_from_signal = ckpt["preemption"]["signal_at"]
        logger.info("resumed from %s at step %d (epoch %d, batch %d, restart %d)", path, self.state.step,
                    self.data.epoch, self.data.batches_consumed, self.state.restarts)
        self.refuse_requeue_loop(ckpt["step"])

    def continue_on_new_world_size(self, ckpt: dict) -> None:
        """A checkpoint from another world size: `self.data` already moved to the next epoch boundary.

        Training by epochs, the step is re-counted in steps of the new global batch (epoch x steps per
        epoch), so the lr schedule continues at the same fraction of the run; with optim.max_steps the
        step is kept. The per-rank RNG streams restart from their seeds (every augmentation is keyed
        by sample and epoch, not by these streams).
        """
        old = ckpt["data"]["world_size"]
        if self.cfg.optim.max_steps is None:
            self.state.step = self.data.epoch * self.derived.steps_per_epoch
        logger.warning("world size changed from %d to %d: continuing at epoch %d, step %d (global batch %d, "
                       "lr %.4g)", old, self.env.world_size, self.data.epoch, self.state.step,
                       self.derived.global_batch, self.derived.lr)

    def refuse_requeue_loop(self, step: int) -> None:
        """Fail (instead of being requeued again and again) when starts keep resuming from the same step."""
        count = RestartGuard(self.run_dir / "restarts.json").record(step) if self.env.rank == 0 else 0
        if all_reduce_max(count) > MAX_STARTS_FROM_SAME_STEP:  # every rank raises, none waits on rank 0
            raise RequeueLoopError(
                f"this run has started {MAX_STARTS_FROM_SAME_STEP + 1} times in a row from the checkpoint of "
                f"step {step} without saving a later one: it keeps failing or being stopped before it makes "
                f"progress; read the earlier attempts' logs, fix the cause, then delete "
                f"{self.run_dir / 'restarts.json'} to allow new attempts")

    def log_startup(self) -> None:
        d = self.derived
        logger.info("run directory %s (git %s)", self.run_dir, git_revision())
        logger.info("%s", self.env)
        logger.info("derived: %s", d)
        logger.info("training %s: %d samples, %d steps per epoch, %d steps, global batch %d, lr %.4g",
                    self.cfg.method.name, self.data.num_samples, d.steps_per_epoch, d.total_steps,
                    d.global_batch, d.lr)
        logger.info("threads per rank: torch %d, FFCV %d (cluster.cpus_per_task, data.num_workers)",
                    torch.get_num_threads(), loader_threads(self.cfg.data.num_workers))
        logger.info("watch it: tensorboard --logdir %s", (self.run_dir / "tensorboard").resolve())

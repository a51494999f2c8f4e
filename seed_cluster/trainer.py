"""The training loop: restore, step until the schedule ends, log, save.

`train_step` is the method's algorithm in order; everything else (data, schedule,
checkpoints, metrics) is a component with one job, built once in `__init__`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import Checkpointer
from .config import Derived, TrainConfig, config_hash, derive, run_dir, to_dict
from .data import Batch, TrainStream
from .distributed import DistEnv, all_reduce_max, is_distributed
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .methods import StepOutput, build_method
from .metrics import MetricsLogger
from .schedule import learning_rate

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken so far (the schedule's only state)."""
    restarts: int = 0
    """How many times this run has been resumed from a checkpoint."""


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
    model: nn.Module
    """The trained network as the step calls it: the student, inside DDP when distributed."""
    optimizer: torch.optim.Optimizer
    # data and bookkeeping
    data: TrainStream
    derived: Derived
    state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsLogger

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.device = pick_device(cfg.device, env.local_rank)
        self.run_dir = run_dir(cfg)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        if env.rank == 0:
            self.checkpointer.prepare()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.method = build_method(cfg).to(self.device)
        self.model = self._wrap(self.method.student)
        self.data = TrainStream(cfg.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                num_views=self.method.num_views, device=self.device)
        self.derived = derive(cfg, self.data.num_samples, env.world_size)
        self.optimizer = torch.optim.SGD(self.method.student.parameters(), lr=self.derived.lr,
                                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.state = TrainState()
        self.metrics = MetricsLogger(self.run_dir / "tensorboard" if env.rank == 0 else None)
        torch.manual_seed(cfg.seed * 1000 + env.rank)  # per-rank stream for in-step randomness
        self.bf16 = cfg.optim.precision == "bf16" or (cfg.optim.precision == "auto" and self.device.type == "cuda")

    def _wrap(self, student: nn.Module) -> nn.Module:
        if not is_distributed():
            return student
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=device_ids)

    # -- the loop ---------------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        self.restore()
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
            if log_now:
                self.check_finite(out.loss)
                last = self.log()
                bar.set_postfix(loss=f"{last['loss/train']:.4f}", img_s=f"{last['throughput/images_per_s']:.0f}")
            bar.update(1)
            if self.state.step % self.cfg.checkpoint.every_steps == 0 or self.state.step == total:
                self.check_finite(out.loss)
                self.save()
        bar.close()
        self.metrics.close()
        return last

    def train_step(self, batch: Batch, with_stats: bool = False) -> StepOutput:
        # 1. Schedule: the lr of this step is a pure function of the step.
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # 2-4. Teacher (or key) embeddings, student forward, loss against the queue.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.method.compute(batch.views, self.model, with_stats=with_stats)
        # 5. Backward, clip, optimizer step.
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.optim.grad_clip > 0:
            out.stats["grad/norm"] = nn.utils.clip_grad_norm_(self.method.student.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        # 6. Enqueue this step's teacher (key) embeddings, gathered from every rank.
        self.method.enqueue(out.keys)
        return out

    def current_lr(self) -> float:
        d = self.derived
        return learning_rate(self.state.step, peak_lr=d.lr, warmup_steps=d.warmup_steps, total_steps=d.total_steps)

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
                "config": to_dict(self.cfg),
                "config_hash": config_hash(self.cfg),
                "teacher_fingerprint": getattr(getattr(self.method, "teacher", None), "fingerprint", None),
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
        fingerprint = getattr(getattr(self.method, "teacher", None), "fingerprint", None)
        if ckpt["teacher_fingerprint"] != fingerprint:
            raise CheckpointError(f"{path} was distilled from teacher {ckpt['teacher_fingerprint']}, but the "
                                  f"configured teacher is {fingerprint}; use another run_dir")
        self.method.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.data.load_state_dict(ckpt["data"])
        self.state = TrainState(**ckpt["train_state"])
        self.state.restarts += 1
        if len(ckpt["rng"]) == self.env.world_size:
            set_rng_state(ckpt["rng"][self.env.rank])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                    self.data.epoch, self.data.batches_consumed)

    def log_startup(self) -> None:
        d = self.derived
        logger.info("run directory %s (git %s)", self.run_dir, git_revision())
        logger.info("%s", self.env)
        logger.info("derived: %s", d)
        logger.info("training %s: %d samples, %d steps per epoch, %d steps, global batch %d, lr %.4g",
                    self.cfg.method.name, self.data.num_samples, d.steps_per_epoch, d.total_steps,
                    d.global_batch, d.lr)
        logger.info("watch it: tensorboard --logdir %s", (self.run_dir / "tensorboard").resolve())

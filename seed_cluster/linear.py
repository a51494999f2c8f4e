"""Linear evaluation (SEED / MoCo protocol, DESIGN.md §3) as a preemptible, resumable submitit job.

The backbone is frozen and stays in eval mode (BN statistics never move); only a fresh
linear layer, initialised N(0, 0.01) with zero bias, is trained by SGD (lr 30 x batch/256,
momentum 0.9, wd 0) for 100 epochs with the lr multiplied by 0.1 at epochs 60 and 80.
Training views: RandomResizedCrop(resolution, scale 0.08-1) + horizontal flip, seeded by
(seed, epoch, sample index) like every view in this project; validation: resize to
resolution / 0.875 and centre crop (256 -> 224 at ImageNet size). Works for any backbone
`load_backbone` reads: this project's runs, exported weights, SEED release students.
`linear.feature_norm=true` (off by default) adds MAE's parameter-free BatchNorm in front of the
layer, for backbones whose feature scales differ too much for plain SGD (see `build_head`).

Fault tolerance as in training: what to resume from is found at job start by listing the
evaluation directory; the linear layer, optimizer, data position, epoch history and the
concrete source checkpoint are saved atomically at every epoch end and on a preemption
signal (at a step boundary, all ranks together). Each epoch writes top-1/top-5 to
TensorBoard (`linear/*`), to `linear_results.json` in the evaluation directory and to the
run's `results.json` (section `linear`).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Optional

import submitit
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpointer
from .errors import CheckpointError, ConfigError
from .eval_config import EvalConfig, LinearConfig, eval_hash
from .evaluate import centre_batches, eval_dir, load_backbone, num_samples, results_dir, shard, source_data
from .models import feature_width

logger = logging.getLogger(__name__)


def linear_recipe(cfg: LinearConfig):
    """RandomResizedCrop(scale=cfg.crop_scale) + horizontal flip, no photometric change."""
    from .recipes import Recipe

    return Recipe(scale=tuple(cfg.crop_scale), jitter=(0.0, 0.0, 0.0, 0.0), p_jitter=0.0, p_gray=0.0, p_blur=0.0)


def build_classifier(width: int, num_classes: int, init_std: float) -> nn.Linear:
    fc = nn.Linear(width, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=init_std)
    nn.init.zeros_(fc.bias)
    return fc


def build_head(fc: nn.Linear, feature_norm: bool) -> nn.Module:
    """`fc`, or with linear.feature_norm BatchNorm1d(affine=False) then `fc` (MAE's linear probe). Under DDP the
    running statistics follow rank 0's (DDP broadcasts buffers), so every rank validates the same head."""
    if not feature_norm:
        return fc
    return nn.Sequential(nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6), fc)


def lr_at(epoch: int, peak: float, milestones: list[int], gamma: float) -> float:
    """Step schedule: `peak` x gamma^(number of milestones <= epoch)."""
    return peak * gamma ** sum(epoch >= m for m in milestones)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[2] counts of top-1 and top-5 hits (top-C when there are fewer than 5 classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack([ranked[:, 0].sum(), ranked.any(dim=1).sum()]).double()


class LinearEval:
    """One rank of a linear evaluation. `run()` restores, trains the remaining epochs and returns the results."""

    def __init__(self, cfg: EvalConfig, env, preemption=None):
        from .data import TrainStream, ViewSpec
        from .preemption import Preemption
        from .trainer import pick_device

        self.cfg, self.env = cfg, env
        self.preemption = preemption or Preemption()
        self.device = pick_device(cfg.device, env.local_rank)
        self.dir = eval_dir(cfg, "linear")
        self.checkpointer = Checkpointer(self.dir / "checkpoints", cfg.checkpoint.keep)
        if env.rank == 0:
            self.checkpointer.prepare()
        found = self.checkpointer.load_latest()
        self.resume = found[1] if found else None
        # The source is resolved once, at the first start: a requeue keeps the same backbone even if the
        # source run has written newer checkpoints meanwhile.
        source = self.resume["source"] if self.resume else self.cfg.source.checkpoint
        self.loaded = load_backbone(source, cfg.source.arch)
        self.backbone = self.loaded.backbone.to(self.device).eval().requires_grad_(False)
        self.data = source_data(cfg.data, cfg.source.checkpoint)
        if not self.data.val:
            raise ConfigError("linear evaluation needs a labelled held-out set: set data.val=FILE.beton")
        n_train, classes = num_samples(self.data.train)
        self.num_classes = cfg.linear.num_classes or classes
        if self.num_classes < 2:
            raise ConfigError(f"{self.data.train} declares {classes} classes; set linear.num_classes")
        torch.manual_seed(cfg.seed)  # the same initial layer on every rank
        self.fc = build_classifier(feature_width(self.backbone), self.num_classes, cfg.linear.init_std)
        self.head = build_head(self.fc, cfg.linear.feature_norm).to(self.device)
        self.model = self._wrap(self.head)
        self.stream = TrainStream(self.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                                  num_views=[ViewSpec(linear_recipe(cfg.linear), self.data.resolution)],
                                  device=self.device)
        if cfg.linear.max_steps_per_epoch:
            self.stream.steps_per_epoch = min(self.stream.steps_per_epoch, cfg.linear.max_steps_per_epoch)
        self.steps_per_epoch = self.stream.steps_per_epoch
        self.global_batch = self.data.batch_size_per_rank * env.world_size
        self.peak_lr = cfg.linear.base_lr * self.global_batch / 256
        self.optimizer = torch.optim.SGD(self.fc.parameters(), lr=self.peak_lr, momentum=cfg.linear.momentum,
                                         weight_decay=cfg.linear.weight_decay)
        self.step, self.history = 0, []
        self._val_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.bf16 = self.device.type == "cuda"
        self.writer = None

    def _wrap(self, fc: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        from .distributed import is_distributed

        if not is_distributed():
            return fc
        return DistributedDataParallel(fc, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- state ------------------------------------------------------------------------------------------
    def restore(self) -> None:
        if self.resume is None:
            return
        ckpt = self.resume
        if ckpt.get("eval_hash") != eval_hash(self.cfg, "linear"):
            raise CheckpointError(f"{self.dir} holds a linear evaluation of another configuration; "
                                  "use another run_dir")
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.stream.load_state_dict(ckpt["data"])
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        logger.info("resumed linear evaluation at step %d (epoch %d, batch %d) of %s", self.step,
                    self.stream.epoch, self.stream.batches_consumed, ckpt["source"])

    def save(self) -> None:
        import torch.distributed as dist

        from .distributed import is_distributed

        if self.env.rank == 0:
            self.checkpointer.save({
                "step": self.step, "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "data": self.stream.state_dict(), "history": self.history, "source": str(self.loaded.path),
                "arch": self.loaded.arch, "eval_hash": eval_hash(self.cfg, "linear"),
                "config": {"linear": vars(self.cfg.linear).copy(), "seed": self.cfg.seed},
            }, self.step)
        if is_distributed():
            dist.barrier()

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        from .preemption import NO_SIGNAL

        self.restore()
        if self.env.rank == 0:
            self.writer = SummaryWriter(str(self.dir / "tensorboard"),
                                        purge_step=len(self.history) + 1 if self.history else None)
            logger.info("linear evaluation of %s (%s, %s): %d classes, width %d, global batch %d, lr %.4g, "
                        "%d steps/epoch, %d epochs", self.loaded.path, self.loaded.arch, self.loaded.format,
                        self.num_classes, self.fc.in_features, self.global_batch, self.peak_lr,
                        self.steps_per_epoch, self.cfg.linear.epochs)
        total = self.cfg.linear.epochs * self.steps_per_epoch
        batches = iter(self.stream)
        loss_sum, loss_n, epoch_start = torch.zeros((), device=self.device), 0, time.perf_counter()
        while self.step < total:
            epoch = self.step // self.steps_per_epoch
            lr = lr_at(epoch, self.peak_lr, self.cfg.linear.milestones, self.cfg.linear.gamma)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            loss_sum += self.train_step(batch.views[0], batch.labels).detach()
            loss_n += 1
            self.step += 1
            if self.step % self.steps_per_epoch == 0:
                self.end_epoch(epoch, lr, (loss_sum / max(loss_n, 1)).item(), time.perf_counter() - epoch_start)
                loss_sum, loss_n, epoch_start = torch.zeros((), device=self.device), 0, time.perf_counter()
                self.save()
            if self.step < total and (decision := self.preemption.agree()) != NO_SIGNAL:
                self.save()
                if self.writer is not None:
                    self.writer.close()
                self.preemption.requeue_or_exit(decision, self.env.rank, self.step)
        if self.writer is not None:
            self.writer.close()
        return self.history[-1] if self.history else {}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # 1. Frozen backbone features (eval mode, no graph).
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features = self.backbone(images)
        # 2. Linear layer, cross-entropy, SGD step.
        loss = F.cross_entropy(self.model(features.float()), labels.long())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def end_epoch(self, epoch: int, lr: float, train_loss: float, seconds: float) -> None:
        top1, top5 = self.validate()
        result = {"epoch": epoch + 1, "top1": top1, "top5": top5, "lr": lr, "train_loss": train_loss,
                  "seconds": seconds}
        self.history.append(result)
        if self.env.rank != 0:
            return
        logger.info("linear epoch %d/%d: top-1 %.2f top-5 %.2f (loss %.4f, lr %.4g, %.1f s)", epoch + 1,
                    self.cfg.linear.epochs, top1, top5, train_loss, lr, seconds)
        for key in ("top1", "top5", "train_loss", "lr"):
            self.writer.add_scalar(f"linear/{key}", result[key], epoch + 1)
        self.writer.flush()
        from .report import record, write_json_atomic

        write_json_atomic(self.dir / "linear_results.json", {"source": str(self.loaded.path),
                                                              "arch": self.loaded.arch, "epochs": self.history})
        best = max(self.history, key=lambda r: r["top1"])
        record(results_dir(self.cfg, "linear"), "linear",
               {"top1": top1, "top5": top5, "best_top1": best["top1"], "epochs_done": epoch + 1,
                "epochs": self.cfg.linear.epochs},
               {**self.loaded.meta, "linear_source": str(self.loaded.path)})

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """Top-1/top-5 (%) on data.val; the frozen backbone's val features are computed once and kept."""
        import torch.distributed as dist

        from .distributed import is_distributed

        if self._val_cache is None:
            n_val, _ = num_samples(self.data.val)
            features, labels = [], []
            for images, y in centre_batches(self.data.val, self.data, self.device,
                                            list(shard(n_val, self.env.rank, self.env.world_size)),
                                            crop_fraction=self.cfg.linear.crop_fraction):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    features.append(self.backbone(images).float())
                labels.append(y.long())
            self._val_cache = (torch.cat(features), torch.cat(labels))
        features, labels = self._val_cache
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.head.eval()  # feature_norm: the running statistics, not the batch's
        for start in range(0, len(labels), 4096):
            logits = self.head(features[start:start + 4096])
            counts[:2] += topk_correct(logits, labels[start:start + 4096])
        self.head.train()
        counts[2] = len(labels)
        if is_distributed():
            dist.all_reduce(counts)
        return (100.0 * counts[0] / counts[2]).item(), (100.0 * counts[1] / counts[2]).item()


class LinearJob(submitit.helpers.Checkpointable):
    """submitit callable of the linear evaluation; `checkpoint()` requeues the same job (config only)."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def __call__(self) -> Optional[dict]:
        from .job import run_task

        return run_task(eval_dir(self.cfg, "linear"), self.cfg.device, partial(run_linear, self.cfg))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        logger.info("requeueing linear evaluation %s", eval_dir(self.cfg, "linear"))
        return submitit.helpers.DelayedSubmission(LinearJob(self.cfg))


def run_linear(cfg: EvalConfig, env=None, preemption=None) -> dict:
    """Run (or resume) the linear evaluation of `cfg` on this rank; returns the last epoch's results."""
    from .distributed import DistEnv

    return LinearEval(cfg, env or DistEnv.detect(), preemption).run()


def results_path(cfg: EvalConfig) -> Path:
    return eval_dir(cfg, "linear") / "linear_results.json"

"""SEED with small patches: one global view and several small crops per image, a second queue for the crops.

Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR 2021
(arXiv 2101.04731), the small-patch experiments with SwAV teachers; official code
`jacobswan1/SEED` (`seed/small_patch_builder.py`, `main_small-patch.py`). Per image the
data stream makes 1 global view (SwAV's recipe, scale 0.14-1, data.resolution) and
`num_small_crops` small crops (scale 0.05-0.14, 96 px at 224), all from one decode.
Student and teacher see the identical crops. With s, t the student and teacher
embeddings of the global views [B, D] and s', t' those of the small crops [B x n, D]:

    loss = seed_loss(s, t, queue) + seed_loss(s', t', small_queue)

where each term is the mean over its own rows (the official criterion applied to the
two logit sets separately). After the step the global teacher embeddings t go to
`queue` and, as in the official code, only the FIRST small crop's teacher embedding of
each image goes to `small_queue` (B rows, so both queues advance together).

Unlike the official code, this works with any teacher, not only SwAV's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import MethodConfig
from ..data import ViewSpec
from ..loss import queue_stats, seed_loss
from ..models import Encoder
from ..queue import EmbeddingQueue
from ..teachers import FrozenTeacher
from . import StepOutput, teacher_embeddings
from .seed import SEED

PAPER_GLOBAL_SIZE, PAPER_SMALL_SIZE = 224, 96


def small_crop_size(cfg: MethodConfig, resolution: int) -> int:
    """method.small_crop_size, or the paper's 96/224 of the global side when it is 0 (at least 1 px)."""
    return cfg.small_crop_size or max(1, round(resolution * PAPER_SMALL_SIZE / PAPER_GLOBAL_SIZE))


def multi_crop_views(cfg: MethodConfig, resolution: int) -> tuple[ViewSpec, ...]:
    """[global, small_1, ..., small_n]: view key 0 is the global crop, keys 1..n the small ones."""
    small = ViewSpec(cfg.small_recipe, small_crop_size(cfg, resolution))
    return (ViewSpec(cfg.global_recipe, resolution),) + (small,) * cfg.num_small_crops


class SEEDSmallPatch(SEED):
    num_views: tuple[ViewSpec, ...]
    """The views the data stream makes per image: [global, small_1, ..., small_n] (view keys 0..n)."""

    def __init__(self, student: Encoder, teacher: Optional[FrozenTeacher], cfg: MethodConfig, resolution: int):
        super().__init__(student, teacher, cfg)  # the global queue: self.queue
        self.small_queue = EmbeddingQueue(cfg.queue_size, cfg.dim)
        self.num_views = multi_crop_views(cfg, resolution)

    @property
    def view_specs(self) -> tuple[ViewSpec, ...]:
        return self.num_views

    def compute(self, views: list[torch.Tensor], student: nn.Module, with_stats: bool = False,
                targets: Optional[list[torch.Tensor]] = None) -> StepOutput:
        """views: [global [B, 3, R, R], small_1 [B, 3, r, r], ..., small_n]; targets: their cached teacher
        embeddings or None. The small crops run as one batch [n x B] in view-major order, so rows 0..B-1 are
        every image's first small crop."""
        x, small = views[0], torch.cat(views[1:])
        batch = x.shape[0]
        if targets is None:  # the teacher sees the small crops as one batch, as the student does
            t, t_small = teacher_embeddings(self.teacher, [x, small], None)
        else:
            t, t_small = targets[0], torch.cat(targets[1:])
        s, s_small = student(x), student(small)             # student embeddings of the same crops
        loss_global = seed_loss(s, t, self.queue.embeddings, tau_s=self.tau_s, tau_t=self.tau_t)
        loss_small = seed_loss(s_small, t_small, self.small_queue.embeddings, tau_s=self.tau_s, tau_t=self.tau_t)
        stats = {}
        if with_stats:
            stats = {"loss_global": loss_global.detach(), "loss_small": loss_small.detach(),
                     **queue_stats(s.detach(), t, self.queue.embeddings, self.tau_s, self.tau_t),
                     **{f"small_{k}": v for k, v in queue_stats(s_small.detach(), t_small, self.small_queue.embeddings,
                                                                self.tau_s, self.tau_t).items()}}
        keys = torch.stack([t, t_small[:batch]])            # [2, B, D]: global, first small crop per image
        return StepOutput(loss=loss_global + loss_small, keys=keys, stats=stats)

    def enqueue(self, keys: torch.Tensor) -> None:
        """keys [2, B, D] from `compute`: the global teacher embeddings and the first small crop's."""
        self.queue.enqueue(keys[0])
        self.small_queue.enqueue(keys[1])

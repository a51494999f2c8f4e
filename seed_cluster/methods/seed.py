"""SEED: the student learns the frozen teacher's similarity distribution over a queue of teacher embeddings.

Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR 2021
(arXiv 2101.04731). As in the official code, student and teacher see the same
augmented view, and only teacher embeddings are enqueued.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import MethodConfig
from ..loss import queue_stats, seed_loss
from ..models import Encoder
from ..queue import EmbeddingQueue
from ..teachers import FrozenTeacher
from . import StepOutput, teacher_embeddings


class SEED(nn.Module):
    num_views = 1

    def __init__(self, student: Encoder, teacher: Optional[FrozenTeacher], cfg: MethodConfig):
        """`teacher` is None when the run reads the teacher's embeddings from the feature cache."""
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.queue = EmbeddingQueue(cfg.queue_size, cfg.dim)
        self.tau_s, self.tau_t = cfg.tau_s, cfg.tau_t

    def compute(self, views: list[torch.Tensor], student: nn.Module, with_stats: bool = False,
                targets: Optional[list[torch.Tensor]] = None) -> StepOutput:
        """`student` is `self.student` or its DDP wrapper (gradients are synchronised through the wrapper);
        `targets`: the views' cached teacher embeddings (feature cache), or None to run the teacher."""
        x = views[0]
        t, = teacher_embeddings(self.teacher, views, targets)  # frozen: no grad
        s = student(x)                           # student embeddings of the same view
        loss = seed_loss(s, t, self.queue.embeddings, tau_s=self.tau_s, tau_t=self.tau_t)
        stats = queue_stats(s.detach(), t, self.queue.embeddings, self.tau_s, self.tau_t) if with_stats else {}
        return StepOutput(loss=loss, keys=t, stats=stats)

    def enqueue(self, keys: torch.Tensor) -> None:
        self.queue.enqueue(keys)

    def state_dict(self, *args, **kwargs):
        # The frozen teacher is identified by its fingerprint, never saved with the run.
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state, strict: bool = True):
        teacher = self.teacher.state_dict() if self.teacher is not None else {}
        full = {f"teacher.{k}": v for k, v in teacher.items()}
        full.update(state)
        return super().load_state_dict(full, strict=strict)

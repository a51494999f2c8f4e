"""MoCo-v2, the paper's baseline: the same student trained without a teacher.

He et al. 2020 (MoCo, arXiv 1911.05722) and Chen et al. 2020 (MoCo-v2, arXiv 2003.04297):
a momentum key encoder (m = 0.999), a queue of its keys, InfoNCE at tau = 0.2, two
views per image. Shuffle-BN is done within a rank: the key encoder sees the shuffled
batch in `bn_splits` groups, so BN statistics cannot leak which key is the positive.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import MethodConfig
from ..loss import infonce_loss, queue_stats
from ..models import Encoder
from ..queue import EmbeddingQueue
from . import StepOutput


class MoCoV2(nn.Module):
    num_views = 2

    def __init__(self, student: Encoder, cfg: MethodConfig):
        super().__init__()
        self.student = student                       # the query encoder: the network being trained
        self.key_encoder = copy.deepcopy(student).requires_grad_(False)
        self.queue = EmbeddingQueue(cfg.queue_size, cfg.dim)
        self.tau, self.momentum, self.bn_splits = cfg.tau, cfg.momentum, cfg.bn_splits

    @torch.no_grad()
    def momentum_update(self) -> None:
        for k, q in zip(self.key_encoder.parameters(), self.student.parameters(), strict=True):
            k.mul_(self.momentum).add_(q.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(x.shape[0], device=x.device)
        shuffled = torch.cat([self.key_encoder(c) for c in x[perm].chunk(self.bn_splits)])
        k = torch.empty_like(shuffled)
        k[perm] = shuffled                       # undo the shuffle
        return k

    def compute(self, views: list[torch.Tensor], student: nn.Module, with_stats: bool = False,
                targets: None = None) -> StepOutput:
        """`targets` is always None: MoCo-v2 has no teacher (the signature is the one every method shares)."""
        self.momentum_update()                   # key encoder follows the query encoder
        k = self.keys(views[1])                  # keys of the second view: no grad
        q = student(views[0])                    # queries of the first view
        loss = infonce_loss(q, k, self.queue.embeddings, tau=self.tau)
        stats = queue_stats(q.detach(), k, self.queue.embeddings, self.tau, self.tau) if with_stats else {}
        return StepOutput(loss=loss, keys=k, stats=stats)

    def enqueue(self, keys: torch.Tensor) -> None:
        self.queue.enqueue(keys)

"""The straightforward SEED training step: what `seed_cluster.step.TrainStep` is measured and tested against.

Written for this benchmark from the algorithm as the official code (jacobswan1/SEED) runs it:

- the teacher runs in fp32 under `no_grad` (autograd's version counters and views still tracked), its
  BatchNorms as separate layers, in the default (NCHW) memory format;
- the loss clones the whole queue every step and builds the full ``[N, K + 1]`` logit matrices of
  student and teacher by concatenating the positive column to the queue block, then takes
  ``softmax`` / ``log_softmax`` over them;
- plain SGD, one parameter at a time (`foreach=False`);
- the new teacher embeddings overwrite the oldest queue rows after the optimizer step.

The student may run under bf16 autocast (as a GPU user would run it); the teacher never does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceStep:
    """One SEED step over `student` (an Encoder, output L2-normalised) and a frozen `teacher` Encoder.

    `queue` ``[K, D]`` is copied in (the caller's tensor is not modified); `targets` (cached teacher
    embeddings) replace the teacher when given, as in the project's step.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], queue: torch.Tensor, lr: float,
                 momentum: float = 0.9, weight_decay: float = 1e-4, tau_s: float = 0.2, tau_t: float = 1e-4,
                 bf16: bool = False):
        self.student, self.teacher = student, teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.queue = queue.detach().clone()
        self.ptr = 0
        self.tau_s, self.tau_t, self.bf16 = tau_s, tau_t, bf16
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, foreach=False)

    def loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        queue = self.queue.clone().detach()
        s_logits = torch.cat([(s * t).sum(dim=1, keepdim=True), s @ queue.T], dim=1).float() / self.tau_s
        t_logits = torch.cat([(t * t).sum(dim=1, keepdim=True), t @ queue.T], dim=1) / self.tau_t
        return -(F.softmax(t_logits, dim=1) * F.log_softmax(s_logits, dim=1)).sum(dim=1).mean()

    def __call__(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            with torch.no_grad():
                t = self.teacher(x).float()
        else:
            t = targets
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            s = self.student(x)
        loss = self.loss(s.float(), t)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.enqueue(t)
        return loss.detach()

    @torch.no_grad()
    def enqueue(self, t: torch.Tensor) -> None:
        rows = (self.ptr + torch.arange(t.shape[0])) % self.queue.shape[0]
        self.queue[rows.to(self.queue.device)] = t
        self.ptr = (self.ptr + t.shape[0]) % self.queue.shape[0]

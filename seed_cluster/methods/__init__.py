"""Training methods: SEED distillation, its small-patch variant, and the self-supervised baseline MoCo-v2.

A method owns the parts of the model that are not trained by the optimizer
directly (teacher or key encoder, queue) and computes one step's loss. The
trainer owns the optimizer and calls, in order: `compute` (forward and loss),
backward and the optimizer step, then `enqueue` (an explicit line of the step,
never hidden in forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..models import build_student


@dataclass
class StepOutput:
    loss: torch.Tensor
    """Scalar fp32 loss (with grad)."""
    keys: torch.Tensor
    """Embeddings to enqueue after the optimizer step: the teacher's (SEED) or the key encoder's (MoCo);
    seed_small_patch stacks its two queues' rows as [2, B, D]."""
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """Device tensors for logging (queue entropies, agreement, ...); filled on log steps only."""


def build_method(cfg: TrainConfig):
    from .mocov2 import MoCoV2
    from .seed import SEED

    student = build_student(cfg.student.arch, cfg.method.dim)
    if cfg.method.name == "mocov2":
        return MoCoV2(student, cfg.method)
    from ..teachers import load_teacher

    teacher = load_teacher(cfg.teacher, cfg.method.dim)
    if cfg.method.name == "seed_small_patch":
        from .small_patch import SEEDSmallPatch

        return SEEDSmallPatch(student, teacher, cfg.method, resolution=cfg.data.resolution)
    return SEED(student, teacher, cfg.method)

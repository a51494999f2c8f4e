"""Training methods: SEED distillation, its small-patch variant, and the self-supervised baseline MoCo-v2.

A method owns the parts of the model that are not trained by the optimizer
directly (teacher or key encoder, queue) and computes one step's loss. The
trainer owns the optimizer and calls, in order: `compute` (forward and loss),
backward and the optimizer step, then `enqueue` (an explicit line of the step,
never hidden in forward).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import TrainConfig
from ..data import ViewSpec
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


def teacher_embeddings(teacher, views: list[torch.Tensor], targets: Optional[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The teacher's embedding of each view: run live, or (feature cache) the batch's cached `targets`."""
    if targets is not None:
        return targets
    if teacher is None:
        raise RuntimeError("this method was built without a teacher (feature cache) but the batch has no targets")
    return [teacher(x) for x in views]


def view_specs(cfg: TrainConfig) -> tuple[ViewSpec, ...]:
    """The views per image the method of `cfg` trains on (what its `num_views` asks the data stream for),
    known without building the method: the feature cache stores the teacher's embedding of each."""
    if cfg.method.name == "seed_small_patch":
        from .small_patch import multi_crop_views

        return multi_crop_views(cfg.method, cfg.data.resolution)
    count = 2 if cfg.method.name == "mocov2" else 1
    return (ViewSpec(cfg.data.recipe, cfg.data.resolution),) * count


def build_method(cfg: TrainConfig, with_teacher: bool = True):
    """The method of cfg.method. `with_teacher=False` (a run fed by the feature cache) builds no teacher: the
    cached embeddings arrive with each batch as `targets`."""
    from .mocov2 import MoCoV2
    from .seed import SEED

    student = build_student(cfg.student.arch, cfg.method.dim)
    if cfg.method.name == "mocov2":
        return MoCoV2(student, cfg.method)
    from ..teachers import load_teacher

    teacher = load_teacher(cfg.teacher, cfg.method.dim, seed=cfg.seed) if with_teacher else None
    if cfg.method.name == "seed_small_patch":
        from .small_patch import SEEDSmallPatch

        return SEEDSmallPatch(student, teacher, cfg.method, resolution=cfg.data.resolution)
    return SEED(student, teacher, cfg.method)

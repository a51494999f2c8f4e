"""Synthetic checkpoints for the evaluation tests: this project's layout and SEED's release layout."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from seed_cluster.config import DataConfig, StudentConfig, TrainConfig, config_hash, to_dict
from seed_cluster.models import build_student


def seed_cluster_checkpoint(path: Path, arch: str, train_beton: str = "none.beton", seed: int = 0) -> nn.Module:
    """A checkpoint laid out as the trainer writes it (random student); returns the student Encoder."""
    torch.manual_seed(seed)
    cfg = TrainConfig(student=StudentConfig(arch=arch), data=DataConfig(train=str(train_beton)))
    student = build_student(arch, cfg.method.dim).eval()
    model = {f"student.{k}": v for k, v in student.state_dict().items()}
    model["queue.queue"] = torch.randn(cfg.method.dim, 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "seed-cluster", "step": 7, "model": model, "config": to_dict(cfg),
                "config_hash": config_hash(cfg), "teacher_fingerprint": "teacher-fp-123"}, path)
    return student


def seed_release_file(path: Path, arch: str, seed: int = 0, calibrate: torch.Tensor | None = None,
                      backbone: nn.Module | None = None) -> nn.Module:
    """A file laid out like SEED's released students: {"state_dict": {"module.student.*", "module.teacher.*",
    "module.queue", ...}, "epoch", "arch"}; the student's MLP head sits where its classifier was
    (fc.* for ResNets, classifier.* for EfficientNet / MobileNetV3). Returns the timm backbone.

    `calibrate`: images whose statistics the BN layers take on (as training would give them); a
    freshly initialised EfficientNet in eval mode outputs ~1e-6 everywhere, nothing a linear layer can use.
    `backbone`: write this (e.g. trained) timm backbone instead of a freshly initialised one."""
    import timm

    torch.manual_seed(seed)
    backbone = backbone if backbone is not None else timm.create_model(arch, num_classes=0)
    if calibrate is not None:
        for m in backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for batch in calibrate.split(64):
                backbone(batch)
    backbone.eval()
    head_name = "fc" if arch.startswith("resnet") else "classifier"
    width = backbone.head_hidden_size if getattr(backbone, "head_hidden_size", None) else backbone.num_features
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 128))
    state = {f"module.student.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"module.student.{head_name}.{k}": v for k, v in head.state_dict().items()})
    state["module.teacher.conv1.weight"] = torch.randn(64, 3, 7, 7)
    state["module.teacher.fc.0.weight"] = torch.randn(2048, 2048)
    state["module.queue"] = torch.randn(128, 64)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 200, "arch": arch, "state_dict": state}, path)
    return backbone

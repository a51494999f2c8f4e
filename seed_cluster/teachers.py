"""The frozen teacher: an encoder whose weights never change and whose BN statistics never move.

Formats understood here: a plain state dict of an `Encoder` (`backbone.*`, `head.*`),
a plain backbone state dict (timm / torchvision names, with `teacher.head=none`),
optionally behind `module.` prefixes, and this project's own checkpoints (the trained
student, or MoCo-v2's query encoder, teaches the next run). Loading is strict.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from .config import TeacherConfig
from .errors import TeacherError
from .models import Encoder

logger = logging.getLogger(__name__)


class FrozenTeacher(nn.Module):
    """Wraps an `Encoder`: no gradients, always in eval mode (even after `.train()`), forward under no_grad."""

    def __init__(self, encoder: Encoder, fingerprint: str):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.fingerprint = fingerprint
        self.train(False)  # the wrapper itself too, so `teacher.training` is False from the start

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Keep BN in inference mode whatever the caller asks for: SEED's teacher is frozen.
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


def resolve_checkpoint_path(path: str) -> Path:
    """A file, or a run directory (its newest complete checkpoint)."""
    p = Path(path).expanduser()
    if p.is_dir():
        from .checkpoint import Checkpointer  # a run directory: its newest checkpoint teaches

        newest = Checkpointer(p / "checkpoints").latest()
        if newest is None:
            raise TeacherError(f"teacher.checkpoint={path}: the run directory holds no complete checkpoint; "
                               "train it first or point at a checkpoint file")
        return newest
    if not p.is_file():
        raise TeacherError(f"teacher.checkpoint={path} does not exist; give a state-dict file or a run directory")
    return p


def _encoder_state(raw: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The encoder's state dict inside `raw` and a name for the format it came in."""
    if isinstance(raw, dict) and raw.get("format") == "seed-cluster":
        model = raw["model"]
        return {k[len("student."):]: v for k, v in model.items() if k.startswith("student.")}, "seed-cluster checkpoint"
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise TeacherError(f"teacher.checkpoint={path} is not a state dict nor a seed-cluster checkpoint; "
                           "save one with torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    if any(k.startswith("backbone.") for k in state):
        return state, "encoder state dict"
    return {f"backbone.{k}": v for k, v in state.items()}, "backbone state dict"


def load_teacher(cfg: TeacherConfig, dim: int) -> FrozenTeacher:
    """Build the configured teacher and load its weights (random weights only when no checkpoint is given)."""
    encoder = Encoder(cfg.arch, dim, head=cfg.head, hidden_dim=cfg.hidden_dim, key="teacher.arch")
    if cfg.checkpoint is None:
        logger.warning("teacher.checkpoint is not set: the teacher has RANDOM weights (fine for smoke tests only)")
        return FrozenTeacher(encoder, fingerprint=f"random:{cfg.arch}:{cfg.head}")

    path = resolve_checkpoint_path(cfg.checkpoint)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise TeacherError(f"teacher.checkpoint={path} could not be read ({type(e).__name__}: {e})") from e
    state, fmt = _encoder_state(raw, path)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        out_key = next((k for k in reversed(list(state)) if k.startswith("head.") and k.endswith("weight")), None)
        hint = ""
        if out_key is not None and state[out_key].ndim == 2 and state[out_key].shape[0] != dim:
            hint = f" (its head outputs {state[out_key].shape[0]}-d embeddings but method.dim={dim})"
        raise TeacherError(
            f"teacher.checkpoint={path} ({fmt}) does not fit teacher.arch={cfg.arch} head={cfg.head}{hint}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, mis-shaped {misshaped[:3]}; "
            "set teacher.arch/teacher.head/method.dim to match the file")
    encoder.load_state_dict(state, strict=True)
    logger.info("teacher %s (%s) loaded from %s", cfg.arch, fmt, path)
    return FrozenTeacher(encoder, fingerprint=file_fingerprint(path))

"""The teacher zoo: frozen teachers loaded from the checkpoint layout each SSL release uses.

A teacher is an `Encoder` (backbone -> head -> L2 norm) whose weights never change and whose BN
statistics never move. Its weights come from a file whose layout is detected from its contents
(`FORMATS`, checked in this order; key names from the official repositories):

    seed-cluster  this project's checkpoints ({"format": "seed-cluster", "model": {"student.*"}}; a run dir)
    dino          facebookresearch/dino main_dino.py: {"teacher": {[module.]backbone.*, head.mlp.*, head.last_layer.*}}
    mocov3        facebookresearch/moco-v3: {"state_dict": {module.base_encoder.*, momentum_encoder.*, predictor.*}}
    mocov1/mocov2 facebookresearch/moco main_moco.py: {"state_dict": {module.encoder_q.*, encoder_k.*, queue, queue_ptr}};
                  v1's fc is Linear(2048,128), v2's fc.0/fc.2 the MLP
    seed          SEED students (jacobswan1/SEED): {"state_dict": {module.student.*, module.teacher.*, queue}}
    simclr        the SimCLR re-implementation released with SEED: {"model": {module.module.module.*}}, fc.0/1/3
    swav          facebookresearch/swav: a raw state dict, module.*, projection_head.* and prototypes*
    plain         any other state dict of tensors (timm/torchvision names, or an Encoder's backbone.*/head.*)

Loading is strict: every tensor the configured teacher needs must be in the file with its shape, every
tensor of the file must be used or belong to the parts the format is known to carry beside the
encoder (MoCo's key encoder and queue, SwAV's prototypes, DINO's student and last layer, ...), which
are listed once at info level. A file that does not fit raises one line naming the layout it looked
like, the first missing / unexpected / mis-shaped keys and the conf/teacher presets that would fit.

`python -m seed_cluster.teachers inspect FILE` prints what a file holds.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import TeacherConfig
from .errors import ConfigError, SeedClusterError, TeacherError
from .models import SMALL_CONVNETS, Encoder, fold_batchnorm
from .swav_resnet import SWAV_WIDTHS

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parents[1] / "conf" / "teacher"
DEFAULT_DIM = 128

FORMATS = {
    "seed-cluster": "a seed-cluster checkpoint (the trained student teaches)",
    "dino": "DINO (teacher entry, backbone.* / head.mlp.*)",
    "mocov3": "MoCo-v3 (state_dict, module.base_encoder.*)",
    "mocov2": "MoCo-v2 (state_dict, module.encoder_q.* with the MLP fc.0/fc.2)",
    "mocov1": "MoCo-v1 (state_dict, module.encoder_q.* with a linear fc)",
    "seed": "a SEED student (state_dict, module.student.*)",
    "simclr": "SimCLR as released with SEED (model, nested module.*)",
    "swav": "SwAV (raw state dict, module.*, projection_head.* and prototypes)",
    "plain": "a plain state dict (timm/torchvision names or an Encoder's backbone.*/head.*)",
}


class FrozenTeacher(nn.Module):
    """Wraps an `Encoder`: no gradients, always in eval mode (even after `.train()` on it or on a parent).

    Forward runs under inference mode, L2-normalises in fp32 and returns an ordinary tensor [N, dim] that may
    enter the student's autograd graph. By default it runs on CUDA in bf16 autocast and channels_last and on
    the CPU as the surrounding autocast says; `configure` (the perf config section) chooses explicitly.
    """

    def __init__(self, encoder: Encoder, fingerprint: str, format: str = "", source: str = ""):
        super().__init__()
        self.encoder = encoder.eval()
        self.encoder.requires_grad_(False)
        self.fingerprint = fingerprint
        self.format = format
        self.source = source
        self.dim = encoder.dim
        self.channels_last: Optional[bool] = None
        """None: channels_last on CUDA only."""
        self.precision = "auto"
        """auto (bf16 on CUDA; on the CPU whatever autocast is active), fp32 or bf16."""
        self._layout_done = False
        self.__dict__["_compiled"] = None  # not a submodule: the state dict keeps the encoder's own names
        self.train(False)  # the wrapper itself too, so `teacher.training` is False from the start

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # Keep BN in inference mode whatever the caller asks for: SEED's teacher is frozen.
        super().train(False)
        return self

    def configure(self, channels_last: bool, precision: str, compile: bool = False) -> "FrozenTeacher":
        """Set up the forward for speed: fold BN into the convolutions (exact in eval mode up to rounding; the
        teacher never trains), memory layout, precision (auto, fp32, bf16) and optionally torch.compile.
        The fingerprint was taken from the loaded weights before, so the run's identity does not change."""
        folded = fold_batchnorm(self.encoder.backbone)
        logger.info("teacher: folded %d BatchNorm layers into their convolutions", folded)
        self.channels_last, self.precision = channels_last, precision
        self._layout_done = False
        self.__dict__["_compiled"] = torch.compile(self._unnormalised) if compile else None
        return self

    def _unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised by `forward` in fp32: a bf16 normalisation would round every embedding first.
        return self.encoder.head(self.encoder.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.is_cuda if self.channels_last is None else self.channels_last
        if channels_last and x.ndim == 4:
            if not self._layout_done:
                self.encoder.to(memory_format=torch.channels_last)
                self._layout_done = True
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "auto" and not x.is_cuda:
            precision = contextlib.nullcontext()  # the CPU teacher follows the step's own autocast
        else:
            bf16 = self.precision == "bf16" or (self.precision == "auto" and x.is_cuda)
            precision = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)
        embed = self._compiled or self._unnormalised
        with torch.inference_mode():
            with precision:
                z = embed(x)
            z = F.normalize(z.float(), dim=1)
        return z.clone()  # an inference tensor cannot be saved for the student's backward; its clone can


# -- reading files ---------------------------------------------------------------------------------------

def resolve_checkpoint_path(path: Union[str, Path]) -> Path:
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


def read_checkpoint(path: Path) -> object:
    """torch.load, memory-mapped when the file allows it (zip format), so a 2 GB teacher is not copied into
    anonymous memory; restricted unpickling first, full unpickling for files that need it."""
    errors = []
    for kwargs in ({"mmap": True, "weights_only": True}, {"weights_only": True},
                   {"mmap": True, "weights_only": False}, {"weights_only": False}):
        try:
            obj = torch.load(path, map_location="cpu", **kwargs)
        except Exception as e:  # noqa: BLE001 - every unreadable file gets the same one-line answer
            errors.append(e)
            continue
        if not kwargs["weights_only"]:
            logger.info("teacher file %s needed full unpickling (it holds non-tensor Python objects)", path)
        return obj
    e = errors[-1]
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise TeacherError(f"teacher.checkpoint={path} could not be read ({type(e).__name__}: {first[:200]})")


def _is_state(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _wrapped_state(raw: object) -> Optional[dict]:
    """raw["state_dict"] (MoCo, SEED, timm train scripts) or raw itself when it is a state dict."""
    if isinstance(raw, dict) and _is_state(raw.get("state_dict")):
        return raw["state_dict"]
    return raw if _is_state(raw) else None


def detect_format(raw: object) -> Optional[str]:
    """The name of the layout `raw` (what torch.load returned) is in, or None."""
    if isinstance(raw, dict) and raw.get("format") == "seed-cluster" and isinstance(raw.get("model"), dict):
        return "seed-cluster"
    if isinstance(raw, dict) and _is_state(raw.get("teacher")) and any(
            _strip_module(k).startswith("backbone.") for k in raw["teacher"]):
        return "dino"
    state = _wrapped_state(raw)
    if state is not None:
        keys = [_strip_module(k) for k in state]
        if any(k.startswith("base_encoder.") for k in keys):
            return "mocov3"
        if any(k.startswith("encoder_q.") for k in keys):
            return "mocov2" if "encoder_q.fc.0.weight" in keys else "mocov1"
        if any(k.startswith("student.") for k in keys):
            return "seed"
    if isinstance(raw, dict) and _is_state(raw.get("model")) and all(k.startswith("module.") for k in raw["model"]):
        return "simclr"
    if _is_state(raw) and all(k.startswith("module.") for k in raw) and any(
            k.startswith(("module.projection_head.", "module.prototypes")) for k in raw):
        return "swav"
    if state is not None or (isinstance(raw, dict) and _is_state(raw.get("model"))):
        return "plain"
    return None


_CLASSIFIERS = ("fc.", "head.", "classifier.")


def _split_encoder(state: dict, head_prefix: str) -> tuple[dict, list[str]]:
    """A model whose head lives under `head_prefix` (torchvision fc., SwAV projection_head.): Encoder keys."""
    out = {}
    for key, value in state.items():
        if key.startswith(head_prefix):
            out["head." + key[len(head_prefix):]] = value
        else:
            out["backbone." + key] = value
    return out, []


def _select(state: dict, prefix: str) -> tuple[dict, list[str]]:
    """Entries under `prefix` (after removing any module. prefixes), prefix removed; the rest is ignored."""
    chosen, ignored = {}, []
    for key, value in state.items():
        k = _strip_module(key)
        if k.startswith(prefix):
            chosen[k[len(prefix):]] = value
        else:
            ignored.append(k)
    return chosen, ignored


def extract_encoder_state(raw: object, fmt: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The Encoder state dict (`backbone.*`, `head.*`) inside `raw` and the file entries it leaves aside."""
    if fmt == "seed-cluster":
        return _select(raw["model"], "student.")
    if fmt == "dino":
        teacher, _ = _select(raw["teacher"], "")
        ignored = [f"{k} (top level)" for k in raw if k != "teacher"]
        out = {}
        for key, value in teacher.items():
            if key.startswith("backbone."):
                out[key] = value
            elif key.startswith("head.mlp."):
                out["head." + key[len("head.mlp."):]] = value
            else:
                ignored.append(f"teacher.{key}")  # head.last_layer.*: the prototypes-like output layer
        return out, ignored
    if fmt in ("mocov3", "mocov1", "mocov2", "seed"):
        prefix = {"mocov3": "base_encoder.", "seed": "student."}.get(fmt, "encoder_q.")
        chosen, ignored = _select(_wrapped_state(raw), prefix)
        out, _ = _split_encoder(chosen, "head." if "pos_embed" in chosen else "fc.")  # ViT heads are head.*
        return out, ignored
    if fmt == "simclr":
        return _split_encoder({_strip_module(k): v for k, v in raw["model"].items()}, "fc.")[0], \
            [f"{k} (top level)" for k in raw if k != "model"]
    if fmt == "swav":
        chosen, ignored = {}, []
        for key, value in raw.items():
            k = _strip_module(key)
            (ignored.append(k) if k.startswith("prototypes") else chosen.__setitem__(k, value))
        return _split_encoder(chosen, "projection_head.")[0], ignored
    if fmt == "plain":
        state = _wrapped_state(raw)
        ignored = []
        if state is None:
            state = raw["model"]
            ignored = [f"{k} (top level)" for k in raw if k != "model"]
        state = {_strip_module(k): v for k, v in state.items()}
        if any(k.startswith("backbone.") for k in state):
            return state, ignored
        out = {}
        for key, value in state.items():
            head = next((p for p in _CLASSIFIERS if key.startswith(p)), None)
            out[("head." + key[len(head):]) if head else ("backbone." + key)] = value
        return out, ignored
    raise AssertionError(f"unknown format {fmt}")


# -- what a file holds ----------------------------------------------------------------------------------

@dataclass
class Inferred:
    arch: Optional[str]
    head: str
    hidden_dim: int
    dim: int

    def overrides(self) -> str:
        return (f"teacher.arch={self.arch} teacher.head={self.head} teacher.hidden_dim={self.hidden_dim} "
                f"teacher.dim={self.dim}")


_RESNETS = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
            ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
            ("bottleneck", (3, 8, 36, 3)): "resnet152"}
_VITS = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}


def infer_architecture(state: dict, fmt: str) -> Optional[str]:
    """The backbone an Encoder state dict was saved from, read off its key names and shapes."""
    if "backbone.conv1.weight" in state and "backbone.layer1.0.conv1.weight" in state:
        blocks = tuple(1 + max((int(m.group(1)) for k in state
                                if (m := re.match(rf"backbone\.layer{i}\.(\d+)\.", k))), default=-1)
                       for i in range(1, 5))
        kind = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
        widen = state["backbone.conv1.weight"].shape[0] // 64
        if kind == "bottleneck" and blocks == (3, 4, 6, 3) and (fmt == "swav" or widen > 1):
            return next((a for a, w in SWAV_WIDTHS.items() if w == widen), None)
        return _RESNETS.get((kind, blocks)) if widen == 1 else None
    if "backbone.patch_embed.proj.weight" in state:
        w = state["backbone.patch_embed.proj.weight"]
        name = _VITS.get(w.shape[0])
        return f"{name}_patch{w.shape[-1]}_224" if name else None
    if "backbone.features.0.weight" in state:
        width = state["backbone.features.0.weight"].shape[0]
        return next((a for a, ws in SMALL_CONVNETS.items() if ws[0] == width), None)
    return None


def infer_head(state: dict) -> tuple[str, int, int]:
    """(kind, hidden_dim, dim) of the head in an Encoder state dict."""
    h = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    if not h:
        return "none", 0, 0
    if "weight" in h:
        return "linear", 0, h["weight"].shape[0]
    hidden = h["0.weight"].shape[0] if "0.weight" in h else 0
    if "4.running_mean" in h:
        return "mocov3", hidden, h["4.running_mean"].shape[0]
    if "4.weight" in h:
        return "dino", hidden, h["4.weight"].shape[0]
    if "1.running_mean" in h and "3.weight" in h:
        return "mlp_bn", hidden, h["3.weight"].shape[0]
    if "2.weight" in h:
        return "mlp", hidden, h["2.weight"].shape[0]
    return "unknown", hidden, 0


def infer(state: dict, fmt: str) -> Inferred:
    kind, hidden, dim = infer_head(state)
    return Inferred(infer_architecture(state, fmt), kind, hidden, dim)


def _expected_shapes(arch: str, head: str, hidden_dim: int, dim: int) -> dict[str, torch.Size]:
    """The Encoder's state-dict table, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        encoder = Encoder(arch, dim, head=head, hidden_dim=hidden_dim, key="teacher.arch")
    return {k: v.shape for k, v in encoder.state_dict().items()}


def _mismatch(state: dict, expected: dict) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v)}" for k, v in expected.items()
                 if k in state and state[k].shape != v]
    return missing, unexpected, misshaped


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset(name: str, **overrides) -> TeacherConfig:
    """The conf/teacher/<name>.yaml preset as a TeacherConfig (with `overrides` applied)."""
    from omegaconf import OmegaConf

    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(preset_names())}"
        raise ConfigError(f"teacher={name!r} is not a preset in {PRESETS_DIR}; {hint}")
    merged = OmegaConf.merge(OmegaConf.structured(TeacherConfig), OmegaConf.load(path), overrides)
    return OmegaConf.to_object(merged)


def fitting_presets(state: dict, inferred: Inferred) -> list[str]:
    """conf/teacher presets whose architecture, head and dimensions take exactly the tensors of `state`."""
    fits = []
    for name in preset_names():
        cfg = preset(name)
        if inferred.arch is not None and cfg.arch != inferred.arch:
            continue
        try:
            expected = _expected_shapes(cfg.arch, cfg.head, cfg.hidden_dim, cfg.dim or inferred.dim or DEFAULT_DIM)
        except SeedClusterError:
            continue
        used = {k: v for k, v in state.items() if not (cfg.head == "none" and k.startswith("head."))}
        if not any(_mismatch(used, expected)):
            fits.append(name)
    return fits


# -- loading ---------------------------------------------------------------------------------------------

@dataclass
class TeacherFile:
    """A teacher file read and mapped onto the configured Encoder's keys, checked but not yet loaded."""

    path: Path
    format: str
    state: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def _describe_ignored(ignored: list[str]) -> str:
    """Ignored keys grouped by their first name, each group shown by its longest common dotted prefix."""
    groups: dict[str, list[list[str]]] = {}
    for key in ignored:
        groups.setdefault(key.split(".")[0], []).append(key.split("."))
    parts = []
    for members in groups.values():
        if len(members) == 1:
            parts.append(".".join(members[0]))
            continue
        common = []
        for names in zip(*members, strict=False):
            if len(set(names)) > 1:
                break
            common.append(names[0])
        parts.append(f"{'.'.join(common)}.* ({len(members)})")
    return ", ".join(parts)


def open_teacher_file(cfg: TeacherConfig, dim: int) -> TeacherFile:
    """Read cfg.checkpoint, detect its layout and check it fits the configured teacher; raise one line if not."""
    path = resolve_checkpoint_path(cfg.checkpoint)
    raw = read_checkpoint(path)
    fmt = detect_format(raw)
    if fmt is None:
        raise TeacherError(f"teacher.checkpoint={path} is not a state dict nor a checkpoint layout I know "
                           f"({', '.join(FORMATS)}); save one with torch.save(model.state_dict(), path)")
    if cfg.format not in ("auto", fmt):
        raise TeacherError(f"teacher.checkpoint={path} looks like {FORMATS[fmt]}, not teacher.format={cfg.format}; "
                           f"set teacher.format=auto or {fmt}, or pick the teacher preset for that file")
    state, ignored = extract_encoder_state(raw, fmt)
    if cfg.head == "none":  # the configured teacher embeds with its backbone only: the file's head is not used
        ignored += [k for k in state if k.startswith("head.")]
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = _expected_shapes(cfg.arch, cfg.head, cfg.hidden_dim, cfg.dim or dim)
    missing, unexpected, misshaped = _mismatch(state, expected)
    if missing or unexpected or misshaped:
        found = infer(state, fmt)
        hint = ""
        if cfg.head != "none" and found.dim and found.dim != (cfg.dim or dim):
            hint = f" (its head outputs {found.dim}-d embeddings but method.dim={dim})"
        fits = fitting_presets(state, found)
        if fits:
            advice = f"presets that fit: {', '.join(f'teacher={n}' for n in fits)}"
        elif found.arch is not None and found.head != "unknown" and not any(_mismatch(
                state, _expected_shapes(found.arch, found.head, found.hidden_dim, found.dim or dim))):
            advice = f"no preset fits; it fits {found.overrides()}"
        else:
            advice = "no preset fits; set teacher.arch/teacher.head/teacher.hidden_dim/teacher.dim to match the file"
        raise TeacherError(
            f"teacher.checkpoint={path} looks like {FORMATS[fmt]} but does not fit teacher.arch={cfg.arch} "
            f"head={cfg.head} hidden_dim={cfg.hidden_dim} dim={cfg.dim or dim}{hint}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, mis-shaped {misshaped[:3]}; {advice}")
    return TeacherFile(path, fmt, state, ignored)


def _state_fingerprint(state: dict[str, torch.Tensor], cfg: TeacherConfig, dim: int) -> str:
    digest = hashlib.sha256(json.dumps([cfg.arch, cfg.head, cfg.hidden_dim, dim]).encode())
    for key, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{digest.hexdigest()[:16]}"


def teacher_fingerprint(encoder: Encoder, cfg: TeacherConfig) -> str:
    """Hash of the loaded tensors (names, dtypes, shapes, values) and the head configuration, not of the file
    bytes: the same weights saved in another layout have the same fingerprint."""
    return _state_fingerprint(encoder.state_dict(), cfg, encoder.dim)


def _random_fingerprint(cfg: TeacherConfig, seed: int) -> str:
    return f"random:{cfg.arch}:{cfg.head}:{cfg.hidden_dim}:seed{seed}"


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher computes in fp32 whatever the file stores (fp16 releases included)."""
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}


def _output_dim(cfg: TeacherConfig, dim: Union[int, None]) -> int:
    if cfg.dim and dim and cfg.dim != dim:
        raise TeacherError(f"teacher.dim={cfg.dim} but method.dim={dim}: the teacher's embeddings fill the queue; "
                           f"set method.dim={cfg.dim}")
    return cfg.dim or dim or DEFAULT_DIM


def teacher_identity(cfg: TeacherConfig, dim: int, seed: int = 0) -> str:
    """The fingerprint `load_teacher(cfg, dim, seed)` would give, without building the network: what a run
    with the feature cache checks the cache against (reads the file, builds and runs nothing)."""
    out_dim = _output_dim(cfg, dim)
    if cfg.checkpoint is None:
        return _random_fingerprint(cfg, seed)
    return _state_fingerprint(_float32(open_teacher_file(cfg, out_dim).state), cfg, out_dim)


def load_teacher(cfg: Union[TeacherConfig, str], dim: Union[int, str, Path, None] = None,
                 seed: int = 0) -> FrozenTeacher:
    """The frozen teacher: `load_teacher(cfg: TeacherConfig, method_dim, seed)` (the training job) or
    `load_teacher(preset_name, checkpoint)` (e.g. `load_teacher("resnet50w2_swav", "swav_RN50w2.pth.tar")`).

    Without a checkpoint the teacher has random weights drawn from `seed` (smoke tests only), from a
    generator of their own: building the teacher or not (feature cache) leaves the caller's RNG alone.
    """
    if isinstance(cfg, str):
        cfg = preset(cfg, checkpoint=None if dim is None else str(dim))
        dim = cfg.dim or DEFAULT_DIM
    out_dim = _output_dim(cfg, dim)
    if cfg.checkpoint is None:
        logger.warning("teacher.checkpoint is not set: the teacher has RANDOM weights (fine for smoke tests only)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = Encoder(cfg.arch, out_dim, head=cfg.head, hidden_dim=cfg.hidden_dim, key="teacher.arch")
        return FrozenTeacher(encoder, fingerprint=_random_fingerprint(cfg, seed))

    file = open_teacher_file(cfg, out_dim)
    with torch.device("meta"):  # no random initialisation, no second copy: the file's tensors become the weights
        encoder = Encoder(cfg.arch, out_dim, head=cfg.head, hidden_dim=cfg.hidden_dim, key="teacher.arch")
    encoder.load_state_dict(_float32(file.state), strict=True, assign=True)
    for name, tensor in list(encoder.named_parameters()) + list(encoder.named_buffers()):
        assert not tensor.is_meta, f"{name} was not loaded from the teacher file"
    if file.ignored:
        logger.info("teacher %s: ignored %d entries of %s (%s): %s", cfg.arch, len(file.ignored), file.path,
                    file.format, _describe_ignored(file.ignored))
    logger.info("teacher %s head=%s (%s) loaded from %s", cfg.arch, cfg.head, file.format, file.path)
    return FrozenTeacher(encoder, fingerprint=teacher_fingerprint(encoder, cfg), format=file.format,
                         source=str(file.path))


def check_teacher(cfg: TeacherConfig, dim: int) -> None:
    """What load_teacher checks, without loading (before submission): the file exists, is readable, and fits."""
    if cfg.dim and dim and cfg.dim != dim:
        raise TeacherError(f"teacher.dim={cfg.dim} but method.dim={dim}; set method.dim={cfg.dim}")
    if cfg.checkpoint is not None:
        open_teacher_file(cfg, cfg.dim or dim)


# -- inspect CLI -----------------------------------------------------------------------------------------

def inspect_file(path: str) -> dict:
    """What `inspect` prints: format, architecture, head, embedding dim, parameter count, presets that fit."""
    file = resolve_checkpoint_path(path)
    raw = read_checkpoint(file)
    fmt = detect_format(raw)
    if fmt is None:
        raise TeacherError(f"{file} is not a state dict nor a checkpoint layout I know ({', '.join(FORMATS)})")
    state, ignored = extract_encoder_state(raw, fmt)
    found = infer(state, fmt)
    verified = False
    if found.arch is not None and found.head != "unknown":
        try:
            verified = not any(_mismatch(state, _expected_shapes(found.arch, found.head, found.hidden_dim,
                                                                 found.dim or DEFAULT_DIM)))
        except SeedClusterError:
            verified = False
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(v.numel() for k, v in state.items() if not k.endswith(buffers))
    return {"file": str(file), "format": fmt, "format_description": FORMATS[fmt], "arch": found.arch,
            "head": found.head, "hidden_dim": found.hidden_dim,
            "dim": found.dim if found.head != "none" else None, "parameters": params,
            "verified": verified, "ignored": _describe_ignored(ignored) if ignored else "",
            "presets": fitting_presets(state, found)}


def _print_inspection(info: dict) -> None:
    arch = info["arch"] or "unknown"
    arch += "" if info["verified"] else " (not verified: some tensors do not fit a known architecture)"
    head = info["head"] + (f" (hidden {info['hidden_dim']})" if info["hidden_dim"] else "")
    rows = [("file", info["file"]), ("format", f"{info['format']}: {info['format_description']}"),
            ("architecture", arch), ("head", head),
            ("embedding dim", info["dim"] if info["dim"] else "backbone features (no head)"),
            ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M, encoder only)"),
            ("ignored", info["ignored"] or "nothing"),
            ("presets", ", ".join(f"teacher={n}" for n in info["presets"]) or "none fits")]
    for name, value in rows:
        print(f"{name + ':':15}{value}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seed_cluster.teachers",
                                     description="Inspect teacher checkpoint files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a file's format, architecture, head, embedding dim, parameters")
    p.add_argument("file")
    args = parser.parse_args(argv)
    try:
        _print_inspection(inspect_file(args.file))
    except SeedClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# Kept for callers that identify a file by its bytes (the fingerprint itself hashes loaded tensors).
def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:16]}"


__all__ = ["FORMATS", "FrozenTeacher", "load_teacher", "check_teacher", "open_teacher_file", "inspect_file",
           "detect_format", "extract_encoder_state", "preset", "resolve_checkpoint_path"]

if __name__ == "__main__":
    sys.exit(main())

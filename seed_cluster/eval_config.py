"""Typed configuration of the evaluation jobs (offline kNN, linear evaluation) and of online kNN.

Same rules as `seed_cluster.config`: dataclasses are the schema, `conf/eval.yaml` the preset,
the command line the overrides; the root is registered in Hydra's ConfigStore as
`eval_base_config`, so an unknown key or a wrongly typed value fails before anything runs.
`__post_init__` only validates. Defaults follow SEED's linear-evaluation protocol (DESIGN.md §3)
and the kNN protocol of InstDisc/DINO (k = 20, T = 0.07).

`OnlineKNNConfig` (the training config's `knn:` section) lives in `online_knn_config.py`, which imports
nothing from this package, so that `seed_cluster.config` can use it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import MISSING

from .config import ClusterConfig, DataConfig
from .errors import ConfigError
from .online_knn_config import OnlineKNNConfig  # noqa: F401 - re-exported


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class SourceConfig:
    """The network to evaluate."""

    checkpoint: str = MISSING
    """A run directory, a seed-cluster checkpoint, an exported backbone (`python -m seed_cluster.export`),
    a SEED release student file (`module.student.*`) or a plain timm state dict."""
    arch: Optional[str] = None
    """Backbone architecture (timm name or convnet_s/m/l); needed only when the file does not say it
    (a SEED release file, a plain state dict, an export without its JSON)."""


@dataclass
class KNNConfig:
    k: list[int] = field(default_factory=lambda: [20, 1])
    """Neighbour counts to score (one neighbour search serves them all)."""
    temperature: float = 0.07
    """T of the vote weight exp(cos_sim / T)."""
    max_chunk_mb: float = 256.0
    """Memory budget of one [queries, bank] similarity block; the query chunk is sized from it."""
    batch_size: int = 256
    """Images per forward pass of the feature extraction (per rank)."""
    batches_per_chunk: int = 50
    """Extracted features are written every `batches_per_chunk` batches, one file per chunk: the unit a
    requeued job resumes from (at most one chunk per rank is recomputed after a preemption)."""
    keep_features: bool = False
    """Keep the extracted feature chunks after the kNN has run (default: delete them once results are written)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.k or min(self.k) < 1:
            problems.append(f"knn.k={self.k} must be a non-empty list of values >= 1")
        if not self.temperature > 0:
            problems.append(f"knn.temperature={self.temperature} must be > 0")
        if not self.max_chunk_mb > 0:
            problems.append(f"knn.max_chunk_mb={self.max_chunk_mb} must be > 0")
        if self.batch_size < 1:
            problems.append(f"knn.batch_size={self.batch_size} must be >= 1")
        if self.batches_per_chunk < 1:
            problems.append(f"knn.batches_per_chunk={self.batches_per_chunk} must be >= 1")
        _raise_if(problems)


@dataclass
class LinearConfig:
    """Linear evaluation (DESIGN.md §3): frozen backbone in eval mode, one fresh linear layer trained by SGD."""

    epochs: int = 100
    base_lr: float = 30.0
    """Learning rate per 256 images: lr = base_lr x global batch / 256."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [60, 80])
    """Epochs at which the learning rate is multiplied by `gamma`."""
    gamma: float = 0.1
    init_std: float = 0.01
    """The linear layer's weights are drawn from N(0, init_std^2); its bias starts at 0."""
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range of the training views (plus a horizontal flip, nothing else)."""
    crop_fraction: float = 0.875
    """Validation view: resize to data.resolution / crop_fraction, centre crop data.resolution (256 -> 224)."""
    num_classes: int = 0
    """0: read it from the training set's manifest."""
    max_steps_per_epoch: int = 0
    """Cap on the steps of one epoch (0: the whole training set); for smoke tests."""
    feature_norm: bool = False
    """Put a BatchNorm without affine parameters in front of the linear layer (MAE's linear probe). The
    classifier stays linear in the frozen features (at evaluation the normalisation is a fixed affine map),
    but SGD no longer depends on their scale. Off in SEED's protocol; backbones whose feature dimensions
    differ widely in scale (EfficientNet / MobileNetV3 students trained briefly) need it to learn at all."""

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"linear.epochs={self.epochs} must be >= 1")
        if not self.base_lr > 0:
            problems.append(f"linear.base_lr={self.base_lr} must be > 0")
        if self.weight_decay < 0:
            problems.append(f"linear.weight_decay={self.weight_decay} must be >= 0")
        if sorted(self.milestones) != list(self.milestones) or any(m < 1 for m in self.milestones):
            problems.append(f"linear.milestones={self.milestones} must be increasing epochs >= 1")
        if not 0 < self.gamma <= 1:
            problems.append(f"linear.gamma={self.gamma} must be in (0, 1]")
        if not self.init_std > 0:
            problems.append(f"linear.init_std={self.init_std} must be > 0")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            problems.append(f"linear.crop_scale={self.crop_scale} must be [min, max] with 0 < min <= max <= 1")
        if not 0 < self.crop_fraction <= 1:
            problems.append(f"linear.crop_fraction={self.crop_fraction} must be in (0, 1]")
        if self.num_classes < 0 or self.max_steps_per_epoch < 0:
            problems.append("linear.num_classes and linear.max_steps_per_epoch must be >= 0 (0 = automatic)")
        _raise_if(problems)


@dataclass
class EvalCheckpointConfig:
    keep: int = 2
    """Linear evaluation keeps this many epoch checkpoints (>= 2: a corrupt newest one has a fallback)."""

    def __post_init__(self) -> None:
        _raise_if([] if self.keep >= 2 else [f"checkpoint.keep={self.keep} must be >= 2"])


@dataclass
class EvalConfig:
    """The root of the evaluation config (`conf/eval.yaml`), shared by launch/eval.py and launch/linear.py."""

    name: str = "eval"
    """Job name (SLURM) and, for sources outside a run directory, the prefix of the evaluation directory."""
    output_dir: str = "runs"
    """Where evaluations of files outside a run directory go (<output_dir>/<name>-<hash>)."""
    run_dir: Optional[str] = None
    """Explicit evaluation directory; default <source run>/eval/<kind>-<hash> for a run's checkpoint."""
    seed: int = 0
    nodes: int = 1
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    source: SourceConfig = field(default_factory=SourceConfig)
    data: Optional[DataConfig] = None
    """Labelled train and val .beton files; null: the source run's data section."""
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    checkpoint: EvalCheckpointConfig = field(default_factory=EvalCheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    progress_bar: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.nodes < 1:
            problems.append(f"nodes={self.nodes} must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device={self.device!r} must be auto, cpu or cuda")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append(f"name={self.name!r} may only hold letters, digits, - and _")
        _raise_if(problems)

    @property
    def world_size(self) -> int:
        return self.nodes * self.cluster.tasks_per_node


def eval_hash(cfg: EvalConfig, kind: str) -> str:
    """Eight hex digits identifying what an evaluation computes (placement keys left out)."""
    content = {"kind": kind, "seed": cfg.seed, "source": asdict(cfg.source),
               "data": {k: v for k, v in asdict(cfg.data).items() if k not in ("num_workers", "os_cache")}
               if cfg.data else None,
               kind: {k: v for k, v in asdict(cfg.knn if kind == "knn" else cfg.linear).items()
                      if k != "keep_features"}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval_base_config", node=EvalConfig)


KEYS_HINT = "`python launch/eval.py --cfg` (or launch/linear.py --cfg) prints every key"
"""How to see the valid keys of the evaluation config (not launch/slurm.py: that is the training config)."""


def load_eval_config(overrides: Sequence[str]) -> EvalConfig:
    """Compose conf/eval.yaml with `overrides` into a validated EvalConfig (ConfigError on any problem)."""
    from .launcher import compose_validated

    register()
    return _absolute_paths(compose_validated("eval", EvalConfig, overrides, KEYS_HINT))


def _absolute_paths(cfg: EvalConfig) -> EvalConfig:
    def absolute(p: Optional[str]) -> Optional[str]:
        return str(Path(p).expanduser().resolve()) if p else p

    data = cfg.data and dataclasses.replace(cfg.data, train=absolute(cfg.data.train), val=absolute(cfg.data.val))
    source = dataclasses.replace(cfg.source, checkpoint=absolute(cfg.source.checkpoint))
    return dataclasses.replace(cfg, source=source, data=data, output_dir=absolute(cfg.output_dir),
                               run_dir=absolute(cfg.run_dir))

"""Typed configuration: the schema Hydra composes into, its validation, and derived values.

Dataclasses are the schema (types, defaults, one docstring line per field);
`conf/*.yaml` holds presets; the command line holds overrides. The root schema
is registered in Hydra's ConfigStore as `base_config`, so an unknown key or a
value of the wrong type fails at composition, before anything runs.
`__post_init__` only validates (OmegaConf may run it more than once).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from .errors import ConfigError
from .online_knn_config import OnlineKNNConfig
from .recipes import IMAGENET_MEAN, IMAGENET_STD, RECIPES


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class StudentConfig:
    arch: str = "resnet18"
    """timm model name (e.g. mobilenetv3_large_100) or a small convnet (convnet_s, convnet_m, convnet_l)."""


@dataclass
class TeacherConfig:
    """A frozen teacher: its architecture, projection head and weights. conf/teacher/ holds one preset per
    teacher of the SEED release (and generic entries); `python -m seed_cluster.teachers inspect FILE` says
    which one a file fits."""

    arch: str = "resnet50"
    """Backbone: timm model name, SwAV's swav_resnet50 / swav_resnet50w2 / w4 / w5, or a small convnet."""
    head: str = "mlp"
    """Projection head: mlp (Linear-ReLU-Linear), mlp_bn (Linear-BN-ReLU-Linear), linear, mocov3, dino, none
    (see seed_cluster.models.build_head)."""
    hidden_dim: int = 0
    """Hidden width of the head; 0 means the backbone's feature width."""
    dim: int = 0
    """Embedding dimension the head outputs; 0 means method.dim. Must equal method.dim when set."""
    format: str = "auto"
    """Checkpoint layout the file must have: auto (detected from the contents) or one of
    seed_cluster.teachers.FORMATS (mocov1, mocov2, swav, simclr, dino, mocov3, plain, seed, seed-cluster)."""
    top1: Optional[float] = None
    """Published ImageNet linear-evaluation top-1 of this teacher (%, informational)."""
    checkpoint: Optional[str] = None
    """Weights: a released file in any supported layout, a checkpoint this project wrote, or a run directory.
    None = random weights (smoke tests only)."""
    cache: str = "off"
    """Precomputed teacher features (mode=precompute writes them): off (run the teacher), on (use the cache
    that matches this run; refuse to start without one), auto (use it when a complete one exists)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.cache in ("off", "on", "auto"), f"teacher.cache={self.cache!r} must be off, on or auto")
        _check(problems, self.head in HEAD_KINDS,
               f"teacher.head={self.head!r} is not a head kind; use one of {', '.join(HEAD_KINDS)}")
        _check(problems, self.hidden_dim >= 0, f"teacher.hidden_dim={self.hidden_dim} must be >= 0")
        _check(problems, self.dim >= 0, f"teacher.dim={self.dim} must be >= 0 (0 = method.dim)")
        _check(problems, self.format in TEACHER_FORMATS,
               f"teacher.format={self.format!r} is not a checkpoint format; use one of {', '.join(TEACHER_FORMATS)}")
        _raise_if(problems)


HEAD_KINDS = ("mlp", "mlp_bn", "linear", "mocov3", "dino", "none")
TEACHER_FORMATS = ("auto", "mocov1", "mocov2", "swav", "simclr", "dino", "mocov3", "plain", "seed", "seed-cluster")
METHODS = ("seed", "seed_small_patch", "mocov2")


@dataclass
class MethodConfig:
    name: str = "seed"
    """seed: distil a frozen teacher (Fang et al. 2021); seed_small_patch: SEED with 1 global + small crops
    per image and a second queue for the small crops; mocov2: the paper's self-supervised baseline."""
    dim: int = 128
    """Embedding dimension of the heads and the queue."""
    queue_size: int = 65536
    """K, the number of teacher (or key) embeddings kept in the queue."""
    tau_s: float = 0.2
    """SEED student temperature."""
    tau_t: float = 1e-4
    """SEED teacher temperature (1e-4: the target is nearly one-hot on the positive)."""
    tau: float = 0.2
    """MoCo-v2 temperature."""
    momentum: float = 0.999
    """MoCo-v2 key-encoder momentum."""
    bn_splits: int = 8
    """MoCo-v2: the key encoder sees the shuffled batch in this many BN groups (shuffle-BN within a rank)."""
    global_recipe: str = "swav_global"
    """seed_small_patch: augmentation recipe of the global view (its side is data.resolution)."""
    small_recipe: str = "swav_small"
    """seed_small_patch: augmentation recipe of the small crops."""
    num_small_crops: int = 6
    """seed_small_patch: small crops per image (the paper: 6)."""
    small_crop_size: int = 0
    """seed_small_patch: side of the small crops; 0 scales the paper's 96 px at 224 to data.resolution
    (round(data.resolution x 96 / 224): 96 at 224, 14 at 32)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.name in METHODS,
               f"method.name={self.name!r} is not a method; use one of {', '.join(METHODS)}")
        _check(problems, self.dim > 0, f"method.dim={self.dim} must be positive")
        _check(problems, self.queue_size > 0, f"method.queue_size={self.queue_size} must be positive")
        for key in ("tau_s", "tau_t", "tau"):
            value = getattr(self, key)
            _check(problems, value > 0, f"method.{key}={value} must be > 0")
        _check(problems, 0.0 <= self.momentum < 1.0, f"method.momentum={self.momentum} must be in [0, 1)")
        _check(problems, self.bn_splits >= 1, f"method.bn_splits={self.bn_splits} must be >= 1")
        _check(problems, self.num_small_crops >= 1, f"method.num_small_crops={self.num_small_crops} must be >= 1")
        _check(problems, self.small_crop_size >= 0,
               f"method.small_crop_size={self.small_crop_size} must be >= 0 (0 = scaled from data.resolution)")
        if self.name == "seed_small_patch":
            for key in ("global_recipe", "small_recipe"):
                value = getattr(self, key)
                _check(problems, value in RECIPES,
                       f"method.{key}={value!r} is not a recipe; use one of {', '.join(sorted(RECIPES))}")
        _raise_if(problems)


@dataclass
class DataConfig:
    name: str = "imagenet"
    """A label for logs and run names."""
    train: str = MISSING
    """Training .beton (build one with `python -m ffcv_build`)."""
    val: Optional[str] = None
    """Labelled held-out .beton for evaluation (optional)."""
    recipe: str = "mocov2"
    """Augmentation recipe (seed_cluster.recipes.RECIPES)."""
    resolution: int = 224
    """Side of the augmented views fed to the networks."""
    batch_size_per_rank: int = 256
    """Images per process (per GPU) and step; the global batch is this x world size. Training always drops
    the incomplete tail: each epoch's permutation is cut to a multiple of the world size (equal shards) and
    each rank's shard to a multiple of this batch size (drop_last; every step has the same batch shape, so
    the queue and BN see full batches). Evaluation never drops: every sample is scored once."""
    num_workers: int = 8
    """FFCV decoding threads per process (also torch's thread count on CPU)."""
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    os_cache: bool = True
    """Memory-map the .beton through the OS page cache (good when the dataset fits in RAM)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.resolution > 0, f"data.resolution={self.resolution} must be positive")
        _check(problems, self.recipe in RECIPES,
               f"data.recipe={self.recipe!r} is not a recipe; use one of {', '.join(sorted(RECIPES))}")
        _check(problems, self.batch_size_per_rank > 0,
               f"data.batch_size_per_rank={self.batch_size_per_rank} must be positive")
        _check(problems, self.num_workers > 0, f"data.num_workers={self.num_workers} must be positive")
        _check(problems, len(self.mean) == 3 and len(self.std) == 3,
               "data.mean and data.std need 3 values each (RGB)")
        _raise_if(problems)


@dataclass
class OptimConfig:
    epochs: int = 200
    """Length of the schedule in epochs."""
    max_steps: Optional[int] = None
    """If set, the schedule (warm-up + cosine) spans exactly this many steps instead of `epochs`."""
    base_lr: float = 0.03
    """Learning rate per 256 images; the actual lr is base_lr x global_batch / 256."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    """Linear warm-up length (epochs); then cosine decay to 0."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables clipping."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), fp32, or bf16 (autocast, also on CPU)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.epochs > 0, f"optim.epochs={self.epochs} must be positive")
        _check(problems, self.max_steps is None or self.max_steps > 0,
               f"optim.max_steps={self.max_steps} must be positive or null")
        _check(problems, self.base_lr > 0, f"optim.base_lr={self.base_lr} must be positive")
        _check(problems, self.warmup_epochs >= 0, f"optim.warmup_epochs={self.warmup_epochs} must be >= 0")
        _check(problems, self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 = off)")
        _check(problems, self.precision in ("auto", "fp32", "bf16"),
               f"optim.precision={self.precision!r} must be one of auto, fp32, bf16")
        _raise_if(problems)


TEACHER_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class PerfConfig:
    """How fast the step runs, not what it computes (left out of the run hash; seed_cluster.step)."""

    channels_last: bool = True
    """Student, teacher and input images in channels-last (NHWC) layout, which cuDNN and oneDNN convolutions
    prefer (depthwise convolutions of MobileNet/EfficientNet most of all)."""
    teacher_precision: str = "auto"
    """The frozen teacher's forward: auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16. Its embedding is
    L2-normalised and scored against the queue in fp32 either way."""
    compile: bool = False
    """torch.compile the student and the teacher (on CPU this needs a C++ compiler, e.g. g++)."""
    ddp_bucket_mb: float = 25.0
    """DDP gradient bucket size (MB); smaller buckets start the all-reduce of a small student earlier."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.teacher_precision in TEACHER_PRECISIONS,
               f"perf.teacher_precision={self.teacher_precision!r} must be one of {', '.join(TEACHER_PRECISIONS)}")
        _check(problems, self.ddp_bucket_mb > 0, f"perf.ddp_bucket_mb={self.ddp_bucket_mb} must be > 0")
        _raise_if(problems)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    """Save every this many steps (and always at the end)."""
    keep: int = 3
    """Keep the newest this many checkpoints (at least 2, so a corrupt newest one has a fallback)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in the run directory; never: refuse if one exists."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.every_steps > 0, f"checkpoint.every_steps={self.every_steps} must be positive")
        _check(problems, self.keep >= 2, f"checkpoint.keep={self.keep} must be >= 2")
        _check(problems, self.resume in ("auto", "never"),
               f"checkpoint.resume={self.resume!r} must be auto or never")
        _raise_if(problems)


CACHE_DTYPES = ("fp16", "fp32")


@dataclass
class CacheConfig:
    """The per-teacher feature cache (seed_cluster.cache): K replayable views per image and their teacher
    embeddings, so that training can skip the teacher."""

    views: int = 0
    """K, views per image. 0: a fresh view every epoch (no cache possible). K > 0: image i at epoch e shows
    view (e + offset_i) mod K, so views repeat every K epochs, whether the teacher runs live or is cached."""
    dtype: str = "fp16"
    """Storage of the embeddings: fp16 (half the disk) or fp32. Losses vs the live teacher (relative, measured):
    fp16 ~3e-6, fp32 ~3e-7 at tau_t=0.05; ~1e-4 for both at tau_t=1e-4, where 1/tau_t amplifies rounding."""
    path: Optional[str] = None
    """The cache directory; default <output_dir>/cache/<teacher>-<data>-<hash of its fingerprint>."""
    chunk_size: int = 4096
    """Samples per chunk file: the unit of resume and of checksums (rounded up to a multiple of the batch)."""
    verify: bool = True
    """Check every chunk's SHA-256 when a run opens the cache (reads it once; ~1 s per GB)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.views >= 0, f"cache.views={self.views} must be >= 0 (0 = no replayed views)")
        _check(problems, self.dtype in CACHE_DTYPES, f"cache.dtype={self.dtype!r} must be one of {', '.join(CACHE_DTYPES)}")
        _check(problems, self.chunk_size > 0, f"cache.chunk_size={self.chunk_size} must be positive")
        _raise_if(problems)


@dataclass
class LoggingConfig:
    every_steps: int = 20
    """Write TensorBoard scalars every this many steps."""
    progress_bar: bool = True
    """A tqdm bar on rank 0 (loss, images/s)."""

    def __post_init__(self) -> None:
        _raise_if([] if self.every_steps > 0 else [f"logging.every_steps={self.every_steps} must be positive"])


@dataclass
class ClusterConfig:
    """Where the job runs. Key names follow submitit / hydra-submitit-launcher."""

    backend: str = "local"
    """local: processes on this machine; slurm: submit through sbatch."""
    tasks_per_node: int = 1
    """Processes per node: one per GPU (or per CPU process in CPU mode)."""
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 0
    """Memory per node in GB; 0 leaves it to the cluster's default."""
    timeout_min: int = 60 * 24
    partition: Optional[str] = None
    qos: Optional[str] = None
    account: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 120
    """SLURM sends USR2 this many seconds before the time limit."""
    max_num_timeout: int = 20
    """Requeue at most this many times on time-outs."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job starts (e.g. module load)."""
    wait: bool = False
    """Block until the job ends and stream the rank-0 log."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.backend in ("local", "slurm"),
               f"cluster.backend={self.backend!r} must be local or slurm")
        _check(problems, self.tasks_per_node >= 1, f"cluster.tasks_per_node={self.tasks_per_node} must be >= 1")
        _check(problems, self.cpus_per_task >= 1, f"cluster.cpus_per_task={self.cpus_per_task} must be >= 1")
        _raise_if(problems)


@dataclass
class TrainConfig:
    """The root of the configuration tree."""

    name: str = "seed"
    """Experiment name: the run directory is <output_dir>/<name>-<config hash>."""
    mode: str = "train"
    """train, or precompute: write the teacher feature cache (cache.views views per image) and stop."""
    output_dir: str = "runs"
    run_dir: Optional[str] = None
    """Explicit run directory (overrides the name + hash rule)."""
    seed: int = 0
    """Seeds initialisation, data order and every augmentation."""
    nodes: int = 1
    """Number of nodes (top level so that `nodes=4` works as written in the brief)."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    knn: OnlineKNNConfig = field(default_factory=OnlineKNNConfig)
    """Online kNN of the student's backbone during training (off unless knn.every_steps > 0)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    """Speed of the training step (memory layout, teacher precision, compilation, DDP buckets)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check(problems, self.mode in ("train", "precompute"), f"mode={self.mode!r} must be train or precompute")
        uses_cache = self.mode == "precompute" or self.teacher.cache != "off"
        _check(problems, not (uses_cache and self.method.name == "mocov2"),
               "method=mocov2 has no teacher to cache; use method=seed or seed_small_patch, or teacher.cache=off")
        _check(problems, not (uses_cache and self.cache.views == 0),
               f"{'mode=precompute' if self.mode == 'precompute' else f'teacher.cache={self.teacher.cache}'} needs "
               "cache.views=K > 0, the number of views per image stored in the cache (e.g. cache.views=10)")
        _check(problems, self.nodes >= 1, f"nodes={self.nodes} must be >= 1")
        _check(problems, self.device in ("auto", "cpu", "cuda"), f"device={self.device!r} must be auto, cpu or cuda")
        _check(problems, self.name.replace("-", "").replace("_", "").isalnum(),
               f"name={self.name!r} may only hold letters, digits, - and _")
        _raise_if(problems)

    @property
    def world_size(self) -> int:
        return self.nodes * self.cluster.tasks_per_node


# Keys that say where and how the job runs but not what it computes: they are left
# out of the run hash so that resubmitting on another cluster setup resumes the run.
# `perf` is among them: it changes the speed of the step, and its numbers only within rounding.
_PLACEMENT_KEYS = ("cluster", "nodes", "logging", "checkpoint", "output_dir", "run_dir", "device", "knn", "perf")
_PLACEMENT_SECTION_KEYS = (("data", "num_workers"), ("data", "os_cache"), ("cache", "path"), ("cache", "chunk_size"),
                           ("cache", "verify"))


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_hash(cfg: TrainConfig) -> str:
    """Eight hex digits identifying what a run computes (placement keys excluded)."""
    content = {k: v for k, v in asdict(cfg).items() if k not in _PLACEMENT_KEYS}
    for section, key in _PLACEMENT_SECTION_KEYS:
        content[section].pop(key)
    # Keys added after runs existed enter the hash only when they change what is computed, so that
    # resubmitting an older run's command still finds (and resumes) its directory.
    if content["mode"] == "train":
        del content["mode"]
    if content["teacher"]["cache"] == "off":
        del content["teacher"]["cache"]
    if content["cache"]["views"] == 0:
        del content["cache"]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(cfg: TrainConfig) -> Path:
    """Deterministic, so that submitting the same command again finds (and resumes) the same run."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.output_dir) / f"{cfg.name}-{config_hash(cfg)}"


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the dataset; logged at start-up, never written back."""

    world_size: int
    global_batch: int
    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def derive(cfg: TrainConfig, num_samples: int, world_size: int) -> Derived:
    global_batch = cfg.data.batch_size_per_rank * world_size
    steps_per_epoch = (num_samples // world_size) // cfg.data.batch_size_per_rank
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size_per_rank={cfg.data.batch_size_per_rank} x world size {world_size} exceeds the "
            f"{num_samples} training images of {cfg.data.train}; lower the batch size")
    total = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    return Derived(
        world_size=world_size,
        global_batch=global_batch,
        lr=cfg.optim.base_lr * global_batch / 256,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, math.ceil(cfg.optim.warmup_epochs * steps_per_epoch)),
    )


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=TrainConfig)

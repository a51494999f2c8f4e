"""The per-teacher feature cache: K replayable views per image and the teacher's embedding of each.

SEED's student must see the very view the teacher embedded (DESIGN.md §6), so the cache
stores views, not images. For sample i and view key k < K (`cache.views`) it holds the
teacher's L2-normalised embedding of every view the method makes of an image (1 for SEED,
global + small crops for seed_small_patch), each view being `augment`'s view with epoch key
k. A run with the cache shows sample i, at epoch e, view key `view_keys.view_epochs(...)`
(every key once per K epochs): the student's input is regenerated bit for bit from that
key, and the teacher's embedding is read instead of computed.

On disk, one directory per cache:

    manifest.json       the fingerprint (what it was computed from), shapes, dtype, a checksum per chunk
    chunk-000000.npy    [n, K, V, D] embeddings of samples [0, n) (n = chunk_size; the last chunk shorter)

While `mode=precompute` runs, the directory is `<name>.partial/`. A chunk appears there under
its final name only complete (temporary file, fsync, rename), its checksum beside it in
`chunk-000000.sha256`; resuming skips every chunk that has both. The directory takes its final
name only when all chunks are there and the manifest is written, so a cache under its final
name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write, remove_temporaries
from .config import TrainConfig
from .data import ViewSpec, check_dataset
from .errors import SeedClusterError

logger = logging.getLogger(__name__)

FORMAT = "seed-cluster-teacher-cache"
VIEW_FORMAT = 2
"""Bump when the pixels a view key yields change (augment, decoding): older caches then no longer match.
2: crops cut from the whole image by the FFCV decoder (ffcv_ops), no longer from a decoded centred square."""
DTYPES = {"fp16": np.float16, "fp32": np.float32}
FIELD_HINTS = {
    "teacher": "teacher.* (weights, arch, head)", "dataset": "data.train", "recipe": "data.recipe / method crops",
    "resolution": "data.resolution",
    "normalisation": "data.mean / data.std", "seed": "seed", "views": "cache.views", "dtype": "cache.dtype",
    "dim": "method.dim", "view_format": "the project version that wrote it",
}


class CacheError(SeedClusterError):
    """A feature cache is missing, incomplete, corrupt or does not match the run."""


# -- what a cache is computed from --------------------------------------------------------------------------

def fingerprint(cfg: TrainConfig, specs: Sequence[ViewSpec], teacher: str) -> dict:
    """Everything the cached embeddings depend on. `teacher`: the teacher's weight fingerprint
    (`teachers.teacher_identity`); the dataset's comes from its manifest."""
    manifest = check_dataset(cfg.data.train, "data.train")
    return json.loads(json.dumps({  # as it reads back from the manifest (tuples become lists)
        "teacher": teacher,
        "dataset": {"fingerprint": manifest.get("fingerprint"), "num_samples": int(manifest["num_samples"])},
        "recipe": [{"size": s.size, **asdict(s.get_recipe())} for s in specs],
        "resolution": cfg.data.resolution,
        "normalisation": {"mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "seed": cfg.seed,
        "views": cfg.cache.views,
        "dtype": cfg.cache.dtype,
        "dim": cfg.method.dim,
        "view_format": VIEW_FORMAT,
    }))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def default_path(cfg: TrainConfig, expected: dict) -> Path:
    """cache.path, or <output_dir>/cache/<teacher arch>-<data name>-<hash of the fingerprint>."""
    if cfg.cache.path:
        return Path(cfg.cache.path)
    return Path(cfg.output_dir) / "cache" / f"{cfg.teacher.arch}-{cfg.data.name}-{_digest(expected)[:10]}"


def differences(found: dict, expected: dict) -> list[str]:
    """The fingerprint fields in which a cache differs from what the run needs, with their config keys and
    the innermost differing values (e.g. `recipe[0].scale`)."""
    keys = sorted(set(found) | set(expected))
    return [f"{k} (set by {FIELD_HINTS.get(k, k)}: {_first_difference(found.get(k), expected.get(k), k)})"
            for k in keys if found.get(k) != expected.get(k)]


def _first_difference(found, expected, where: str) -> str:
    if isinstance(found, dict) and isinstance(expected, dict):
        for key in sorted(set(found) | set(expected)):
            if found.get(key) != expected.get(key):
                return _first_difference(found.get(key), expected.get(key), f"{where}.{key}")
    if isinstance(found, list) and isinstance(expected, list) and len(found) == len(expected):
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where} is {_short(found)} in the cache, {_short(expected)} for this run"


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def cache_bytes(num_samples: int, views: int, crops: int, dim: int, dtype: str) -> int:
    return num_samples * views * crops * dim * np.dtype(DTYPES[dtype]).itemsize


def chunk_ranges(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, num_samples)) for start in range(0, num_samples, chunk_size)]


def _chunk_name(i: int) -> str:
    return f"chunk-{i:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# -- reading (training) ----------------------------------------------------------------------------------

class FeatureCache:
    """A complete cache, memory-mapped: `targets(indices, epochs)` is the teacher's embedding of each view."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.chunk_size = manifest["chunk_size"]
        self.teacher = manifest["fingerprint"]["teacher"]
        self.chunks = [np.load(path / f"{_chunk_name(i)}.npy", mmap_mode="r") for i in range(len(manifest["chunks"]))]

    @classmethod
    def open(cls, path: Path, expected: dict, verify: bool = True) -> "FeatureCache":
        """The cache at `path`, checked against the run's fingerprint (and, with `verify`, every checksum);
        CacheError naming the differing fields, or the corrupt chunk's sample range."""
        manifest = read_manifest(path)
        if manifest is None:
            partial = _partial(path)
            state = (f"only a partial precompute exists ({_count_done(partial)} of its chunks done); resubmit "
                     "mode=precompute to finish it") if partial.is_dir() else "it does not exist"
            raise CacheError(f"no complete teacher feature cache at {path}: {state}")
        diff = differences(manifest["fingerprint"], expected)
        if diff:
            raise CacheError(f"the teacher feature cache at {path} was computed for another run: it differs in "
                             f"{'; '.join(diff)}; precompute a cache for this run (mode=precompute) or point "
                             "cache.path at a matching one")
        if verify:
            for i, chunk in enumerate(manifest["chunks"]):
                file = path / f"{_chunk_name(i)}.npy"
                if not file.is_file() or _sha256(file) != chunk["sha256"]:
                    raise CacheError(f"teacher feature cache {path}: chunk {i} (samples {chunk['start']} to "
                                     f"{chunk['end'] - 1}, {file.name}) is missing or corrupt (checksum mismatch); "
                                     "delete that file and resubmit mode=precompute to recompute it")
        cache = cls(path, manifest)
        logger.info("teacher feature cache %s: %d samples x %d views, %s%s", path, manifest["num_samples"],
                    manifest["views"], manifest["dtype"], ", checksums verified" if verify else "")
        return cache

    def targets(self, indices: np.ndarray, epochs: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """[V] tensors [B, D] float32 on `device`: the cached embedding of view v of sample indices[i] under view
        key epochs[i], renormalised in fp32 (fp16 storage leaves norms ~1e-3 off 1, which tau_t = 1e-4 would
        magnify)."""
        indices = np.asarray(indices, dtype=np.int64)
        epochs = np.broadcast_to(np.asarray(epochs, dtype=np.int64), indices.shape)
        rows = np.empty((len(indices), *self.chunks[0].shape[2:]), dtype=np.float32)
        chunk_of = indices // self.chunk_size
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            rows[sel] = self.chunks[c][indices[sel] - c * self.chunk_size, epochs[sel]]
        embeddings = F.normalize(torch.from_numpy(rows).to(device, non_blocking=True), dim=-1)
        return list(embeddings.unbind(dim=1))


def read_manifest(path: Path) -> Optional[dict]:
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}/manifest.json is unreadable ({e}); delete {path} and precompute again") from e
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a seed-cluster teacher feature cache (no {FORMAT} manifest)")
    return manifest


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _count_done(partial: Path) -> int:
    return len(list(partial.glob("chunk-*.sha256")))


def open_for_training(cfg: TrainConfig, specs: Sequence[ViewSpec]) -> Optional[FeatureCache]:
    """The cache a run trains from: None for teacher.cache=off, or auto without a complete cache."""
    if cfg.teacher.cache == "off":
        return None
    from .teachers import teacher_identity

    expected = fingerprint(cfg, specs, teacher_identity(cfg.teacher, cfg.method.dim, cfg.seed))
    path = default_path(cfg, expected)
    if cfg.teacher.cache == "auto" and read_manifest(path) is None:
        logger.info("teacher.cache=auto: no complete cache at %s; running the teacher live", path)
        return None
    try:
        return FeatureCache.open(path, expected, verify=cfg.cache.verify)
    except CacheError as e:
        if cfg.teacher.cache == "on":
            raise
        logger.warning("teacher.cache=auto: not using the cache (%s); running the teacher live", e)
        return None


# -- writing (precompute) --------------------------------------------------------------------------------

class CacheWriter:
    """Chunks into `<path>.partial/`, then the manifest and the rename to `path` (see the module docstring)."""

    def __init__(self, path: Path, expected: dict, crops: int, chunk_size: int):
        self.path, self.partial, self.expected = Path(path), _partial(Path(path)), expected
        self.num_samples = expected["dataset"]["num_samples"]
        self.views, self.crops, self.dim = expected["views"], crops, expected["dim"]
        self.dtype = DTYPES[expected["dtype"]]
        self.chunk_size = chunk_size
        self.ranges = chunk_ranges(self.num_samples, chunk_size)

    @property
    def total_bytes(self) -> int:
        return cache_bytes(self.num_samples, self.views, self.crops, self.dim, self.expected["dtype"])

    def prepare(self) -> None:
        """Create the partial directory (rank 0) or check that an existing one was started for this cache."""
        self.partial.mkdir(parents=True, exist_ok=True)
        started = self.partial / "fingerprint.json"
        mine = {"fingerprint": self.expected, "chunk_size": self.chunk_size, "crops": self.crops}
        if started.exists():
            found = json.loads(started.read_text())
            if found != mine:
                diff = differences(found.get("fingerprint", {}), self.expected) or ["chunk_size or crops"]
                raise CacheError(f"{self.partial} holds a precompute started for another cache (differs in "
                                 f"{'; '.join(diff)}); delete it or set another cache.path")
        else:
            atomic_write(started, lambda f: f.write(json.dumps(mine, indent=1, sort_keys=True).encode()))
        remove_temporaries(self.partial, "chunk-*")

    def wait_prepared(self) -> None:
        if not (self.partial / "fingerprint.json").exists():
            raise CacheError(f"{self.partial} was not prepared by rank 0")

    def done(self) -> set[int]:
        """Chunks written completely (data and checksum)."""
        return {i for i in range(len(self.ranges)) if (self.partial / f"{_chunk_name(i)}.sha256").exists()}

    def free_space_problem(self) -> Optional[str]:
        """None, or a one-line message when the filesystem lacks room for the chunks still to write."""
        remaining = self.total_bytes * (len(self.ranges) - len(self.done())) // max(1, len(self.ranges))
        existing = next(p for p in (self.partial, *self.partial.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if remaining > free:
            return (f"the teacher feature cache needs {remaining / 1e9:.2f} GB more but {existing} has "
                    f"{free / 1e9:.2f} GB free; free space, lower cache.views, use cache.dtype=fp16, or set cache.path "
                    "elsewhere")
        return None

    def empty_chunk(self, i: int) -> np.ndarray:
        start, end = self.ranges[i]
        return np.zeros((end - start, self.views, self.crops, self.dim), dtype=self.dtype)

    def write_chunk(self, i: int, array: np.ndarray) -> None:
        """The chunk's data, then its checksum: a chunk counts as done only once both are on disk."""
        data = self.partial / f"{_chunk_name(i)}.npy"
        atomic_write(data, lambda f: np.save(f, array, allow_pickle=False))
        checksum = _sha256(data)
        atomic_write(data.with_suffix(".sha256"), lambda f: f.write(checksum.encode()))

    def finish(self) -> Path:
        """Every chunk done: write the manifest and give the directory its final name. Returns the path."""
        missing = sorted(set(range(len(self.ranges))) - self.done())
        if missing:
            raise CacheError(f"{self.partial}: chunks {missing[:5]} are not done; resubmit mode=precompute")
        chunks = [{"start": s, "end": e, "sha256": (self.partial / f"{_chunk_name(i)}.sha256").read_text()}
                  for i, (s, e) in enumerate(self.ranges)]
        manifest = {"format": FORMAT, "fingerprint": self.expected, "num_samples": self.num_samples,
                    "views": self.views, "crops": self.crops, "dim": self.dim, "dtype": self.expected["dtype"],
                    "chunk_size": self.chunk_size, "chunks": chunks}
        atomic_write(self.partial / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        if self.path.exists():
            raise CacheError(f"{self.path} appeared while precomputing; remove it or set another cache.path")
        self.partial.rename(self.path)
        return self.path

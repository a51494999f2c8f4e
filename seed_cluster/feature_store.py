"""Resumable feature extraction: a frozen network's features of a whole .beton, written chunk by chunk.

The offline kNN embeds every train and val image before it searches; on ImageNet that is
hours of a job that SLURM may preempt. The chunk is the unit of resume, as in the teacher
cache's precompute: a requeued job skips the finished chunks and redoes at most the ones a
signal interrupted. On disk, one directory per split:

    store.json          what the features are of: the .beton (path, sample count, fingerprint), the
                        source checkpoint and the chunk size; a store of anything else is refused
    chunk-000003.pt     {"start", "end", "rank", "features" [n, D] float32, "labels" [n] int64}

A chunk is `knn.batches_per_chunk` whole batches (the dataset's last chunk shorter), written
with `checkpoint.atomic_write`: it exists under its name only complete, so a chunk file is a
finished chunk, and a job killed mid-chunk leaves at most a temporary that the next start
deletes. Its range is checked again when it is read, so a half chunk never counts.

At each start rank 0 lists the finished chunks and `broadcast_object` gives every rank that
one list (ranks listing a shared filesystem themselves could disagree). The chunks left are
dealt round-robin, each rank taking its own in increasing order: the short last chunk is then
the last of a rank's batches, so every chunk is computed in the same batches whoever computes
it, in whichever attempt (bitwise the same features). Between batches a signal drops the
chunk in progress and leaves through `Preemption.leave`; nothing collective happens during
extraction, so a rank that left never blocks another. Rank 0 then waits for every chunk file
(`Preemption.wait_until`) and reads them in order.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .cache import chunk_ranges
from .checkpoint import atomic_write, remove_temporaries
from .config import DataConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "seed-cluster-features"
_CHUNK = re.compile(r"^chunk-(\d{6,})\.pt$")


def _chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.pt"


class FeatureStore:
    """The chunk files of one split's features (module docstring)."""

    def __init__(self, directory: Path, dataset: str, num_samples: int, chunk_size: int, source: str):
        from .data import check_dataset

        self.directory = Path(directory)
        self.dataset = dataset
        self.ranges = chunk_ranges(num_samples, chunk_size)
        self.expected = {"format": FORMAT, "dataset": dataset, "num_samples": num_samples,
                         "dataset_fingerprint": check_dataset(dataset, "data").get("fingerprint"),
                         "chunk_size": chunk_size, "num_chunks": len(self.ranges), "source": source}

    def prepare(self) -> None:
        """Rank 0, before any rank writes: create the directory, refuse another store's chunks, drop temporaries."""
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / "store.json"
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            differing = sorted(k for k in set(found) | set(self.expected) if found.get(k) != self.expected.get(k))
            if differing:
                raise CheckpointError(f"{self.directory} holds features of another extraction (differs in "
                                      f"{', '.join(differing)}); delete it or set another run_dir")
        else:
            atomic_write(manifest, lambda f: f.write(json.dumps(self.expected, indent=1).encode()))
        remove_temporaries(self.directory, "chunk-*")

    def done(self) -> list[int]:
        """Finished chunks (a chunk file exists only complete: atomic_write)."""
        if not self.directory.is_dir():
            return []
        found = (int(m.group(1)) for p in self.directory.iterdir() if (m := _CHUNK.match(p.name)))
        return sorted(i for i in found if i < len(self.ranges))

    def progress(self) -> str:
        return f"{len(self.done())}/{len(self.ranges)} chunks of {Path(self.dataset).name} done"

    def write(self, i: int, features: torch.Tensor, labels: torch.Tensor, rank: int) -> None:
        start, end = self.ranges[i]
        assert len(features) == len(labels) == end - start, "a chunk is written whole or not at all"
        chunk = {"start": start, "end": end, "rank": rank, "features": features, "labels": labels}
        atomic_write(self.directory / _chunk_name(i), lambda f: torch.save(chunk, f))

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [N, D], labels [N]) in file order, from every chunk (CheckpointError if one is not right)."""
        features, labels = [], []
        for i, (start, end) in enumerate(self.ranges):
            path = self.directory / _chunk_name(i)
            try:
                chunk = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - a missing or damaged file raises many types
                raise CheckpointError(f"feature chunk {path} (samples {start} to {end - 1}) is missing or "
                                      f"unreadable ({type(e).__name__}); delete it and resubmit to recompute "
                                      "it") from None
            if (chunk["start"], chunk["end"], len(chunk["features"]), len(chunk["labels"])) != \
                    (start, end, end - start, end - start):
                raise CheckpointError(f"feature chunk {path} holds samples {chunk['start']} to {chunk['end'] - 1} "
                                      f"({len(chunk['features'])} rows), not {start} to {end - 1}; delete it and "
                                      "resubmit to recompute it")
            features.append(chunk["features"])
            labels.append(chunk["labels"])
        return torch.cat(features), torch.cat(labels)


def progress(directory: Path) -> str:
    """'train.beton 5/8, test.beton 0/2 chunks done' for the stores under `directory` (for requeue logs)."""
    parts = []
    for manifest in sorted(Path(directory).glob("*/store.json")):
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        done = sum(1 for p in manifest.parent.iterdir() if _CHUNK.match(p.name))
        parts.append(f"{Path(info['dataset']).name} {done}/{info['num_chunks']}")
    return (", ".join(parts) + " chunks done") if parts else "no feature chunk done yet"


@torch.no_grad()
def extract_chunks(store: FeatureStore, todo: list[int], backbone: nn.Module, data: DataConfig,
                   device: torch.device, batch_size: int, rank: int, preemption) -> int:
    """Extract and write the chunks `todo` (increasing) of `store`; returns how many were written.

    A signal between two batches drops the chunk in progress and leaves (`Preemption.leave`).
    """
    from .evaluate import centre_batches
    from .preemption import NO_SIGNAL

    if not todo:
        return 0
    order = [j for i in todo for j in range(*store.ranges[i])]
    batches = centre_batches(store.dataset, data, device, order, batch_size)
    for n, i in enumerate(todo):
        start, end = store.ranges[i]
        features, labels, filled = [], [], 0
        while filled < end - start:
            if preemption.received != NO_SIGNAL:
                preemption.leave(rank, f"chunk {i} of {Path(store.dataset).name} dropped, {store.progress()}")
            images, y = next(batches)
            features.append(backbone(images).float().cpu())
            labels.append(y.cpu().long())
            filled += len(y)
        store.write(i, torch.cat(features), torch.cat(labels), rank)
        logger.info("feature chunk %d of %s written (%d/%d of this rank's)", i, Path(store.dataset).name, n + 1,
                    len(todo))
    return len(todo)


def resolve_source(directory: Path, requested: str) -> str:
    """The concrete checkpoint this extraction reads, fixed at its first start (rank 0): a requeue keeps the
    same backbone even if the source run has written newer checkpoints meanwhile."""
    from .evaluate import find_checkpoint

    pinned = Path(directory) / "source.json"
    if pinned.is_file():
        return json.loads(pinned.read_text())["source"]
    source = str(find_checkpoint(requested))
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write(pinned, lambda f: f.write(json.dumps({"source": source}).encode()))
    return source


def my_chunks(done: list[int], num_chunks: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the chunks not done yet: round-robin, increasing."""
    finished = set(done)
    return [i for i in range(num_chunks) if i not in finished][rank::world_size]


def stores_for(directory: Path, splits: dict[str, str], num_samples: dict[str, int], chunk_size: int,
               source: str) -> dict[str, FeatureStore]:
    return {name: FeatureStore(Path(directory) / name, path, num_samples[name], chunk_size, source)
            for name, path in splits.items()}


def read_all(stores: dict[str, FeatureStore], rank: int, preemption,
             poll_s: float = 2.0) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Rank 0: wait until every rank's chunks are on disk, then read each store; other ranks: None."""
    if rank != 0:
        return None
    preemption.wait_until(lambda: all(len(s.done()) == len(s.ranges) for s in stores.values()), rank,
                          lambda: ", ".join(s.progress() for s in stores.values()), poll_s)
    return {name: store.read() for name, store in stores.items()}

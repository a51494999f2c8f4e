"""`mode=precompute`: run the teacher once over K views of every image and write the feature cache.

Each rank takes every world_size-th chunk and, for each view key k < K, decodes the chunk's
images with the decoder training uses (one decode per image and key cuts every crop of the
method), finishes the views exactly as training does, embeds them with the teacher, and
writes the chunk atomically. Chunks are the unit of resume: a requeued job skips the
finished ones and redoes at most the chunk a signal interrupted. Rank 0 then waits for
the other ranks' chunks to appear (no collective, so a rank stopped by a signal never
leaves another blocked in one), writes the manifest and gives the cache its final name.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from .cache import CacheError, CacheWriter, default_path, fingerprint, read_manifest
from .config import TrainConfig
from .data import KeyedViews
from .distributed import DistEnv
from .methods import view_specs
from .preemption import NO_SIGNAL, Preemption
from .teachers import load_teacher

logger = logging.getLogger(__name__)

POLL_S = 2.0


def aligned_chunk_size(cfg: TrainConfig) -> int:
    """cache.chunk_size rounded up to whole batches: a batch never straddles two chunks, so every chunk is
    computed in the same batches whichever rank, attempt or world size computes it (identical bytes)."""
    batch = cfg.data.batch_size_per_rank
    return -(-cfg.cache.chunk_size // batch) * batch


def writer_for(cfg: TrainConfig) -> CacheWriter:
    from .teachers import teacher_identity

    specs = view_specs(cfg)
    expected = fingerprint(cfg, specs, teacher_identity(cfg.teacher, cfg.method.dim, cfg.seed))
    return CacheWriter(default_path(cfg, expected), expected, crops=len(specs), chunk_size=aligned_chunk_size(cfg))


def precompute(cfg: TrainConfig, env: DistEnv, preemption: Preemption, device: torch.device) -> Optional[dict]:
    """Write (or finish) the cache of `cfg`; returns a summary on rank 0, None elsewhere."""
    writer = writer_for(cfg)
    if read_manifest(writer.path) is not None:
        logger.info("the teacher feature cache %s is already complete", writer.path)
        return {"path": str(writer.path), "computed_chunks": 0} if env.rank == 0 else None
    if env.rank == 0:
        writer.prepare()
        logger.info("teacher feature cache %s: %d samples x %d views x %d crops x %d-d %s = %.2f GB in %d chunks",
                    writer.path, writer.num_samples, writer.views, writer.crops, writer.dim,
                    writer.expected["dtype"], writer.total_bytes / 1e9, len(writer.ranges))
        if problem := writer.free_space_problem():
            raise CacheError(problem)
    else:
        preemption.wait_until(lambda: (writer.partial / "fingerprint.json").exists(), env.rank,
                              lambda: "the cache not yet prepared by rank 0", POLL_S)
    mine = [i for i in range(len(writer.ranges)) if i % env.world_size == env.rank and i not in writer.done()]
    specs = view_specs(cfg)
    teacher = load_teacher(cfg.teacher, cfg.method.dim, seed=cfg.seed).to(device)
    # Set up as training sets up its live teacher, so that cached and live embeddings agree to rounding.
    teacher.configure(channels_last=cfg.perf.channels_last, precision=cfg.perf.teacher_precision)
    order = np.concatenate([np.arange(*writer.ranges[i]) for i in mine]) if mine else np.zeros(0, np.int64)
    bar = tqdm(total=len(order) * writer.views, disable=env.rank != 0 or not cfg.logging.progress_bar,
               unit="img-key", desc=f"precompute {cfg.teacher.arch} x {writer.views} views", dynamic_ncols=True)
    started, done_images, done_keys = time.perf_counter(), 0, 0
    reader = KeyedViews(cfg.data, specs, cfg.seed, cfg.data.batch_size_per_rank, writer.chunk_size, device) \
        if mine else None
    for i in mine:
        start, end = writer.ranges[i]
        chunk = writer.empty_chunk(i)
        for k in range(writer.views):
            for views, indices in reader.batches(np.arange(start, end), k):
                rows = indices - start
                for v, x in enumerate(views):
                    chunk[rows, k, v] = teacher(x).cpu().numpy()
                done_keys += len(indices)
                bar.update(len(indices))
                bar.set_postfix(views_per_s=f"{done_keys * writer.crops / (time.perf_counter() - started):.0f}")
                if preemption.received != NO_SIGNAL:  # the unfinished chunk is dropped: only it is recomputed
                    preemption.leave(env.rank, f"chunk {i} unfinished, {_progress(writer)}")
        done_images += end - start
        writer.write_chunk(i, chunk)
    bar.close()
    if env.rank != 0:
        return None
    preemption.wait_until(lambda: len(writer.done()) == len(writer.ranges), env.rank, lambda: _progress(writer),
                          POLL_S)
    path = writer.finish()
    seconds = time.perf_counter() - started
    logger.info("teacher feature cache complete: %s (%d images embedded here in %.0f s, %.1f images/s)", path,
                done_images, seconds, done_images / max(seconds, 1e-9))
    return {"path": str(path), "computed_chunks": len(mine), "images_per_s": done_images / max(seconds, 1e-9)}


def _progress(writer: CacheWriter) -> str:
    return f"{len(writer.done())}/{len(writer.ranges)} teacher-cache chunks done"


def cache_summary(cfg: TrainConfig) -> str:
    """One line for the launcher: where the cache goes, its size, how much is done."""
    writer = writer_for(cfg)
    if read_manifest(writer.path) is not None:
        return f"teacher feature cache {writer.path} is already complete"
    done = len(writer.done()) if writer.partial.is_dir() else 0
    return (f"teacher feature cache {writer.path}: {writer.total_bytes / 1e9:.2f} GB "
            f"({writer.num_samples} samples x {writer.views} views x {writer.crops} crops x {writer.dim}-d "
            f"{writer.expected['dtype']}), {done}/{len(writer.ranges)} chunks done")


def check_space(cfg: TrainConfig) -> Optional[str]:
    writer = writer_for(cfg)
    return None if read_manifest(writer.path) is not None else writer.free_space_problem()


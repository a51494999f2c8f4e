"""The embedding queue: a ring buffer of teacher (SEED) or key (MoCo) embeddings.

SEED (Fang et al., ICLR 2021, arXiv 2101.04731) keeps K = 65536 teacher embeddings,
initialised ``randn`` then L2-normalised; after each step the batch's teacher
embeddings, all-gathered across ranks, overwrite the oldest entries, so every rank
holds the same queue. The official code stores them as the columns of a ``[dim, K]``
buffer; here rows are embeddings (``[K, dim]``), which is what ``seed_loss`` takes.

``queue``, ``ptr`` and ``filled`` are registered buffers, so the queue's whole state is
in the owning module's ``state_dict`` and moves with ``.to(device)``. ``enqueue`` works
entirely on the device (``index_copy_`` at computed ring positions): no ``.item()``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seed_cluster.distributed import all_gather_cat
from seed_cluster.errors import ConfigError

__all__ = ["EmbeddingQueue"]


class EmbeddingQueue(nn.Module):
    """Ring buffer of ``size`` L2-normalised embeddings of width ``dim``, identical on every rank.

    Buffers:
        queue: ``[size, dim]`` float32, one embedding per row.
        ptr: int64 scalar, the row the next embedding is written to.
        filled: int64 scalar, real embeddings enqueued so far, capped at ``size``
            (the random initial rows do not count).

    Args:
        size: number of embeddings kept (K; SEED uses 65536).
        dim: embedding width (SEED uses 128).
        generator: CPU generator for the random initial rows; the global RNG if None.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        problems = [
            f"{name}={value} must be a positive integer"
            for name, value in (("size", size), ("dim", dim))
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0
        ]
        if problems:
            raise ConfigError("EmbeddingQueue: " + "; ".join(problems))
        self.size = size
        self.dim = dim
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("queue", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    @property
    def embeddings(self) -> torch.Tensor:
        """The ``[size, dim]`` queue itself (no copy); rows are not in insertion order."""
        return self.queue

    def fill_fraction(self) -> torch.Tensor:
        """Fraction of rows holding real embeddings, a float32 0-d tensor in [0, 1]."""
        return self.filled.float() / self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append this rank's ``keys`` ``[B, dim]``, all-gathered across ranks in rank order.

        Call it on every rank with the same ``B`` (it is a collective when distributed).
        The gathered rows are written as if one by one at ``ptr``, wrapping around; when
        more than ``size`` rows arrive at once only the last ``size`` survive, at the
        positions sequential writes would have left them.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(
                f"EmbeddingQueue.enqueue expects keys of shape [B, {self.dim}], got {tuple(keys.shape)}"
            )
        keys = all_gather_cat(keys.detach())
        n = keys.shape[0]
        if n == 0:
            return
        kept = min(n, self.size)
        keys = keys[n - kept :].to(device=self.queue.device, dtype=self.queue.dtype)
        offsets = torch.arange(n - kept, n, device=self.queue.device)
        rows = (self.ptr + offsets) % self.size
        self.queue.index_copy_(0, rows, keys)
        self.ptr.add_(n).remainder_(self.size)
        self.filled.add_(n).clamp_(max=self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

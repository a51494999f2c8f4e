"""Online kNN: the student's kNN accuracy on fixed subsets every N training steps, time-bounded.

The trainer calls `maybe_run(step, encoder)` after each step (on every rank: extraction is
sharded across ranks and gathered). Every `knn.every_steps` steps it extracts the centre-view
backbone features of a fixed, evenly spaced subset of data.train (the bank) and of data.val
(the queries; the rest of data.train when data.val is unset), with the encoder in eval mode
(put back into train mode afterwards), and returns scalars for TensorBoard:

    knn/top1, knn/top5     weighted kNN accuracy (%), k and T from the config
    knn/seconds            wall time of this evaluation
    knn/cost(%)            its share of the wall time since the previous evaluation (training included)
    knn/bank, knn/queries  how many features were used (fewer when the time bound cut extraction short)

The time bound (`knn.max_seconds`) is per evaluation: extraction of the bank gets 3/4 of it, the
queries the rest; what was extracted by then is used.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from torch import nn

from .config import DataConfig
from .knn import knn_accuracy
from .online_knn_config import OnlineKNNConfig

logger = logging.getLogger(__name__)


def evenly_spaced(count: int, total: int, offset: float = 0.0) -> list[int]:
    """`count` indices spread evenly over range(total) (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({min(total - 1, int((i + offset) * total / count)) for i in range(count)})


class OnlineKNN:
    """Periodic, bounded kNN evaluation of the student's backbone during training."""

    def __init__(self, cfg: OnlineKNNConfig, data: DataConfig, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        self.cfg, self.data, self.device = cfg, data, device
        self.rank, self.world_size = rank, world_size
        self._last = time.perf_counter()
        self._subsets: Optional[tuple[list[int], str, list[int]]] = None

    @property
    def enabled(self) -> bool:
        return self.cfg.every_steps > 0

    def subsets(self) -> tuple[list[int], str, list[int]]:
        """(bank indices in data.train, query file, query indices), fixed for the whole run."""
        if self._subsets is None:
            from .evaluate import num_samples

            n_train, _ = num_samples(self.data.train)
            bank = evenly_spaced(self.cfg.train_samples, n_train)
            if self.data.val:
                n_val, _ = num_samples(self.data.val)
                self._subsets = (bank, self.data.val, evenly_spaced(self.cfg.val_samples, n_val))
            else:  # queries from the training samples outside the bank
                rest = sorted(set(range(n_train)) - set(bank))
                if not rest:  # the bank is the whole set: hold out every 5th sample instead
                    rest, bank = bank[::5], [i for j, i in enumerate(bank) if j % 5]
                picks = evenly_spaced(self.cfg.val_samples, len(rest))
                self._subsets = (bank, self.data.train, [rest[i] for i in picks])
        return self._subsets

    def maybe_run(self, step: int, encoder: nn.Module) -> Optional[dict[str, float]]:
        """The `knn/*` scalars when `step` is due (every rank must call it at the same steps), else None."""
        if not self.enabled or step % self.cfg.every_steps != 0:
            return None
        return self.run(encoder)

    @torch.no_grad()
    def run(self, encoder: nn.Module) -> dict[str, float]:
        from .evaluate import extract_sharded

        start = time.perf_counter()
        since_last = start - self._last
        bank_idx, query_file, query_idx = self.subsets()
        was_training = encoder.training
        encoder.eval()
        try:
            deadline = time.monotonic() + 0.75 * self.cfg.max_seconds
            bank = extract_sharded(encoder, self.data.train, self.data, self.device, self.rank, self.world_size,
                                   0, self.cfg.batch_size, subset=bank_idx, deadline=deadline)
            deadline = time.monotonic() + max(0.25 * self.cfg.max_seconds, deadline - time.monotonic())
            queries = extract_sharded(encoder, query_file, self.data, self.device, self.rank, self.world_size,
                                      0, self.cfg.batch_size, subset=query_idx, deadline=deadline)
        finally:
            encoder.train(was_training)
        out = {"knn/bank": float(len(bank[1])), "knn/queries": float(len(queries[1]))}
        if len(bank[1]) and len(queries[1]):
            num_classes = int(max(bank[1].max(), queries[1].max())) + 1
            acc = knn_accuracy(bank[0], bank[1], queries[0], queries[1], num_classes, self.cfg.k,
                               self.cfg.temperature)
            out.update({"knn/top1": acc["top1"], "knn/top5": acc["top5"]})
        else:
            logger.warning("online kNN extracted nothing within knn.max_seconds=%s", self.cfg.max_seconds)
        seconds = time.perf_counter() - start
        out["knn/seconds"] = seconds
        out["knn/cost(%)"] = 100.0 * seconds / max(since_last + seconds, 1e-9)
        self._last = time.perf_counter()
        return out

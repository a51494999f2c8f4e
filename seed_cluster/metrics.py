"""Training metrics: averaged on the device between log steps, written to TensorBoard by rank 0.

Tags are namespaced (`loss/`, `lr/`, `throughput/`, `time/`, `queue/`, `seed/`, `memory/`)
so related curves group together in TensorBoard.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """Accumulates device tensors without syncing; `flush(step)` converts once per log interval."""

    def __init__(self, log_dir: Optional[Path], purge_step: Optional[int] = None):
        # purge_step: a resumed run hides the events an earlier attempt wrote at steps >= purge_step.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step) if log_dir is not None else None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._data_wait = 0.0
        self._steps = 0
        self._images = 0
        self._started = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1

    def add_step(self, images: int, data_wait_s: float) -> None:
        self._steps += 1
        self._images += images
        self._data_wait += data_wait_s

    def flush(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """Write averages since the last flush plus `extra`; returns what was written."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        scalars = {name: (self._sums[name] / self._counts[name]).item() for name in self._sums}
        scalars.update(extra)
        if self._steps:
            scalars["throughput/images_per_s"] = self._images / elapsed
            scalars["time/data_loading(%)"] = 100.0 * self._data_wait / elapsed
            scalars["time/step_s"] = elapsed / self._steps
        if torch.cuda.is_available():
            scalars["memory/max_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        self._sums, self._counts = {}, {}
        self._data_wait, self._steps, self._images = 0.0, 0, 0
        self._started = time.perf_counter()
        return scalars

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

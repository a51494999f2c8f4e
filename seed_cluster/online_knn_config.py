"""The training config's `knn:` section (online kNN during training; see `seed_cluster.online_knn`).

Kept apart and free of package imports (errors only) so that `seed_cluster.config` can compose it into
`TrainConfig` without an import cycle and without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class OnlineKNNConfig:
    """kNN accuracy of the student's backbone during training, on fixed subsets, logged as `knn/*`."""

    every_steps: int = 0
    """Evaluate every this many optimizer steps; 0 turns online kNN off."""
    train_samples: int = 5000
    """Size of the bank: evenly spaced samples of data.train (all of it when larger than the set)."""
    val_samples: int = 1000
    """Queries: evenly spaced samples of data.val (of the rest of data.train when data.val is unset)."""
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 256
    """Images per forward pass of the extraction."""
    max_seconds: float = 120.0
    """Time bound of one evaluation: extraction stops there and kNN runs on what was extracted."""

    def __post_init__(self) -> None:
        problems = []
        for key in ("every_steps",):
            if getattr(self, key) < 0:
                problems.append(f"knn.{key}={getattr(self, key)} must be >= 0 (0 = off)")
        for key in ("train_samples", "val_samples", "k", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"knn.{key}={getattr(self, key)} must be >= 1")
        if not self.temperature > 0:
            problems.append(f"knn.temperature={self.temperature} must be > 0")
        if not self.max_seconds > 0:
            problems.append(f"knn.max_seconds={self.max_seconds} must be > 0")
        if problems:
            raise ConfigError("; ".join(problems))

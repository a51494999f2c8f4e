"""Learning-rate schedule as a pure function of the global step: linear warm-up, then cosine to 0.

The schedule has no state of its own; resuming at step s gives the same value as
never having stopped (SEED/MoCo-v2 use a 5-epoch warm-up and cosine decay).
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The lr for the step about to run (0-based)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))

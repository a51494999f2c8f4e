"""learning_rate: linear warm-up then cosine to 0, as a pure function of the global step (table computed by hand)."""

from __future__ import annotations

import math

import pytest

from seed_cluster.schedule import learning_rate

C = math.cos(math.pi / 4)  # 0.7071..., for progress 1/4 and 3/4 of the cosine

# (step, peak_lr, warmup_steps, total_steps, expected lr)
TABLE = [
    # warm-up 4 of 12 steps, peak 1.0: peak/4, 2*peak/4, ... reaching the peak on the last warm-up step
    (0, 1.0, 4, 12, 0.25),
    (1, 1.0, 4, 12, 0.5),
    (2, 1.0, 4, 12, 0.75),
    (3, 1.0, 4, 12, 1.0),
    # cosine over the remaining 8 steps: progress (step - 4) / 8
    (4, 1.0, 4, 12, 1.0),
    (6, 1.0, 4, 12, 0.5 * (1 + C)),
    (8, 1.0, 4, 12, 0.5),
    (10, 1.0, 4, 12, 0.5 * (1 - C)),
    (12, 1.0, 4, 12, 0.0),
    (13, 1.0, 4, 12, 0.0),  # past the end it stays at 0, it does not come back up
    # no warm-up: the cosine starts at the peak on step 0
    (0, 0.4, 0, 4, 0.4),
    (1, 0.4, 0, 4, 0.2 * (1 + C)),
    (2, 0.4, 0, 4, 0.2),
    (3, 0.4, 0, 4, 0.2 * (1 - C)),
    (4, 0.4, 0, 4, 0.0),
    # warm-up spans the whole schedule: linear up, then it holds the peak
    (0, 0.3, 3, 3, 0.1),
    (1, 0.3, 3, 3, 0.2),
    (2, 0.3, 3, 3, 0.3),
    (3, 0.3, 3, 3, 0.3),
    # the SEED recipe's scale: base 0.03 x 512/256 = 0.06, 10 warm-up steps of 110
    (0, 0.06, 10, 110, 0.006),
    (9, 0.06, 10, 110, 0.06),
    (60, 0.06, 10, 110, 0.03),
    (110, 0.06, 10, 110, 0.0),
]


@pytest.mark.parametrize("step,peak,warmup,total,expected", TABLE)
def test_learning_rate_matches_hand_computed_table(step, peak, warmup, total, expected):
    got = learning_rate(step, peak_lr=peak, warmup_steps=warmup, total_steps=total)
    assert got == pytest.approx(expected, abs=1e-12), (step, peak, warmup, total)


@pytest.mark.parametrize("warmup,total", [(0, 50), (5, 50), (49, 50)])
def test_learning_rate_decreases_strictly_after_warmup(warmup, total):
    values = [learning_rate(s, peak_lr=0.5, warmup_steps=warmup, total_steps=total) for s in range(warmup, total + 1)]
    assert values[0] == pytest.approx(0.5)
    assert values[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False))


def test_learning_rate_rises_strictly_during_warmup_and_never_exceeds_peak():
    values = [learning_rate(s, peak_lr=0.5, warmup_steps=20, total_steps=100) for s in range(100)]
    assert all(later > earlier for earlier, later in zip(values[:19], values[1:20], strict=True))
    assert max(values) == pytest.approx(0.5)
    assert min(values) > 0.0  # every step that runs (0 .. total-1) trains with a positive lr


def test_learning_rate_is_a_pure_function_of_the_step():
    kwargs = dict(peak_lr=0.1, warmup_steps=7, total_steps=40)
    forward = [learning_rate(s, **kwargs) for s in range(40)]
    backward = [learning_rate(s, **kwargs) for s in reversed(range(40))][::-1]
    assert forward == backward  # resuming at any step gives what an uninterrupted run would have used

"""The α schedule as a pure function: exact end points, single-step runs, cosine, constant, errors.
(Accumulation, epochs, max_steps and resume through the real Trainer: tests/integration/test_train_schedule.py.)"""

from __future__ import annotations

import math

import pytest

from wrpo.engine.schedule import alpha_at, schedule_progress


def test_linear_hits_zero_and_exactly_the_target():
    total, target = 7, 0.1
    alphas = [alpha_at(s, total, target) for s in range(total)]
    assert alphas[0] == 0.0 and alphas[-1] == target
    assert alphas == pytest.approx([target * s / 6 for s in range(7)])
    assert all(a < b for a, b in zip(alphas, alphas[1:], strict=False))


def test_reference_code_never_reaches_target():
    """The reference computes target·step/total with step < total: its last α is target·(n−1)/n."""
    total, target = 4, 0.1
    assert max(target * s / total for s in range(total)) < target
    assert alpha_at(total - 1, total, target) == target


def test_single_step_run_trains_at_the_target():
    assert schedule_progress(0, 1) == 1.0
    assert alpha_at(0, 1, 0.3) == 0.3
    assert alpha_at(0, 1, 0.3, "cosine") == 0.3


def test_cosine_end_points_and_middle():
    """(1 − cos(π·p))/2 is 0, 1/2, 1 at p = 0, 1/2, 1."""
    assert alpha_at(0, 5, 0.5, "cosine") == 0.0
    assert alpha_at(2, 5, 0.5, "cosine") == pytest.approx(0.25)
    assert alpha_at(4, 5, 0.5, "cosine") == 0.5
    assert alpha_at(1, 5, 0.5, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)) / 2)


def test_constant_and_start():
    assert [alpha_at(s, 3, 0.7, "constant") for s in range(3)] == [0.7, 0.7, 0.7]
    assert alpha_at(0, 3, 0.5, start=0.1) == pytest.approx(0.1)
    assert alpha_at(1, 3, 0.5, start=0.1) == pytest.approx(0.3)


def test_past_the_end_stays_at_target_and_errors():
    assert alpha_at(10, 4, 0.1) == 0.1
    with pytest.raises(ValueError, match="total_steps"):
        alpha_at(0, 0, 0.1)
    with pytest.raises(ValueError, match="step"):
        alpha_at(-1, 3, 0.1)
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at(0, 3, 0.1, "exp")  # type: ignore[arg-type]

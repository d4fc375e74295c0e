"""The α schedule: exact end points, single-step runs, accumulation, max_steps and resume."""

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


def _simulate(micro_batches: int, accumulation: int, epochs: int, max_steps: int | None,
              resume_at: int | None = None) -> list[tuple[int, float]]:
    """(global_step, α) per micro-batch, as Trainer's loop sees them: global_step counts finished updates,
    a partial accumulation window at the end of an epoch still makes an update (HF Trainer behaviour),
    max_steps caps the run, and a resumed run starts at a restored global_step."""
    per_epoch = math.ceil(micro_batches / accumulation)
    total = max_steps if max_steps is not None else per_epoch * epochs
    seen, step = [], 0
    for _ in range(epochs if max_steps is None else math.ceil(max_steps / per_epoch)):
        for i in range(micro_batches):
            if step >= total:
                return seen
            if resume_at is None or step >= resume_at:
                seen.append((step, alpha_at(step, total, 0.1)))
            if (i + 1) % accumulation == 0 or i + 1 == micro_batches:
                step += 1
    return seen


def test_accumulation_shares_alpha_within_a_step():
    seen = _simulate(micro_batches=10, accumulation=4, epochs=2, max_steps=None)  # 3 updates per epoch
    by_step: dict[int, set[float]] = {}
    for step, a in seen:
        by_step.setdefault(step, set()).add(a)
    assert sorted(by_step) == list(range(6))
    assert all(len(v) == 1 for v in by_step.values())
    assert by_step[0] == {0.0} and by_step[5] == {0.1}


def test_max_steps_ends_at_target():
    seen = _simulate(micro_batches=10, accumulation=2, epochs=1, max_steps=8)  # spills into a 2nd epoch
    assert seen[-1] == (7, 0.1)
    assert seen[0] == (0, 0.0)


def test_resume_continues_the_same_sequence():
    full = _simulate(micro_batches=12, accumulation=3, epochs=2, max_steps=None)
    resumed = _simulate(micro_batches=12, accumulation=3, epochs=2, max_steps=None, resume_at=5)
    assert resumed == [x for x in full if x[0] >= 5]
    assert resumed[0][1] == pytest.approx(0.1 * 5 / 7)

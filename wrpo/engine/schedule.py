"""The fusion coefficient α as a pure function of the optimizer step (App. E: α rises from 0 to a target).

Steps are optimizer steps, 0-based: step s is the update being computed, i.e. `Trainer.state.global_step`
while its micro-batches run (it is incremented after the update). All micro-batches of one accumulated
step therefore see the same α, and a run resumed from a checkpoint at global_step s continues at α(s).
`total_steps` is the number of optimizer steps of the whole run (`Trainer.state.max_steps`, which already
accounts for epochs, gradient accumulation, world size and `max_steps`).

Unlike the reference implementation (α = target·step/total, which never reaches the target and ignores
`max_steps`), `linear` is exactly 0 at the first step and exactly the target at the last one.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["linear", "constant", "cosine"]
SCHEDULES: tuple[str, ...] = ("linear", "constant", "cosine")


def schedule_progress(step: int, total_steps: int) -> float:
    """Where step `step` of `total_steps` lies in [0, 1]: 0 at the first step, 1 at the last.

    A single-step run is at its end (1.0), so it trains at the target. Steps past the end stay at 1.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps == 1:
        return 1.0
    return min(step / (total_steps - 1), 1.0)


def alpha_at(step: int, total_steps: int, target: float, kind: ScheduleKind = "linear",
             start: float = 0.0) -> float:
    """α at optimizer step `step` (0-based) of a run of `total_steps` optimizer steps.

    linear:   start + (target − start)·p
    cosine:   start + (target − start)·(1 − cos(π·p))/2   (smooth at both ends)
    constant: target (the paper's "static" strategy, Fig. 6)
    with p = step/(total_steps − 1) from `schedule_progress`.
    """
    p = schedule_progress(step, total_steps)
    match kind:
        case "constant":
            return float(target)
        case "linear":
            shape = p
        case "cosine":
            shape = (1.0 - math.cos(math.pi * p)) / 2.0
        case _:
            raise ValueError(f"unknown alpha schedule '{kind}' (one of {', '.join(SCHEDULES)})")
    if p == 1.0:
        return float(target)  # exact at the last step, whatever the rounding
    return start + (target - start) * shape

"""The GPU budget: which units of a stage may hold GPUs now (docs/operator.md, "GPU budget").

Pure. A stage made of units (one per source) runs them as a sliding window: each unit holds the GPUs of
its vLLM server(s) from the moment its Deployment is created until its unit commits and the Deployment
is gone. `admit` picks, in spec order, every pending unit that fits beside what is already held (first
fit: a small unit may start while a large one waits for room, and the large one starts as soon as
enough GPUs are free, since nothing larger than the budget is ever admitted). The same function drives
the operator and `benchmarks/gpu_schedule.py`; the GPUs themselves are counted by `wrpo.pipeline.gpus`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class UnitNeed:
    name: str
    gpus: int  # GPUs held while the unit runs (0: e.g. a source behind an external endpoint)


def admit(units: Sequence[UnitNeed], done: set[str], running: set[str], budget: int | None,
          held: int = 0) -> list[str]:
    """The pending units to start now. `held`: GPUs held by the run besides its running units (e.g.
    servers still being deleted); `budget` None: no limit."""
    used = held + sum(u.gpus for u in units if u.name in running and u.name not in done)
    start = []
    for u in units:
        if u.name in done or u.name in running:
            continue
        if budget is None or used + u.gpus <= budget:
            start.append(u.name)
            used += u.gpus
    return start

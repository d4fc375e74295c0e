"""What a stage body is given: its options and its context (docs/architecture.md, "Stage runtime").

A leaf module: it imports nothing of wrpo at run time, so every layer (data construction, engine,
pipeline, CLI) can use these types without import cycles.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    from wrpo.pipeline.plan import Stage
    from wrpo.pipeline.rundir import RunDir, StageWriter
    from wrpo.pipeline.spec import FusionSpec
    from wrpo.pipeline.workdir import Workdir


@dataclass
class StageOptions:
    """How this invocation runs: servers already running (the operator's Services; absent ones are
    served locally), the scratch root, and whether to re-run a committed stage."""

    endpoints: dict[str, str] = field(default_factory=dict)  # source name -> base URL (…/v1)
    target_endpoint: str | None = None
    reward_endpoint: str | None = None
    workdir: str | None = None  # local scratch root (model downloads, input copies, checkpoints)
    force: bool = False  # re-run even when committed for this spec
    units: list[str] | None = None  # run only these units (the operator's per-unit Jobs); None: all
    shard: tuple[int, int] = (0, 1)  # part i of K of each unit's work (an Indexed Job's pod i)
    on_unit: Callable[[str, str, float], Any] | None = None  # progress: (unit, "done"|"skipped", seconds)


@dataclass
class StageContext:
    """Everything a stage body needs: the spec, the run directory, the writer of its own outputs, its plan
    row and hashes, the options and its workdir. Bodies write objects through `out` but never commit."""

    spec: FusionSpec
    run: RunDir
    out: StageWriter
    stage: Stage
    hashes: dict[str, str]  # every stage's hash for this spec
    options: StageOptions
    work: Workdir
    unit: str = ""  # the unit being run: a source name, or the stage's name for stages of one unit
    unit_hash: str = ""
    resources: ExitStack = field(default_factory=ExitStack)  # closed when the invocation ends
    _shared: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, make: Callable[[], AbstractContextManager[T]]) -> T:
        """One resource per invocation, reused by all its units (e.g. the reward model, loaded once)."""
        if key not in self._shared:
            self._shared[key] = self.resources.enter_context(make())
        return self._shared[key]

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def hash(self) -> str:
        return self.hashes[self.stage.name]

    @property
    def shard(self) -> tuple[int, int]:
        return self.options.shard

    def my_part(self, items: Sequence[T]) -> list[T]:
        """This shard's contiguous share of `items` (all of them outside an Indexed Job): the parts of all
        shards, concatenated in shard order, are `items` again."""
        i, k = self.options.shard
        n = len(items)
        return list(items[n * i // k: n * (i + 1) // k])


def is_rank_zero() -> bool:
    """True outside torchrun and on global rank 0 inside it: only rank 0 commits."""
    return int(os.environ.get("RANK", "0")) == 0


def is_local_rank_zero() -> bool:
    """True outside torchrun and on the first process of each node: it downloads and cleans up."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0

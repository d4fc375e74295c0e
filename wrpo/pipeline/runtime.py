"""Run one stage: skip it when committed for this spec, check its inputs, run its body, commit.

`wrpo stage <name>`, the local runner and the operator's pods all go through `run_stage`, so a stage
behaves the same wherever it runs (docs/architecture.md, "Stage runtime"). The body comes from the
stage's plan row; it writes objects through `ctx.out` but never commits: only global rank 0 commits,
after the body returned, by writing the manifest last.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from wrpo.errors import StageNotCommitted, WrpoError
from wrpo.pipeline.context import StageContext, StageOptions, is_rank_zero
from wrpo.pipeline.plan import stage, stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import FusionSpec
from wrpo.pipeline.workdir import Workdir
from wrpo.storage import S3Options


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" | "done"
    seconds: float
    summary: dict[str, Any]
    uri: str


def open_run(spec: FusionSpec, run_uri: str | None) -> RunDir:
    """The run directory from `--run-uri` or `spec.storage.runUri`."""
    uri = run_uri or spec.storage.run_uri
    if not uri:
        raise WrpoError("no run directory: pass --run-uri or set storage.runUri in the spec")
    return RunDir(uri, S3Options.from_spec(spec.storage))


def workdir_of(run: RunDir, options: StageOptions | None) -> Workdir:
    return Workdir(run.uri, options.workdir if options else None)


def context_for(spec: FusionSpec, run: RunDir, name: str, options: StageOptions | None = None,
                hashes: dict[str, str] | None = None) -> StageContext:
    """The context a body of stage `name` runs with (also for calling a body directly, as tests do)."""
    options = options or StageOptions()
    return StageContext(spec, run, run.stage(name).writer(), stage(name), hashes or stage_hashes(spec), options,
                        workdir_of(run, options))


def check_inputs(run: RunDir, name: str, hashes: dict[str, str]) -> dict[str, str]:
    """Every stage `name` reads must be committed from this same spec; returns their hashes."""
    inputs = {}
    for need in stage(name).needs:
        try:
            made_from = run.stage(need).manifest().get("spec_hash")
        except StageNotCommitted:
            raise WrpoError(f"stage '{name}' needs stage '{need}', which is not committed in {run.uri}; "
                            f"run it first (wrpo run --until {need})") from None
        if made_from != hashes[need]:
            raise WrpoError(f"stage '{need}' in {run.uri} was made from a different spec; "
                            f"re-run it before '{name}' (wrpo run --from {need})")
        inputs[need] = made_from
    return inputs


def committed_for(run: RunDir, name: str, expected_hash: str) -> bool:
    """True when the stage has a manifest made from a spec with the same stage hash."""
    sd = run.stage(name)
    return sd.is_committed() and sd.manifest().get("spec_hash") == expected_hash


FAULT_ENV = "WRPO_FAULT_BEFORE_COMMIT"


def _fault_point(name: str) -> None:
    """Test hook: with WRPO_FAULT_BEFORE_COMMIT=<stage>, the process is SIGKILLed after the stage wrote
    all its outputs and just before it commits - the worst moment for a crash to land."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run_stage(spec: FusionSpec, run: RunDir, name: str, options: StageOptions | None = None) -> StageResult:
    """Run stage `name` of `spec` in `run` unless it is committed for this spec (see module docstring)."""
    options = options or StageOptions()
    row = stage(name)
    hashes = stage_hashes(spec)
    sd = run.stage(name)
    t0 = time.monotonic()
    if not options.force and committed_for(run, name, hashes[name]):
        return StageResult(name, "skipped", 0.0, sd.manifest().get("summary", {}), sd.uri())
    inputs = check_inputs(run, name, hashes)
    if is_rank_zero() and sd.is_committed():
        sd.reset()  # made from another spec: drop the manifest first, then its objects
    ctx = context_for(spec, run, name, options, hashes)
    summary = row.function()(ctx) or {}
    _fault_point(name)
    if is_rank_zero():
        ctx.out.commit(spec_hash=hashes[name], inputs=inputs, summary=summary)
    ctx.work.finish(name)
    return StageResult(name, "done", time.monotonic() - t0, summary, sd.uri())

"""Run one stage: skip it when committed for this spec, check its inputs, run it, commit its manifest.

`wrpo stage <name>`, the local runner and the operator's pods all go through `run_stage`, so a stage
behaves the same wherever it runs. Stage bodies live in `wrpo.data_stages` (data) and
`wrpo.train_stages` (SFT, reference log-probs, WRPO); they write objects but never commit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wrpo.errors import StageNotCommitted, WrpoError
from wrpo.plan import BY_NAME, stage, stage_hashes
from wrpo.spec import FusionSpec


@dataclass
class StageOptions:
    """Where already-running servers are (the operator's Services); absent ones are served locally."""

    endpoints: dict[str, str] = field(default_factory=dict)  # source name -> base URL (…/v1)
    target_endpoint: str | None = None
    reward_endpoint: str | None = None
    workdir: str | None = None  # local scratch for model downloads and training outputs
    force: bool = False  # re-run even when committed for this spec


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" | "done"
    seconds: float
    summary: dict[str, Any]
    uri: str


def open_run(spec: FusionSpec, run_uri: str | None):
    """The run directory from `--run-uri` or `spec.storage.runUri`."""
    from wrpo.storage import RunDir, S3Options

    uri = run_uri or spec.storage.run_uri
    if not uri:
        raise WrpoError("no run directory: pass --run-uri or set storage.runUri in the spec")
    return RunDir(uri, S3Options.from_spec(spec.storage))


def is_rank_zero() -> bool:
    """True outside torchrun and on global rank 0 inside it: only rank 0 commits."""
    return int(os.environ.get("RANK", "0")) == 0


def _implementation(name: str) -> Callable[..., dict[str, Any]]:
    if stage(name).kind == "training" or name == "ref-logps":
        from wrpo import train_stages as mod
    else:
        from wrpo import data_stages as mod
    return getattr(mod, "run_" + name.replace("-", "_"))


def check_inputs(run, name: str, hashes: dict[str, str]) -> dict[str, str]:
    """Every stage `name` reads must be committed from this same spec; returns their hashes."""
    inputs = {}
    for need in BY_NAME[name].needs:
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


def committed_for(run, name: str, expected_hash: str) -> bool:
    """True when the stage has a manifest made from a spec with the same stage hash."""
    sd = run.stage(name)
    return sd.is_committed() and sd.manifest().get("spec_hash") == expected_hash


FAULT_ENV = "WRPO_FAULT_BEFORE_COMMIT"


def _fault_point(name: str) -> None:
    """Test hook: with WRPO_FAULT_BEFORE_COMMIT=<stage>, the process is SIGKILLed after the stage wrote
    all its outputs and just before it commits - the worst moment for a crash to land."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def run_stage(spec: FusionSpec, run, name: str, options: StageOptions | None = None) -> StageResult:
    """Run stage `name` of `spec` in `run` unless it is committed for this spec (see module docstring)."""
    options = options or StageOptions()
    hashes = stage_hashes(spec)
    sd = run.stage(name)
    t0 = time.monotonic()
    if not options.force and committed_for(run, name, hashes[name]):
        return StageResult(name, "skipped", 0.0, sd.manifest().get("summary", {}), sd.uri())
    inputs = check_inputs(run, name, hashes)
    if is_rank_zero() and sd.is_committed():
        sd.reset()  # made from another spec: drop the manifest first, then its objects
    writer = sd.writer()
    summary = _implementation(name)(spec, run, writer, options) or {}
    _fault_point(name)
    if is_rank_zero():
        writer.commit(spec_hash=hashes[name], inputs=inputs, summary=summary)
    return StageResult(name, "done", time.monotonic() - t0, summary, sd.uri())

"""Run one stage: skip it when committed for this spec, check its inputs, run its body, commit.

`wrpo stage <name>`, the local runner and the operator's pods all go through `run_stage`, so a stage
behaves the same wherever it runs (docs/architecture.md, "Stage runtime"). The body comes from the
stage's plan row; it writes objects through `ctx.out` but never commits: only global rank 0 commits,
after the body returned, by writing the manifest last. A stage made of units runs its body once per
unit not yet committed with its hash and commits each unit; a sharded invocation (`--shard i/K`)
commits part i of each unit and assembles the unit once all K parts are there; the stage commits
when all its units have (docs/architecture.md, "Units and shards").
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Any

from wrpo.errors import StageNotCommitted, WrpoError
from wrpo.pipeline.context import StageContext, StageOptions, is_rank_zero
from wrpo.pipeline.plan import STAGES, Hashes, plan_hashes, stage, stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import FusionSpec
from wrpo.pipeline.workdir import Workdir
from wrpo.storage import S3Options


@dataclass
class StageResult:
    name: str
    status: str  # "skipped" | "done" | "partial" (units or parts of other invocations still missing)
    seconds: float
    summary: dict[str, Any]
    uri: str
    units: dict[str, str] = field(default_factory=dict)  # unit -> "done" | "skipped" | "pending"


def open_run(spec: FusionSpec, run_uri: str | None) -> RunDir:
    """The run directory from `--run-uri` or `spec.storage.runUri`."""
    uri = run_uri or spec.storage.run_uri
    if not uri:
        raise WrpoError("no run directory: pass --run-uri or set storage.runUri in the spec")
    return RunDir(uri, S3Options.from_spec(spec.storage))


def workdir_of(run: RunDir, options: StageOptions | None) -> Workdir:
    return Workdir(run.uri, options.workdir if options else None)


def context_for(spec: FusionSpec, run: RunDir, name: str, options: StageOptions | None = None,
                hashes: dict[str, str] | None = None, unit: str | None = None) -> StageContext:
    """The context a body of stage `name` runs with, for `unit` (default: the stage itself); also for
    calling a body directly, as tests do."""
    options = options or StageOptions()
    hashes = hashes or stage_hashes(spec)
    return StageContext(spec, run, run.stage(name).writer(), stage(name), hashes, options, workdir_of(run, options),
                        unit=unit or name, unit_hash=hashes[name])


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
    plan = plan_hashes(spec)
    hashes = plan.stages
    sd = run.stage(name)
    t0 = time.monotonic()
    if not options.force and committed_for(run, name, hashes[name]):
        return StageResult(name, "skipped", 0.0, sd.manifest().get("summary", {}), sd.uri())
    inputs = check_inputs(run, name, hashes)
    units = unit_hashes(plan, name)
    _check_invocation(name, row.shards, units, options)
    if is_rank_zero() and (sd.is_committed() or options.force):
        # made from another spec (or forced): drop the manifest first, then what no longer belongs
        sd.reset(keep_units=None if options.force else units)
    # a sharded stage of one unit whose unit its shards committed (the commit Job after an Indexed Job
    # whose last pod died before the manifest) only commits: never the whole body again
    if row.units == "stage" and options.shard[1] == 1 and not (row.shards and _valid_units(sd, units)):
        return _run_whole(spec, run, name, options, hashes, inputs, t0)
    return _run_units(spec, run, name, options, plan, units, inputs, t0)


def unit_hashes(plan: Hashes, name: str) -> dict[str, str]:
    """unit -> hash of stage `name` (a stage of one unit is its own unit)."""
    return plan.units.get(name) or {name: plan.stages[name]}


def _check_invocation(name: str, shardable: bool, units: dict[str, str], options: StageOptions) -> None:
    unknown = sorted(set(options.units or ()) - set(units))
    if unknown:
        raise WrpoError(f"stage '{name}' has no unit {', '.join(unknown)}; units: {', '.join(units)}")
    i, k = options.shard
    if k > 1 and not shardable:
        shardable = [s.name for s in STAGES if s.shards]
        raise WrpoError(f"stage '{name}' cannot be split into shards (--shard); shardable stages are "
                        f"{', '.join(shardable)}")
    if not 0 <= i < k:
        raise WrpoError(f"--shard {i}/{k}: the index must be in 0..{k - 1}")


def _run_whole(spec: FusionSpec, run: RunDir, name: str, options: StageOptions, hashes: dict[str, str],
               inputs: dict[str, str], t0: float) -> StageResult:
    """A stage of one unit in one invocation: the body once, then the manifest."""
    ctx = context_for(spec, run, name, options, hashes)
    with ctx.resources:
        summary = ctx.stage.function()(ctx) or {}
    _fault_point(name)
    if is_rank_zero():
        ctx.out.commit(spec_hash=hashes[name], inputs=inputs, summary=summary)
    ctx.work.finish(name)
    return StageResult(name, "done", time.monotonic() - t0, summary, run.stage(name).uri())


def _run_units(spec: FusionSpec, run: RunDir, name: str, options: StageOptions, plan: Hashes,
               units: dict[str, str], inputs: dict[str, str], t0: float) -> StageResult:
    sd = run.stage(name)
    committed = _valid_units(sd, units)
    states = {u: "skipped" if u in committed else "pending" for u in units}
    base = context_for(spec, run, name, options, plan.stages)
    with base.resources:
        _units_loop(base, units, committed, states)
    committed = _valid_units(sd, units)
    states.update({u: "pending" for u in units if u not in committed})
    if len(committed) < len(units) or not is_rank_zero():
        return StageResult(name, "partial", time.monotonic() - t0, {}, sd.uri(), states)
    out = sd.writer()
    for unit in units:
        out.adopt(committed[unit]["objects"])
    if list(units) == [name]:
        summary = committed[name]["summary"]
    else:
        summary = {"units": {u: committed[u]["summary"] for u in units}}
    _fault_point(name)
    out.commit(spec_hash=plan.stages[name], inputs=inputs, summary=summary)
    base.work.finish(name)
    return StageResult(name, "done", time.monotonic() - t0, summary, sd.uri(), states)


def _units_loop(base: StageContext, units: dict[str, str], committed: dict[str, Any],
                states: dict[str, str]) -> None:
    """Run the body for every unit of this invocation that is not committed yet, committing each."""
    sd, options = base.run.stage(base.name), base.options
    i, k = options.shard
    for unit, unit_hash in units.items():
        if unit in committed or (options.units and unit not in options.units):
            continue
        u0 = time.monotonic()
        if k > 1 and i in sd.committed_parts(unit, unit_hash, k):  # this pod's part is done: a retry
            if is_rank_zero():
                assemble_unit(sd, unit, unit_hash, k, base.spec)
            continue
        out = sd.writer()
        ctx = replace(base, out=out.part(unit, unit_hash, i, k) if k > 1 else out, unit=unit,
                      unit_hash=unit_hash)
        summary = ctx.stage.function()(ctx) or {}
        if is_rank_zero():
            if k > 1:
                ctx.out.commit_part(i, summary)
                assemble_unit(sd, unit, unit_hash, k, base.spec)
            else:
                ctx.out.commit_unit(unit, unit_hash, ctx.out.written, summary)
        states[unit] = "done"
        if options.on_unit:
            options.on_unit(unit, "done", time.monotonic() - u0)


def _valid_units(sd, units: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {u: m for u, m in sd.committed_units().items() if units.get(u) == m["hash"]}


def assemble_unit(sd, unit: str, unit_hash: str, count: int, spec: FusionSpec) -> bool:
    """Once all `count` parts of a unit are committed, write the unit's objects from them and commit
    the unit: by the plan row's `assemble` function (select-sources and build-pairs merge their parts
    back into prompt order, docs/data.md "Shards"), else JSONL objects are the parts' objects
    concatenated in part order, any other object must be identical in every part and numbers in the
    parts' summaries are added up. Returns whether it committed."""
    parts = sd.committed_parts(unit, unit_hash, count)
    if len(parts) < count:
        return False
    ordered = [parts[i] for i in range(count)]
    assembler = stage(sd.name).assembler()
    if assembler is not None:
        out = sd.writer()
        summary = assembler(spec, sd, ordered, out)
        out.commit_unit(unit, unit_hash, out.written, summary)
        return True
    names = sorted(set().union(*(p["objects"] for p in ordered)))
    out = sd.writer()
    for obj in names:
        having = [p for p in ordered if obj in p["objects"]]
        if obj.endswith(".jsonl"):  # streamed from the parts (docs/data.md, "Scale")
            out.put_chunks(obj, (chunk for p in having for chunk in sd.iter_part(p, obj)))
            continue
        blobs = [sd.read_part(p, obj) for p in having]
        if any(b != blobs[0] for b in blobs):
            raise WrpoError(f"{sd.uri(obj)}: the shards of unit '{unit}' disagree on this object")
        else:
            out.put_bytes(obj, blobs[0])
    summary: dict[str, Any] = {}
    for p in ordered:
        for key, value in p["summary"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                summary[key] = summary.get(key, 0) + value
    out.commit_unit(unit, unit_hash, out.written, summary)
    return True

"""The pure decision of a reconcile (docs/architecture.md, "Operator"; docs/operator.md, "Reconcile").

`decide(run, spec, observed, now, settings)` reads the FusionRun, its parsed spec, what the watches saw (its
children, pods and Warning Events) and the time, and says what to create, what to delete, the new status and
when to look again; `wrpo_operator.reconcile` does the I/O around it. Stages run one after another in
`wrpo.pipeline.plan.STAGES` order; a stage is done when its Job/PyTorchJob succeeded, because `wrpo stage`
exits 0 only after committing `<run>/<stage>/_MANIFEST.json`. Only the current stage's children are built
(`builders.stage_children`); a finished stage's Jobs are kept by their labels. Nothing here polls:
`Decision.requeue` is set only for deadlines (stall timeout, TTL, the grace of a stall) and for a refused
creation that may pass later (a quota). What a stage means to the run comes from its plan row: the row
that `publishes` gives status.outputUri (`plan.fused_model_uri`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from wrpo.pipeline.gpus import object_gpus, pod_gpus
from wrpo.pipeline.plan import STAGE_NAMES, fused_model_uri, plan_hashes
from wrpo.pipeline.spec import FusionSpec
from wrpo_operator import LABEL_COMPONENT, LABEL_STAGE, LABEL_STAGE_HASH, LABEL_TEMPLATE_HASH
from wrpo_operator.builders import (
    Obj,
    StageChildren,
    UnitChildren,
    build_spec_configmap,
    checkpoints_pvc_name,
    configmaps_used,
    stage_children,
)
from wrpo_operator.queueing import kueue_reasons
from wrpo_operator.stalls import (
    GRACE,
    Stall,
    create_failure_reason,
    deployment_stalls,
    event_stalls,
    first,
    job_pods,
    mount_stalls,
    pod_queued,
    pod_stalls,
    server_not_ready,
    starved_jobs,
    termination_detail,
)
from wrpo_operator.status import (
    HASH_PREFIX,
    deployment_ready,
    derive_conditions,
    job_state,
    parse_time,
    timestamp,
)
from wrpo_operator.window import UnitNeed, admit

Key = tuple[str, str]  # (kind, name)
Committed = Callable[[str], set[str]]  # stage → its units committed with their current hash (runstate.py)
#: Kinds of the children that run a stage (`builders.build_stage_runner`, a unit's Job).
RUNNER_KINDS = ("Job", "PyTorchJob", "TrainJob")
#: The training backend of a run whose spec says `auto`, by what the apiserver serves (docs/operator.md,
#: "Training backends"): TrainJob when both are served.
PREFERRED_BACKENDS = ("trainjob", "pytorchjob")


def training_backend(run: Obj, spec: FusionSpec, served: Callable[[], set[str]]) -> str | None:
    """The backend the run's training stages use: the spec's, or for `auto` the one recorded in
    status.training.backend (resolved once per run), else the preferred of `served()` (the backends the
    apiserver serves; asked only then); None when `auto` finds none served."""
    wanted = spec.cluster.training.backend
    if wanted != "auto":
        return wanted
    recorded = ((run.get("status") or {}).get("training") or {}).get("backend")
    if recorded in PREFERRED_BACKENDS:
        return recorded
    have = served()
    return next((b for b in PREFERRED_BACKENDS if b in have), None)


@dataclass(frozen=True)
class Settings:
    """`retry`: seconds before creating again what the apiserver refused for a reason that may pass (a
    ResourceQuota). `read_run_state`: read units' commit markers before starting their servers
    (runstate.py). `from_env` reads WRPO_OPERATOR_RETRY_SECONDS and WRPO_OPERATOR_READ_RUN_STATE."""

    retry: float = 30.0
    read_run_state: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        return cls(retry=float(os.environ.get("WRPO_OPERATOR_RETRY_SECONDS", cls.retry)),
                   read_run_state=os.environ.get("WRPO_OPERATOR_READ_RUN_STATE", "true").lower() == "true")


@dataclass
class Observed:
    """What the watches saw of one run: its children (controlled by it, or labelled with its name and
    controlled by nobody: adopted), the pods labelled with its UID, Warning Events on its children, pods and
    descendants, Kueue's Workloads of its children and pods (queueing.py), and its descendants: objects
    labelled with its UID that its children's controllers made (the Jobs of a TrainJob's JobSet)."""

    children: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    events: list[Obj] = field(default_factory=list)
    workloads: list[Obj] = field(default_factory=list)
    descendants: list[Obj] = field(default_factory=list)


@dataclass
class Decision:
    create: list[Obj] = field(default_factory=list)  # desired children: created when absent
    delete: list[Key] = field(default_factory=list)  # children to remove
    status: Obj = field(default_factory=dict)
    requeue: float | None = None  # look again after this many seconds; None: wait for a change
    reason: str = ""  # why we look again
    delete_run: bool = False  # the TTL after finish has passed
    written: list[Obj] = field(default_factory=list)  # objects created or patched by reconcile (for the cache)


def _key(obj: Obj) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def _label(obj: Obj, key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def _deleting(obj: Obj | None) -> bool:
    return bool(obj and (obj.get("metadata") or {}).get("deletionTimestamp"))


def _stage_entries(old: Obj, hashes: dict[str, str]) -> list[Obj]:
    """Per-stage status carried over from `old` where the stage hash is unchanged, else Pending."""
    before = {s["name"]: s for s in old.get("stages") or []}
    out = []
    for name in STAGE_NAMES:
        prev = before.get(name) or {}
        entry = {"name": name, "state": "Pending", "hash": hashes[name], "retries": 0}
        if prev.get("hash") == hashes[name]:
            entry.update({k: v for k, v in prev.items() if v is not None})
        out.append(entry)
    return out


def _wait(d: Decision, seconds: float, reason: str) -> None:
    """Look again after `seconds` (the earliest of all deadlines wins)."""
    if d.requeue is None or seconds < d.requeue:
        d.requeue, d.reason = max(seconds, 0.0), reason


@dataclass
class _Pass:
    """One pass of `decide` over the stages: what it reads, and what it decided so far."""

    name: str  # the FusionRun's
    ns: str
    spec: FusionSpec
    now: datetime
    settings: Settings
    refused: dict[Key, str]  # children the apiserver refused to create in this reconcile, with its message
    committed: Committed
    kids: dict[Key, Obj]  # the run's children as the watches saw them
    pods: list[Obj]
    events: list[Obj]
    retrying: bool  # the spec changed since the last reconcile: a failed stage runs again
    run_uri: str = ""
    stamp: str = ""  # `now` as a status timestamp
    keep: set[Key] = field(default_factory=set)  # children still wanted: every other one is deleted
    drop: set[Key] = field(default_factory=set)  # children built from another spec: replaced
    d: Decision = field(default_factory=Decision)
    previous: Obj = field(default_factory=dict)  # the stall the current stage reported before
    backend: str = "pytorchjob"  # how training stages run (`training_backend`)
    waiting_since: str | None = None  # since when the current stage waits for the GPU budget, if it did
    workloads: list[Obj] = field(default_factory=list)  # Kueue's, of the run's children and pods
    descendants: list[Obj] = field(default_factory=list)  # JobSet's Jobs of the run's TrainJobs

    def __post_init__(self) -> None:
        self.run_uri = (self.spec.storage.run_uri or "").rstrip("/")
        self.stamp = timestamp(self.now)


def _start(run: Obj, spec: FusionSpec, observed: Observed, now: datetime, settings: Settings,
           refused: dict[Key, str], committed: Committed | None) -> _Pass:
    meta, old = run["metadata"], run.get("status") or {}
    retrying = old.get("observedGeneration") is not None and meta.get("generation", 1) > old["observedGeneration"]
    return _Pass(meta["name"], meta["namespace"], spec, now, settings, refused,
                 committed or (lambda stage: set()), {_key(c): c for c in observed.children}, observed.pods,
                 observed.events, retrying, workloads=observed.workloads, descendants=observed.descendants)


# -- helpers -------------------------------------------------------------------------------------

def _outdated(have: Obj, want: Obj) -> bool:
    """Built from another spec: its template hash (or, for children without one, its stage hash) differs.
    The checkpoint PVC is never replaced: it holds the checkpoints."""
    if want["kind"] == "PersistentVolumeClaim":
        return False
    label = LABEL_TEMPLATE_HASH if _label(want, LABEL_TEMPLATE_HASH) else LABEL_STAGE_HASH
    return _label(have, label) != _label(want, label)


def _stage_pods(ps: _Pass, stage: str, templates: set[str], deleting: bool = False) -> list[Obj]:
    """The pods of `stage` built from the current templates (those being deleted too with `deleting`)."""
    return [p for p in ps.pods if _label(p, LABEL_STAGE) == stage
            and _label(p, LABEL_TEMPLATE_HASH) in templates and (deleting or not _deleting(p))]


def _stall(ps: _Pass, stage: str, servers: list[Obj], runners: list[Obj], templates: set[str]) -> Stall | None:
    """The cause to report: the one reported before while it lasts (one Event per cause, even when two
    pods stall together), else the first by stalls.ORDER."""
    pods = _stage_pods(ps, stage, templates)
    found = [s for p in pods for s in [*pod_stalls(p), *mount_stalls(p, ps.events)]]
    budget = _startup_budget(ps.spec)
    found += [s for p in pods if _label(p, LABEL_COMPONENT) == "vllm" for s in server_not_ready(p, budget)]
    for dep in servers:
        have = ps.kids.get(_key(dep))
        if dep["kind"] == "Deployment" and have is not None and _key(dep) not in ps.drop:
            # a server waiting in Kueue's queue outlives its progress deadline without being stuck
            queued = bool(_kueue_held(ps, [], [dep]))
            found += [s for s in deployment_stalls(have) if not (queued and s.reason == "ProgressDeadlineExceeded")]
    for runner in runners:  # each Job on its own: another unit's running pod hides nothing
        have = ps.kids.get(_key(runner))
        live = [p for p in job_pods(runner, pods)
                if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
        if have is None:
            continue
        # the Jobs JobSet made for a TrainJob, short of pods: did the apiserver refuse one?
        uids = {j["metadata"].get("uid") for j in starved_jobs(have, ps.descendants, ps.pods)}
        jobset = None
        if not live:  # no pod: was its creation refused (for a TrainJob: also its JobSet's Job, or its JobSet)?
            uids.add(have["metadata"].get("uid"))
            jobset = have["metadata"]["name"] if have.get("kind") == "TrainJob" else None
        found += event_stalls([e for e in ps.events if _refused_for(e, uids - {None}, jobset)])
    for key, message in ps.refused.items():
        if create_failure_reason(message) == "QuotaExceeded":
            found.append(Stall("QuotaExceeded", f"{key[0]} {key[1]}", message))
    found = [s for s in found if _lasted(ps, s)]
    reported = [s for s in found if (s.reason, s.subject) == (ps.previous.get("reason"),
                                                               ps.previous.get("subject"))]
    return reported[0] if reported else first(found)  # the cause reported stays while it lasts


def _refused_for(event: Obj, uids: set[str], jobset: str | None) -> bool:
    """An Event about one of `uids`, or about the JobSet named `jobset` (Trainer names a TrainJob's JobSet
    after it; the operator does not watch JobSets, so its Events are known by that name, cache.py)."""
    inv = event.get("involvedObject") or {}
    return inv.get("uid") in uids or (jobset is not None and (inv.get("kind"), inv.get("name")) == ("JobSet", jobset))


def _startup_budget(spec: FusionSpec) -> int:
    """Seconds a vLLM server may take to become Ready: its startup probe's budget (docs/operator.md,
    "Stalls")."""
    probe = spec.cluster.vllm.startup_probe
    return probe.initial_delay_seconds + probe.failure_threshold * probe.period_seconds


def _lasted(ps: _Pass, stall: Stall) -> bool:
    """Whether a cause lasted its grace (stalls.GRACE, or the stall's own); if not yet, look again when it
    has."""
    grace = GRACE.get(stall.reason, 0) if stall.grace is None else stall.grace
    if not grace or not stall.since:
        return True
    left = parse_time(stall.since).timestamp() + grace - ps.now.timestamp()
    if left > 0:
        _wait(ps.d, left, f"{stall.subject}: {stall.reason} for {grace}s?")
    return left <= 0


# -- one stage -------------------------------------------------------------------------------------

def _advance(ps: _Pass, entry: Obj) -> bool:
    """Advance the current stage; True when it succeeded in this pass (the next one starts now)."""
    want = stage_children(ps.name, ps.ns, ps.spec, entry["name"], ps.run_uri, entry["hash"], ps.backend)
    ps.waiting_since = entry.pop("waitingSince", None)  # set again below while it still waits
    _mark_outdated(ps, want.all())
    found = {_key(r): ps.kids.get(_key(r)) for r in want.runners if _key(r) not in ps.drop}
    if entry["state"] == "Failed":
        _failed_before(ps, entry, want, found)
        return False
    if ps.spec.suspend:
        entry.update(state="Pending", message="suspended", startTime=None, stall=None)
        return False  # nothing of this stage is kept: active children are deleted
    templates = {t for o in want.all() if (t := _label(o, LABEL_TEMPLATE_HASH))}
    if want.units and not _advance_units(ps, entry, want, templates):
        return False
    states = {k: job_state(v) for k, v in found.items() if v is not None and not _deleting(v)}
    if states:
        entry["retries"] = sum(failed for _, _, failed in states.values())
    if _runners_ended(ps, entry, want, states, templates):
        return entry["state"] == "Succeeded"
    entry.setdefault("startTime", ps.stamp)
    if _stalled(ps, entry, want.servers, want.runners, templates) or _waits_for_budget(ps, entry, want):
        return False
    _create_and_keep(ps, entry, want, found, states)
    _nothing_kept_if_failed(ps, entry, want)  # the deadline passed
    return False


def _mark_outdated(ps: _Pass, objs: list[Obj]) -> None:
    """Children built from another spec are replaced (`ps.drop`)."""
    for obj in objs:
        have = ps.kids.get(_key(obj))
        if have is not None and _outdated(have, obj):
            ps.drop.add(_key(obj))


def _failed_before(ps: _Pass, entry: Obj, want: StageChildren, found: dict[Key, Obj | None]) -> None:
    """A stage that failed in an earlier pass: retried after a spec change, else its failed Jobs (and its
    units' finished Jobs) are kept for their logs; one still running (a stall) is not."""
    if ps.retrying:
        entry.update(state="Pending", message="retrying after a spec change", completionTime=None, stall=None)
        return
    ps.keep.update(k for k, v in found.items() if v is not None and job_state(v)[0] == "Failed")
    ps.keep.update(k for u in want.units if (v := ps.kids.get(k := _key(u.runner))) is not None
                   and job_state(v)[0] in ("Failed", "Succeeded"))


def _runners_ended(ps: _Pass, entry: Obj, want: StageChildren, states: dict[Key, tuple], templates: set[str]) -> bool:
    """Record the stage's end, if it ended: every runner succeeded, one failed, or the apiserver refused a
    child for good (a quota refusal is a stall instead)."""
    if states and len(states) == len(want.runners) and all(s == "Succeeded" for s, _, _ in states.values()):
        entry.update(state="Succeeded", completionTime=ps.stamp, message=None, stall=None,
                     outputUri=f"{ps.run_uri}/{entry['name']}/")
        entry.setdefault("startTime", ps.stamp)
        ps.keep.update(states)
        return True
    failed = [m for s, m, _ in states.values() if s == "Failed"]
    refused = [(k, m) for k, m in ps.refused.items() if create_failure_reason(m) != "QuotaExceeded"]
    if failed:
        detail = termination_detail(_stage_pods(ps, entry["name"], templates, deleting=True))
        message = "; ".join(m or "Failed" for m in failed) + (f"; last failure: {detail}" if detail else "")
        ps.keep.update(states)
    elif refused:
        message = "; ".join(f"cannot create {k[0]} {k[1]}: {m}" for k, m in refused)
    else:
        return False
    entry.update(state="Failed", completionTime=ps.stamp, message=message, stall=None)
    return True


# -- units under the GPU budget (docs/operator.md, "GPU budget and units") -------------------------

def _advance_units(ps: _Pass, entry: Obj, want: StageChildren, templates: set[str]) -> bool:
    """Advance the stage's units as a sliding window under `cluster.gpuBudget`; True once every unit's
    Job succeeded (the stage's own runner then commits it). A done unit's servers are not kept, so they
    are deleted and their GPUs go to the next unit."""
    done, running, failed = _unit_states(ps, entry, want)
    entry["units"] = f"{len(done)}/{len(want.units)}"
    if failed:
        detail = termination_detail(_stage_pods(ps, entry["name"], templates, deleting=True))
        entry.update(state="Failed", completionTime=ps.stamp, stall=None,
                     message="; ".join(failed) + (f"; last failure: {detail}" if detail else ""))
        return False
    if len(done) == len(want.units):
        return True
    entry.setdefault("startTime", ps.stamp)
    active = [u for u in want.units if u.name in running]
    held = _gpus_held(ps, entry["name"], {_label(o, LABEL_STAGE_HASH) for u in active for o in u.servers})
    start = admit([UnitNeed(u.name, u.gpus) for u in want.units], set(done), running, ps.spec.cluster.gpu_budget,
                  held)
    active += [u for u in want.units if u.name in start]
    if _stalled(ps, entry, [o for u in active for o in u.servers], [u.runner for u in active], templates):
        return False
    waiting, started, queued = _start_units(ps, active)
    pending = [u.name for u in want.units if u.name not in done and u not in active]
    if pending and not active:  # nothing runs: GPUs held by what no unit of this stage accounts for
        need = min(u.gpus for u in want.units if u.name in pending)
        _budget_stall(ps, entry, need, _gpu_holders(ps, _running_units_server(entry["name"], set())))
    message = f"units {len(done)}/{len(want.units)} done; running: {', '.join(u.name for u in active) or 'none'}"
    if pending:
        message += (f"; waiting for the GPU budget ({ps.spec.cluster.gpu_budget} GPUs, {held} held): "
                    f"{', '.join(pending)}")
    if waiting:
        message += f"; waiting for {'; '.join(waiting)}"
    if queued:
        message += f"; {_held_by_kueue(ps, queued)}"
    entry.update(state="Running" if started else "Queued" if queued else "Waiting", message=message)
    _operator_deadline(ps, entry)
    _nothing_kept_if_failed(ps, entry, want)
    return False


def _unit_states(ps: _Pass, entry: Obj, want: StageChildren) -> tuple[list[str], set[str], list[str]]:
    """The units done (their Job succeeded, or committed earlier: no server then), running (a Job or a server
    exists) and failed (with their Job's message); finished units' Jobs are kept."""
    done: list[str] = []
    running: set[str] = set()
    failed: list[str] = []
    for u in want.units:
        _mark_outdated(ps, [*u.servers, u.runner])
        key = _key(u.runner)
        have = None if key in ps.drop else ps.kids.get(key)
        state, message, _ = job_state(have) if have is not None and not _deleting(have) else (None, None, 0)
        if state == "Succeeded":
            done.append(u.name)
            ps.keep.add(key)  # the unit's record (and logs) while the run lasts
        elif state == "Failed":
            failed.append(f"unit {u.name}: {message or 'Failed'}")
            ps.keep.add(key)
        elif have is not None or any(_key(o) in ps.kids for o in u.servers):
            running.add(u.name)
    if len(done) + len(running) < len(want.units):  # pending units: committed earlier? (no server then)
        marked = ps.committed(entry["name"])
        done += [u.name for u in want.units if u.name in marked and u.name not in done and u.name not in running]
    return done, running, failed


def _start_units(ps: _Pass, active: list[UnitChildren]) -> tuple[list[str], bool, list[tuple[str, str]]]:
    """Keep (or create) the servers of the active units and create each unit's Job once its servers are
    ready; returns what they wait for, whether a Job runs, and what Kueue holds (_kueue_held)."""
    waiting, started, held = [], False, []
    for u in active:
        for obj in u.servers:
            ps.keep.add(_key(obj))
            if _key(obj) not in ps.drop:
                ps.d.create.append(obj)
        key = _key(u.runner)
        ps.keep.add(key)
        have = ps.kids.get(key)
        if have is not None and key not in ps.drop and not _deleting(have):
            queued = _kueue_held(ps, [have], [])
            held += queued
            started = started or not queued
            continue
        not_ready = [o for o in u.servers if o["kind"] == "Deployment"
                     and (_key(o) in ps.drop or not deployment_ready(ps.kids.get(_key(o), {})))]
        if key in ps.drop or _deleting(have):
            waiting.append(f"Job {key[1]} to be replaced")
        elif not_ready:
            waiting.append(f"vLLM servers: {', '.join(o['metadata']['name'] for o in not_ready)}")
            held += _kueue_held(ps, [], not_ready)
        else:
            ps.d.create.append(u.runner)
            started = started or not ps.spec.cluster.queue_name  # created suspended for Kueue
            if ps.spec.cluster.queue_name:
                held.append((f"Job {key[1]}", ""))
    return waiting, started, held


def _nothing_kept_if_failed(ps: _Pass, entry: Obj, want: StageChildren) -> None:
    """A stage failed in this pass (its deadline passed): none of its children is kept or created."""
    if entry["state"] == "Failed":
        mine = {_key(o) for o in want.all()}
        ps.keep -= mine
        ps.d.create = [o for o in ps.d.create if _key(o) not in mine]


def _waits_for_budget(ps: _Pass, entry: Obj, want: StageChildren) -> bool:
    """`cluster.gpuBudget` across stages: a stage's first children wait until the live pods of earlier
    stages (servers of the last units still shutting down) leave room for all of them at once."""
    budget = ps.spec.cluster.gpu_budget
    if budget is None or any(_key(o) in ps.kids for o in [*want.servers, *want.templates, *want.runners]):
        return False
    first = [r for r in want.runners if not want.after_runners.get(r["metadata"]["name"])]
    need = sum(object_gpus(o) for o in [*want.servers, *want.templates, *first])  # a TrainJob's: its runtime's
    held = _live_gpus(ps, lambda p: _label(p, LABEL_STAGE) == entry["name"])
    if held + need <= budget:
        return False
    entry.update(state="Waiting", message=f"waiting for the GPU budget: the stage needs {need} GPUs, pods of "
                 f"earlier stages still hold {held} of {budget}")
    _budget_stall(ps, entry, need, _gpu_holders(ps, lambda p: _label(p, LABEL_STAGE) == entry["name"]))
    _operator_deadline(ps, entry)
    return True


def _budget_stall(ps: _Pass, entry: Obj, need: int, holders: list[tuple[str, str, int]]) -> None:
    """A stage that waited for `cluster.gpuBudget` longer than `cluster.stallTimeoutSeconds` is shown as
    stalled (`WaitingForGPUBudget`, naming the pods that hold the GPUs); it fails only at
    `cluster.activeDeadlineSeconds`: the holders are the run's own pods, which end (docs/operator.md,
    "Stalls")."""
    entry["waitingSince"] = ps.waiting_since or ps.stamp
    if entry.get("stall"):
        return  # a cause seen on the stage's own children comes first
    timeout, budget = ps.spec.cluster.stall_timeout_seconds, ps.spec.cluster.gpu_budget
    left = parse_time(entry["waitingSince"]).timestamp() + timeout - ps.now.timestamp()
    if left > 0:
        _wait(ps.d, left, f"stage {entry['name']} waiting for the GPU budget")
        return
    held = sum(n for _, _, n in holders)
    names = ", ".join(f"pod {pod} ({stage}) {n}" for pod, stage, n in holders) or "none seen"
    since = ps.previous.get("since") if ps.previous.get("reason") == "WaitingForGPUBudget" else None
    entry["stall"] = {"reason": "WaitingForGPUBudget",
                      "subject": "pods " + ", ".join(pod for pod, _, _ in holders) if holders else "GPU budget",
                      "message": (f"the stage needs {need} GPUs at once, cluster.gpuBudget is {budget} and "
                                  f"{held} are held by: {names}")[:1000],
                      "since": since or ps.stamp}


def _gpu_holders(ps: _Pass, skip: Callable[[Obj], bool]) -> list[tuple[str, str, int]]:
    """(pod, its stage, GPUs) of the run's live pods holding GPUs, but `skip`'s."""
    return [(p["metadata"].get("name", "?"), _label(p, LABEL_STAGE) or "?", n) for p in ps.pods
            if not skip(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and (n := pod_gpus(p))]


def _live_gpus(ps: _Pass, skip: Callable[[Obj], bool]) -> int:
    """GPUs requested by the run's live pods (Pending or Running, terminating included) but `skip`'s."""
    return sum(pod_gpus(p) for p in ps.pods if not skip(p)
               and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))


def _gpus_held(ps: _Pass, stage: str, running_hashes: set[str | None]) -> int:
    """GPUs held that no running unit accounts for: servers of finished units still shutting down, pods
    of an earlier stage, GPU clients."""
    return _live_gpus(ps, _running_units_server(stage, running_hashes))


def _running_units_server(stage: str, running_hashes: set[str | None]) -> Callable[[Obj], bool]:
    def a_running_units_server(pod: Obj) -> bool:
        return (_label(pod, LABEL_COMPONENT) == "vllm" and _label(pod, LABEL_STAGE) == stage
                and _label(pod, LABEL_STAGE_HASH) in running_hashes and not _deleting(pod))

    return a_running_units_server


def _stalled(ps: _Pass, entry: Obj, servers: list[Obj], runners: list[Obj], templates: set[str]) -> bool:
    """Record the stall (if any); True when it lasted longer than `cluster.stallTimeoutSeconds`."""
    ps.previous = entry.get("stall") or {}
    stall = _stall(ps, entry["name"], servers, runners, templates)
    if stall is None:
        entry["stall"] = None
        return False
    before = entry.get("stall") or {}
    since = before.get("since") or ps.stamp
    entry["stall"] = {"reason": stall.reason, "subject": stall.subject, "message": stall.message[:1000],
                      "since": since}
    timeout = ps.spec.cluster.stall_timeout_seconds
    left = parse_time(since).timestamp() + timeout - ps.now.timestamp()
    if left <= 0:
        entry.update(state="Failed", completionTime=ps.stamp,
                     message=f"Stalled for more than {timeout}s: {stall.text}")
        return True  # nothing of the stage is kept: its pods stop holding GPUs
    _wait(ps.d, left, f"stage {entry['name']} stalled: {stall.reason}")
    if any(k in ps.refused for k in (_key(o) for o in [*servers, *runners])):
        _wait(ps.d, ps.settings.retry, f"retrying a refused creation in {entry['name']}")
    return False


def _create_and_keep(ps: _Pass, entry: Obj, want: StageChildren, found: dict[Key, Obj | None],
                     states: dict[Key, tuple]) -> None:
    for obj in [*want.volumes, *want.templates, *want.servers]:
        ps.keep.add(_key(obj))
        if _key(obj) not in ps.drop:
            ps.d.create.append(obj)
    # a TrainJob is created once the watch shows its TrainingRuntime (Trainer's webhook refuses it before)
    unseen = [o["metadata"]["name"] for o in want.templates if _key(o) in ps.drop or _key(o) not in ps.kids]
    waiting: list[str] = []
    held: list[tuple[str, str]] = []
    for runner in want.runners:
        key = _key(runner)
        ps.keep.add(key)
        if key in states:
            held += _kueue_held(ps, [found[key]] if states[key][0] == "Queued" else [], [])
            continue
        if key in ps.drop or _deleting(found.get(key)):
            waiting.append(f"{runner['kind']} {key[1]} to be replaced")
            continue
        before = [n for n in want.after_runners.get(key[1], []) if states.get(("Job", n), ("",))[0] != "Succeeded"]
        if before:
            waiting.append(f"{', '.join(before)} to succeed")
            continue
        deps = want.after.get(key[1], [])
        not_ready = [n for n in deps if ("Deployment", n) in ps.drop
                     or not deployment_ready(ps.kids.get(("Deployment", n), {}))]
        if runner["kind"] == "TrainJob" and unseen:
            waiting.append(f"TrainingRuntime {', '.join(unseen)}")
            continue
        if not_ready:
            waiting.append(f"vLLM servers: {', '.join(not_ready)}")
            held += _kueue_held(ps, [], [o for o in want.servers if o["metadata"]["name"] in not_ready])
            continue
        ps.d.create.append(runner)
        if ps.spec.cluster.queue_name:  # created suspended: Kueue admits it
            held.append((f"{runner['kind']} {key[1]}", ""))
    held = list(dict.fromkeys(held))
    if waiting:
        message = f"waiting for {'; '.join(waiting)}" + (f"; {_held_by_kueue(ps, held)}" if held else "")
        entry.update(state="Queued" if held else "Waiting", message=message)
        _operator_deadline(ps, entry)
    elif held:
        entry.update(state="Queued", message=_held_by_kueue(ps, held))
    else:
        entry.update(state="Running", message=None)


def _kueue_held(ps: _Pass, runners: list[Obj], servers: list[Obj]) -> list[tuple[str, str]]:
    """(subject, UID) of what a queue holds (docs/operator.md, "Kueue"): of `runners`, the suspended ones;
    of the `servers`' Deployments, the pods held at Kueue's scheduling gate."""
    out = [(f"{r['kind']} {r['metadata']['name']}", r["metadata"].get("uid", ""))
           for r in runners if job_state(r)[0] == "Queued"]
    hashes = {_label(s, LABEL_STAGE_HASH) for s in servers if s["kind"] == "Deployment"}
    stages = {_label(s, LABEL_STAGE) for s in servers if s["kind"] == "Deployment"}
    out += [(f"pod {p['metadata'].get('name', '?')}", p["metadata"].get("uid", "")) for p in ps.pods
            if _label(p, LABEL_COMPONENT) == "vllm" and _label(p, LABEL_STAGE) in stages
            and _label(p, LABEL_STAGE_HASH) in hashes and not _deleting(p) and pod_queued(p)]
    return out


def _held_by_kueue(ps: _Pass, held: list[tuple[str, str]]) -> str:
    """`held by Kueue (queue q)`, with `: <what>: <Kueue's reason>; ...` once its Workloads give one (their
    `QuotaReserved` condition)."""
    queue = ps.spec.cluster.queue_name
    head = f"held by Kueue (queue {queue})" if queue else "suspended"
    reasons = kueue_reasons(held, ps.workloads)
    return f"{head}: {'; '.join(reasons)}" if reasons else head


def _operator_deadline(ps: _Pass, entry: Obj) -> None:
    """`cluster.activeDeadlineSeconds` also bounds the wait for the stage's servers and for the GPU budget
    (the Job's own deadline only starts with the Job)."""
    deadline = ps.spec.cluster.active_deadline_seconds
    if not deadline or entry["state"] != "Waiting":
        return
    left = parse_time(entry["startTime"]).timestamp() + deadline - ps.now.timestamp()
    if left <= 0:
        entry.update(state="Failed", completionTime=ps.stamp,
                     message=f"DeadlineExceeded: the stage waited longer than {deadline}s for its servers or the "
                     "GPU budget")
    else:
        _wait(ps.d, left, f"deadline of stage {entry['name']}")


def decide(run: Obj, spec: FusionSpec, observed: Observed, now: datetime, settings: Settings,
           refused: dict[Key, str] | None = None, committed: Committed | None = None,
           backend: str = "pytorchjob") -> Decision:
    """The pure core of a reconcile. `refused`: children whose creation the apiserver refused in this
    reconcile, with its message (a quota refusal stalls the stage; anything else fails it at once).
    `committed`: the units of a stage already committed in the run directory (none if not given).
    `backend`: how training stages run (`training_backend`), recorded in status.training."""
    old = run.get("status") or {}
    ps = _start(run, spec, observed, now, settings, refused or {}, committed)
    ps.backend = backend
    hashes = plan_hashes(spec)
    stages = _stage_entries(old, {k: v[:HASH_PREFIX] for k, v in hashes.stages.items()})
    cm = build_spec_configmap(ps.name, ps.ns, spec)
    ps.d.create.append(cm)
    ps.keep.add(_key(cm))
    current: Obj | None = None
    for entry in stages:
        if entry["state"] == "Succeeded":
            units = {h[:HASH_PREFIX] for h in hashes.units.get(entry["name"], {}).values()}
            _keep_finished(ps, entry["name"], {entry["hash"], *units})
            continue
        current = entry
        if not _advance(ps, entry):
            break
        current = None
    d = ps.d
    d.status = _run_status(old, stages, current, spec, run["metadata"].get("generation", 1), ps.run_uri, now)
    d.status["training"] = {"backend": backend}
    if d.status["phase"] in ("Succeeded", "Failed", "Suspended"):
        d.requeue = None  # nothing of a finished or suspended run is waited for (but its TTL)
    keep = ps.keep | _in_use(ps, d.status["phase"])
    d.delete = sorted(k for k, c in ps.kids.items() if (k not in keep or k in ps.drop) and not _deleting(c))
    apply_ttl(spec, d, now)
    return d


def _keep_finished(ps: _Pass, stage: str, hashes: set[str]) -> None:
    """A finished stage's Jobs (its runners', its units') are kept for their logs, and a unit's Job keeps the
    unit done: found by their labels (the stage and its stage or unit hash), nothing is rebuilt."""
    for key, kid in ps.kids.items():
        if (key[0] in RUNNER_KINDS and _label(kid, LABEL_COMPONENT) == "stage" and _label(kid, LABEL_STAGE) == stage
                and _label(kid, LABEL_STAGE_HASH) in hashes):
            ps.keep.add(key)


def _in_use(ps: _Pass, phase: str) -> set[Key]:
    """Children kept whatever the stages say: the spec ConfigMaps a running child's pods mount, and the
    checkpoint PVC until the run succeeded (a failed or suspended run resumes from its checkpoints)."""
    # a kept TrainJob keeps the TrainingRuntime it names (Trainer reads it while the TrainJob lives)
    runtimes = {("TrainingRuntime", c["spec"]["runtimeRef"]["name"]) for k in ps.keep if k[0] == "TrainJob"
                and (c := ps.kids.get(k)) is not None and (c.get("spec") or {}).get("runtimeRef")}
    running = [c for k in ps.keep if k[0] in ("Deployment", *RUNNER_KINDS)
               and (c := ps.kids.get(k)) is not None and job_state(c)[0] not in ("Succeeded", "Failed")]
    running += [c for k in runtimes if (c := ps.kids.get(k)) is not None and any(
        r["kind"] == "TrainJob" and r["spec"]["runtimeRef"]["name"] == k[1] for r in running)]
    used = {("ConfigMap", n) for c in running for n in configmaps_used(c)} | runtimes
    if phase != "Succeeded":
        used.add(("PersistentVolumeClaim", checkpoints_pvc_name(ps.name)))
    return used


def _run_status(old: Obj, stages: list[Obj], current: Obj | None, spec: FusionSpec, generation: int,
                run_uri: str, now: datetime) -> Obj:
    done = sum(s["state"] == "Succeeded" for s in stages)
    started = [s["startTime"] for s in stages if s.get("startTime")]
    stall = (current or {}).get("stall")
    if current is None:
        phase, message = "Succeeded", f"fused model at {fused_model_uri(run_uri)}"
    elif current["state"] == "Failed":
        phase, message = "Failed", f"stage {current['name']} failed: {current.get('message')}"
    elif spec.suspend:
        phase, message = "Suspended", f"suspended before stage {current['name']}"
    elif current["state"] in ("Running", "Waiting", "Queued") or started:
        phase, message = "Running", current.get("message") or f"stage {current['name']} running"
        if stall:
            message = f"stage {current['name']} stalled: {stall['subject']}: {stall['reason']}: {stall['message']}"
    else:
        phase, message = "Pending", "waiting to start"
    finished = phase in ("Succeeded", "Failed")
    completion = old.get("completionTime") if old.get("phase") == phase else None
    return {
        "phase": phase,
        "stage": current["name"] if current else None,
        "progress": f"{done}/{len(stages)}",
        "units": current.get("units") if current and phase == "Running" else None,
        "message": message,
        "observedGeneration": generation,
        "runUri": run_uri,
        "outputUri": fused_model_uri(run_uri) if phase == "Succeeded" else None,
        "startTime": min(started) if started else None,
        "completionTime": (completion or timestamp(now)) if finished else None,
        "stages": [{k: v for k, v in s.items() if v is not None} for s in stages],
        "conditions": derive_conditions(phase, message, generation, old.get("conditions") or [], now,
                                        stall if phase == "Running" else None),
    }


def apply_ttl(spec: FusionSpec, d: Decision, now: datetime) -> None:
    """`cluster.ttlSecondsAfterFinished`: delete the finished run (its children go by garbage collection)."""
    ttl = spec.cluster.ttl_seconds_after_finished
    if ttl is None or d.status["phase"] not in ("Succeeded", "Failed"):
        return
    left = parse_time(d.status["completionTime"]).timestamp() + ttl - now.timestamp()
    if left <= 0:
        d.delete_run = True
    else:
        _wait(d, left, f"deleting the run {int(left)}s after it finished (TTL)")

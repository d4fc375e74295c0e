"""One reconcile of a FusionRun (docs/architecture.md, "Operator"; docs/operator.md, "Reconcile"): what the
watches saw → adopt → decide → create if absent → delete what is not wanted → patch status only if it changed.

`decide` is pure (the FusionRun, its parsed spec, the observed children, pods and Warning Events, the time →
what to create, what to delete, the new status, when to look again); `reconcile` does the I/O around it.
Stages run one after another in `wrpo.pipeline.plan.STAGES` order; a stage is done when its Job/PyTorchJob
succeeded, because `wrpo stage` exits 0 only after committing `<run>/<stage>/_MANIFEST.json`. Nothing here
polls: a change of a child wakes the run (docs/operator.md, "Reconcile"), and `Decision.requeue` is set only
for deadlines (stall timeout, TTL) and for a refused creation that may pass later (a quota).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wrpo.errors import SpecError
from wrpo.pipeline.plan import STAGE_NAMES, stage_hashes
from wrpo.pipeline.spec import FusionSpec, cluster_problems, parse_spec, problem_lines
from wrpo_operator import (
    LABEL_COMPONENT,
    LABEL_RUN,
    LABEL_RUN_UID,
    LABEL_STAGE,
    LABEL_STAGE_HASH,
    LABEL_TEMPLATE_HASH,
)
from wrpo_operator.builders import (
    Obj,
    build_spec_configmap,
    checkpoints_pvc_name,
    configmaps_used,
    is_owned,
    own,
    owner_reference,
    stage_children,
)
from wrpo_operator.kube import ApiError, Kube
from wrpo_operator.runstate import RunState
from wrpo_operator.stalls import (
    GRACE,
    Stall,
    create_failure_reason,
    deployment_stalls,
    event_stalls,
    first,
    pod_queued,
    pod_stalls,
    termination_detail,
)
from wrpo_operator.status import (
    HASH_PREFIX,
    deployment_ready,
    derive_conditions,
    eval_summary,
    job_state,
    parse_time,
    timestamp,
    transitions,
)
from wrpo_operator.window import UnitNeed, admit

Key = tuple[str, str]  # (kind, name)
Committed = Callable[[str], set[str]]  # stage → its units committed with their current hash (runstate.py)


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
    controlled by nobody: adopted), the pods labelled with its UID, and Warning Events on its children."""

    children: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    events: list[Obj] = field(default_factory=list)


@dataclass
class Decision:
    create: list[Obj] = field(default_factory=list)  # desired children: created when absent
    delete: list[Key] = field(default_factory=list)  # children to remove
    status: Obj = field(default_factory=dict)
    requeue: float | None = None  # look again after this many seconds; None: wait for a change
    reason: str = ""  # why we look again
    delete_run: bool = False  # the TTL after finish has passed
    written: list[Obj] = field(default_factory=list)  # objects created or patched by reconcile (for the cache)


def check_cluster_spec(spec: FusionSpec, source: str) -> None:
    """The cluster-only rules (wrpo.pipeline.spec.CLUSTER_RULES: an s3:// run directory, batches that fit
    cluster.training, no relative paths). The CRD's CEL twins refuse such a FusionRun at admission; this
    catches one admitted under an older CRD."""
    problems = cluster_problems(spec)
    if problems:
        raise SpecError("\n".join(problem_lines(problems, source)))


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


class _Pass:
    """One pass of `decide` over the stages; `stage()` advances the current one."""

    def __init__(self, run: Obj, spec: FusionSpec, observed: Observed, now: datetime, settings: Settings,
                 refused: dict[Key, str], committed: Committed | None = None):
        meta = run["metadata"]
        self.name, self.ns, self.uid = meta["name"], meta["namespace"], meta.get("uid", "")
        self.spec, self.now, self.settings, self.refused = spec, now, settings, refused
        self.run_uri = (spec.storage.run_uri or "").rstrip("/")
        self.kids = {_key(c): c for c in observed.children}
        self.pods, self.events = observed.pods, observed.events
        old = run.get("status") or {}
        generation = meta.get("generation", 1)
        self.retrying = old.get("observedGeneration") is not None and generation > old["observedGeneration"]
        self.stamp = timestamp(now)
        self.keep: set[Key] = set()
        self.drop: set[Key] = set()  # children built from another spec: replaced
        self.d = Decision()
        self._previous: Obj = {}  # the stall the current stage reported before
        self.committed = committed or (lambda stage: set())

    # -- helpers -------------------------------------------------------------------------------------
    def _outdated(self, have: Obj, want: Obj) -> bool:
        """Built from another spec: its template hash (or, for children without one, its stage hash) differs.
        The checkpoint PVC is never replaced: it holds the checkpoints."""
        if want["kind"] == "PersistentVolumeClaim":
            return False
        label = LABEL_TEMPLATE_HASH if _label(want, LABEL_TEMPLATE_HASH) else LABEL_STAGE_HASH
        return _label(have, label) != _label(want, label)

    def _stage_pods(self, stage: str, templates: set[str]) -> list[Obj]:
        return [p for p in self.pods if _label(p, LABEL_STAGE) == stage
                and _label(p, LABEL_TEMPLATE_HASH) in templates and not _deleting(p)]

    def _stall(self, stage: str, servers: list[Obj], runners: list[Obj], templates: set[str]) -> Stall | None:
        """The cause to report: the one reported before while it lasts (one Event per cause, even when two
        pods stall together), else the first by stalls.ORDER."""
        pods = self._stage_pods(stage, templates)
        found = [s for p in pods for s in pod_stalls(p)]
        for dep in servers:
            have = self.kids.get(_key(dep))
            if dep["kind"] == "Deployment" and have is not None and _key(dep) not in self.drop:
                found += deployment_stalls(have)
        for runner in runners:
            have = self.kids.get(_key(runner))
            live = [p for p in pods if _label(p, LABEL_COMPONENT) == "stage"
                    and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
            if have is not None and not live:  # no pod: was its creation refused?
                uid = have["metadata"].get("uid")
                found += event_stalls([e for e in self.events if (e.get("involvedObject") or {}).get("uid") == uid])
        for key, message in self.refused.items():
            if create_failure_reason(message) == "QuotaExceeded":
                found.append(Stall("QuotaExceeded", f"{key[0]} {key[1]}", message))
        found = [s for s in found if self._lasted(s)]
        reported = [s for s in found if (s.reason, s.subject) == (self._previous.get("reason"),
                                                                   self._previous.get("subject"))]
        return reported[0] if reported else first(found)  # the cause reported stays while it lasts

    def _lasted(self, stall: Stall) -> bool:
        """Whether a cause lasted its grace (stalls.GRACE); if not yet, look again when it has."""
        grace = GRACE.get(stall.reason, 0)
        if not grace or not stall.since:
            return True
        left = parse_time(stall.since).timestamp() + grace - self.now.timestamp()
        if left > 0:
            _wait(self.d, left, f"{stall.subject}: {stall.reason} for {grace}s?")
        return left <= 0

    # -- one stage -------------------------------------------------------------------------------------
    def stage(self, entry: Obj) -> bool:
        """Advance the current stage; True when it succeeded in this pass (the next one starts now)."""
        stage, h = entry["name"], entry["hash"]
        want = stage_children(self.name, self.ns, self.spec, stage, self.run_uri, h)
        for obj in want.all():
            have = self.kids.get(_key(obj))
            if have is not None and self._outdated(have, obj):
                self.drop.add(_key(obj))
        runners = want.runners
        found = {_key(r): self.kids.get(_key(r)) for r in runners if _key(r) not in self.drop}
        if entry["state"] == "Failed":
            if self.retrying:
                entry.update(state="Pending", message="retrying after a spec change", completionTime=None,
                             stall=None)
            else:  # a failed Job is kept for its logs; one still running (a stall) is not
                self.keep.update(k for k, v in found.items() if v is not None and job_state(v)[0] == "Failed")
                self.keep.update(k for u in want.units if (v := self.kids.get(k := _key(u.runner))) is not None
                                 and job_state(v)[0] in ("Failed", "Succeeded"))
            return False
        if self.spec.suspend:
            entry.update(state="Pending", message="suspended", startTime=None, stall=None)
            return False  # nothing of this stage is kept: active children are deleted
        templates = {t for o in want.all() if (t := _label(o, LABEL_TEMPLATE_HASH))}
        if want.units and not self._units(entry, want, templates):
            return False
        states = {k: job_state(v) for k, v in found.items() if v is not None and not _deleting(v)}
        if states:
            entry["retries"] = sum(failed for _, _, failed in states.values())
        if states and len(states) == len(runners) and all(s == "Succeeded" for s, _, _ in states.values()):
            entry.update(state="Succeeded", completionTime=self.stamp, message=None, stall=None,
                         outputUri=f"{self.run_uri}/{stage}/")
            entry.setdefault("startTime", self.stamp)
            self.keep.update(states)
            return True
        failed = [(k, m) for k, (s, m, _) in states.items() if s == "Failed"]
        if failed:
            detail = termination_detail([p for p in self.pods if _label(p, LABEL_STAGE) == stage
                                         and _label(p, LABEL_TEMPLATE_HASH) in templates])
            message = "; ".join(m or "Failed" for _, m in failed) + (f"; last failure: {detail}" if detail else "")
            entry.update(state="Failed", completionTime=self.stamp, message=message, stall=None)
            self.keep.update(states)
            return False
        refused = [(k, m) for k, m in self.refused.items() if create_failure_reason(m) != "QuotaExceeded"]
        if refused:
            message = "; ".join(f"cannot create {k[0]} {k[1]}: {m}" for k, m in refused)
            entry.update(state="Failed", completionTime=self.stamp, message=message, stall=None)
            return False
        entry.setdefault("startTime", self.stamp)
        if self._stalled(entry, want.servers, runners, templates):
            return False
        if self._waits_for_budget(entry, want):
            return False
        self._create_and_keep(entry, want, found, states)
        self._nothing_kept_if_failed(entry, want)  # the deadline passed
        return False

    # -- units under the GPU budget (docs/operator.md, "GPU budget and units") -------------------------
    def _units(self, entry: Obj, want: Any, templates: set[str]) -> bool:
        """Advance the stage's units as a sliding window under `cluster.gpuBudget`; True once every unit's
        Job succeeded (the stage's own runner then commits it). A done unit's servers are not kept, so they
        are deleted and their GPUs go to the next unit."""
        done: list[str] = []
        running: set[str] = set()
        failed: list[str] = []
        for u in want.units:
            for obj in (*u.servers, u.runner):
                have = self.kids.get(_key(obj))
                if have is not None and self._outdated(have, obj):
                    self.drop.add(_key(obj))
            key = _key(u.runner)
            have = None if key in self.drop else self.kids.get(key)
            state, message, _ = job_state(have) if have is not None and not _deleting(have) else (None, None, 0)
            if state == "Succeeded":
                done.append(u.name)
                self.keep.add(key)  # the unit's record (and logs) while the run lasts
            elif state == "Failed":
                failed.append(f"unit {u.name}: {message or 'Failed'}")
                self.keep.add(key)
            elif have is not None or any(_key(o) in self.kids for o in u.servers):
                running.add(u.name)
        if len(done) + len(running) < len(want.units):  # pending units: committed earlier? (no server then)
            marked = self.committed(entry["name"])
            done += [u.name for u in want.units if u.name in marked and u.name not in done and u.name not in running]
        total = len(want.units)
        entry["units"] = f"{len(done)}/{total}"
        if failed:
            detail = termination_detail([p for p in self.pods if _label(p, LABEL_STAGE) == entry["name"]
                                         and _label(p, LABEL_TEMPLATE_HASH) in templates])
            entry.update(state="Failed", completionTime=self.stamp, stall=None,
                         message="; ".join(failed) + (f"; last failure: {detail}" if detail else ""))
            return False
        if len(done) == total:
            return True
        entry.setdefault("startTime", self.stamp)
        budget = self.spec.cluster.gpu_budget
        active = [u for u in want.units if u.name in running]
        held = self._gpus_held(entry["name"], {_label(o, LABEL_STAGE_HASH) for u in active for o in u.servers})
        start = admit([UnitNeed(u.name, u.gpus) for u in want.units], set(done), running, budget, held)
        active += [u for u in want.units if u.name in start]
        servers = [o for u in active for o in u.servers]
        runners = [u.runner for u in active]
        if self._stalled(entry, servers, runners, templates):
            return False
        waiting, started = [], False
        for u in active:
            for obj in u.servers:
                self.keep.add(_key(obj))
                if _key(obj) not in self.drop:
                    self.d.create.append(obj)
            key = _key(u.runner)
            self.keep.add(key)
            have = self.kids.get(key)
            if have is not None and key not in self.drop and not _deleting(have):
                started = True
                continue
            not_ready = [o["metadata"]["name"] for o in u.servers if o["kind"] == "Deployment"
                         and (_key(o) in self.drop or not deployment_ready(self.kids.get(_key(o), {})))]
            if key in self.drop or _deleting(have):
                waiting.append(f"Job {key[1]} to be replaced")
            elif not_ready:
                waiting.append(f"vLLM servers: {', '.join(not_ready)}")
            else:
                self.d.create.append(u.runner)
                started = True
        pending = [u.name for u in want.units if u.name not in done and u not in active]
        message = f"units {len(done)}/{total} done; running: {', '.join(u.name for u in active) or 'none'}"
        if pending:
            message += f"; waiting for the GPU budget ({budget} GPUs, {held} held): {', '.join(pending)}"
        if waiting:
            message += f"; waiting for {'; '.join(waiting)}"
        entry.update(state="Running" if started else "Waiting", message=message)
        self._operator_deadline(entry)
        self._nothing_kept_if_failed(entry, want)
        return False

    def _nothing_kept_if_failed(self, entry: Obj, want: Any) -> None:
        """A stage failed in this pass (its deadline passed): none of its children is kept or created."""
        if entry["state"] == "Failed":
            mine = {_key(o) for o in want.all()}
            self.keep -= mine
            self.d.create = [o for o in self.d.create if _key(o) not in mine]

    def _waits_for_budget(self, entry: Obj, want: Any) -> bool:
        """`cluster.gpuBudget` across stages: a stage's first children wait until the live pods of earlier
        stages (servers of the last units still shutting down) leave room for all of them at once."""
        budget = self.spec.cluster.gpu_budget
        if budget is None or any(_key(o) in self.kids for o in [*want.servers, *want.runners]):
            return False
        first = [r for r in want.runners if not want.after_runners.get(r["metadata"]["name"])]
        need = sum(object_gpus(o) for o in [*want.servers, *first])
        held = self._live_gpus(lambda p: _label(p, LABEL_STAGE) == entry["name"])
        if held + need <= budget:
            return False
        entry.update(state="Waiting", message=f"waiting for the GPU budget: the stage needs {need} GPUs, pods of "
                     f"earlier stages still hold {held} of {budget}")
        return True

    def _live_gpus(self, skip: Callable[[Obj], bool]) -> int:
        """GPUs requested by the run's live pods (Pending or Running, terminating included) but `skip`'s."""
        return sum(pod_gpus(p) for p in self.pods if not skip(p)
                   and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))

    def _gpus_held(self, stage: str, running_hashes: set[str | None]) -> int:
        """GPUs held that no running unit accounts for: servers of finished units still shutting down, pods
        of an earlier stage, GPU clients."""
        def a_running_units_server(pod: Obj) -> bool:
            return (_label(pod, LABEL_COMPONENT) == "vllm" and _label(pod, LABEL_STAGE) == stage
                    and _label(pod, LABEL_STAGE_HASH) in running_hashes and not _deleting(pod))

        return self._live_gpus(a_running_units_server)

    def _stalled(self, entry: Obj, servers: list[Obj], runners: list[Obj], templates: set[str]) -> bool:
        """Record the stall (if any); True when it lasted longer than `cluster.stallTimeoutSeconds`."""
        self._previous = entry.get("stall") or {}
        stall = self._stall(entry["name"], servers, runners, templates)
        if stall is None:
            entry["stall"] = None
            return False
        before = entry.get("stall") or {}
        since = before.get("since") or self.stamp
        entry["stall"] = {"reason": stall.reason, "subject": stall.subject, "message": stall.message[:1000],
                          "since": since}
        timeout = self.spec.cluster.stall_timeout_seconds
        left = parse_time(since).timestamp() + timeout - self.now.timestamp()
        if left <= 0:
            entry.update(state="Failed", completionTime=self.stamp,
                         message=f"Stalled for more than {timeout}s: {stall.text}")
            return True  # nothing of the stage is kept: its pods stop holding GPUs
        _wait(self.d, left, f"stage {entry['name']} stalled: {stall.reason}")
        if any(k in self.refused for k in (_key(o) for o in [*servers, *runners])):
            _wait(self.d, self.settings.retry, f"retrying a refused creation in {entry['name']}")
        return False

    def _create_and_keep(self, entry: Obj, want: Any, found: dict[Key, Obj | None],
                         states: dict[Key, tuple]) -> None:
        for obj in [*want.volumes, *want.servers]:
            self.keep.add(_key(obj))
            if _key(obj) not in self.drop:
                self.d.create.append(obj)
        waiting: list[str] = []
        queued = False
        for runner in want.runners:
            key = _key(runner)
            self.keep.add(key)
            if key in states:
                queued = queued or states[key][0] == "Queued"
                continue
            if key in self.drop or _deleting(found.get(key)):
                waiting.append(f"{runner['kind']} {key[1]} to be replaced")
                continue
            before = [n for n in want.after_runners.get(key[1], []) if states.get(("Job", n), ("",))[0] != "Succeeded"]
            if before:
                waiting.append(f"{', '.join(before)} to succeed")
                continue
            deps = want.after.get(key[1], [])
            not_ready = [n for n in deps if ("Deployment", n) in self.drop
                         or not deployment_ready(self.kids.get(("Deployment", n), {}))]
            if not_ready:
                waiting.append(f"vLLM servers: {', '.join(not_ready)}")
                gated = [p for p in self.pods if _label(p, LABEL_STAGE) == entry["name"] and pod_queued(p)]
                queued = queued or bool(gated)
                continue
            self.d.create.append(runner)
            queued = queued or bool(self.spec.cluster.queue_name)
        if waiting:
            entry.update(state="Queued" if queued else "Waiting", message=f"waiting for {'; '.join(waiting)}")
            self._operator_deadline(entry)
        elif queued:
            queue = self.spec.cluster.queue_name
            entry.update(state="Queued", message=f"held by Kueue (queue {queue})" if queue else "suspended")
        else:
            entry.update(state="Running", message=None)

    def _operator_deadline(self, entry: Obj) -> None:
        """`cluster.activeDeadlineSeconds` also bounds the wait for the stage's servers (the Job's own
        deadline only starts with the Job)."""
        deadline = self.spec.cluster.active_deadline_seconds
        if not deadline or entry["state"] != "Waiting":
            return
        left = parse_time(entry["startTime"]).timestamp() + deadline - self.now.timestamp()
        if left <= 0:
            entry.update(state="Failed", completionTime=self.stamp,
                         message=f"DeadlineExceeded: the stage waited longer than {deadline}s for its servers")
        else:
            _wait(self.d, left, f"deadline of stage {entry['name']}")


def decide(run: Obj, spec: FusionSpec, observed: Observed, now: datetime, settings: Settings,
           refused: dict[Key, str] | None = None, committed: Committed | None = None) -> Decision:
    """The pure core of a reconcile. `refused`: children whose creation the apiserver refused in this
    reconcile, with its message (a quota refusal stalls the stage; anything else fails it at once).
    `committed`: the units of a stage already committed in the run directory (none if not given)."""
    meta = run["metadata"]
    name, ns, generation = meta["name"], meta["namespace"], meta.get("generation", 1)
    old = run.get("status") or {}
    p = _Pass(run, spec, observed, now, settings, refused or {}, committed)
    hashes = {k: v[:HASH_PREFIX] for k, v in stage_hashes(spec).items()}
    stages = _stage_entries(old, hashes)
    cm = build_spec_configmap(name, ns, spec)
    p.d.create.append(cm)
    p.keep.add(_key(cm))
    current: Obj | None = None
    for entry in stages:
        if entry["state"] == "Succeeded":
            done = stage_children(name, ns, spec, entry["name"], p.run_uri, entry["hash"])
            for obj in [*done.runners, *(u.runner for u in done.units)]:
                if _label(p.kids.get(_key(obj), {}), LABEL_STAGE_HASH) == _label(obj, LABEL_STAGE_HASH):
                    p.keep.add(_key(obj))  # a finished Job: kept for its logs (a unit's: it stays done)
            continue
        current = entry
        if not p.stage(entry):
            break
        current = None
    d = p.d
    d.status = _run_status(old, stages, current, spec, generation, p.run_uri, now)
    if d.status["phase"] in ("Succeeded", "Failed", "Suspended"):
        d.requeue = None  # nothing of a finished or suspended run is waited for (but its TTL)
    in_use = {("ConfigMap", n) for k in p.keep if k[0] in ("Deployment", "Job", "PyTorchJob")
              and (c := p.kids.get(k)) is not None and job_state(c)[0] not in ("Succeeded", "Failed")
              for n in configmaps_used(c)}
    checkpoints = ("PersistentVolumeClaim", checkpoints_pvc_name(name))
    if d.status["phase"] != "Succeeded":
        in_use.add(checkpoints)  # a failed or suspended run resumes from its checkpoints
    keep = p.keep | in_use
    d.delete = sorted(k for k, c in p.kids.items() if (k not in keep or k in p.drop) and not _deleting(c))
    _ttl(spec, d, now)
    return d


def _run_status(old: Obj, stages: list[Obj], current: Obj | None, spec: FusionSpec, generation: int,
                run_uri: str, now: datetime) -> Obj:
    done = sum(s["state"] == "Succeeded" for s in stages)
    started = [s["startTime"] for s in stages if s.get("startTime")]
    stall = (current or {}).get("stall")
    if current is None:
        phase, message = "Succeeded", f"fused model at {run_uri}/wrpo/model/"
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
        "outputUri": f"{run_uri}/wrpo/model/" if phase == "Succeeded" else None,
        "startTime": min(started) if started else None,
        "completionTime": (completion or timestamp(now)) if finished else None,
        "stages": [{k: v for k, v in s.items() if v is not None} for s in stages],
        "conditions": derive_conditions(phase, message, generation, old.get("conditions") or [], now,
                                        stall if phase == "Running" else None),
    }


def _ttl(spec: FusionSpec, d: Decision, now: datetime) -> None:
    """`cluster.ttlSecondsAfterFinished`: delete the finished run (its children go by garbage collection)."""
    ttl = spec.cluster.ttl_seconds_after_finished
    if ttl is None or d.status["phase"] not in ("Succeeded", "Failed"):
        return
    left = parse_time(d.status["completionTime"]).timestamp() + ttl - now.timestamp()
    if left <= 0:
        d.delete_run = True
    else:
        _wait(d, left, f"deleting the run {int(left)}s after it finished (TTL)")


def pod_gpus(pod: Obj) -> int:
    """nvidia.com/gpu a pod requests (its containers' requests, else limits)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("requests") or {}).get("nvidia.com/gpu") or (res.get("limits") or {}).get("nvidia.com/gpu")
        total += int(value or 0)
    return total


def object_gpus(obj: Obj) -> int:
    """nvidia.com/gpu a Deployment, Job or PyTorchJob asks for with all its pods running."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "PyTorchJob":
        return sum(r.get("replicas", 1) * pod_gpus(r["template"]) for r in spec["pytorchReplicaSpecs"].values())
    if obj.get("kind") == "Deployment":
        return spec.get("replicas", 1) * pod_gpus(spec["template"])
    if obj.get("kind") == "Job":
        return spec.get("parallelism", 1) * pod_gpus(spec["template"])
    return 0


def _comparable(status: Obj) -> Obj:
    """A status without nulls (the apiserver drops them): what decides whether to patch."""
    if isinstance(status, dict):
        return {k: _comparable(v) for k, v in status.items() if v is not None}
    if isinstance(status, list):
        return [_comparable(v) for v in status]
    return status


#: The operator's memo of units committed in run directories (Settings.read_run_state).
RUN_STATE = RunState()

#: HTTP statuses of a refused creation that retrying the same request cannot fix.
NOT_RETRYABLE = (400, 403, 404, 422)


def retryable(e: ApiError) -> bool:
    """Worth retrying as is: server errors, throttling, conflicts, and an admission plugin that does not know
    the FusionRun kind yet (OwnerReferencesPermissionEnforcement resolves owners by discovery, which lags a
    freshly installed CRD by a few seconds)."""
    return e.status not in NOT_RETRYABLE or "no matches for kind" in e.message


def reconcile(run: Obj, observed: Observed, kube: Kube, now: datetime | None = None,
              settings: Settings | None = None, post_event: Any = None, run_state: RunState | None = None) -> Decision:
    """Bring the children of one FusionRun in line with its spec and status; returns the decision.
    `post_event(run, type, reason, message, time)` posts an Event (default: `kube.event`, at once; the
    controller hands them to a background poster so that a burst of new runs is not slowed by them).

    Raises SpecError for a spec the cluster cannot run, ApiError (or a connection error) for anything worth
    retrying; an apiserver refusal to create a child goes into the status instead (see `decide`)."""
    now = now or datetime.now(UTC)
    settings = settings or Settings()
    meta = run["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    spec = parse_spec(run.get("spec"), f"FusionRun {ns}/{name}: spec")
    check_cluster_spec(spec, f"FusionRun {ns}/{name}: spec")
    written: list[Obj] = []
    children = []
    for child in observed.children:  # adopt labelled children that lost (or never had) their owner reference
        if not is_owned(child, uid) and not _controlled_by_other(child, uid):
            child = _adopt(kube, child, name, uid)
            written.append(child)
        children.append(child)
    observed = Observed(children, observed.pods, observed.events)
    state = run_state if run_state is not None else (RUN_STATE if settings.read_run_state else None)
    committed = (lambda stage: state.committed(uid, spec, stage)) if state is not None else None
    d = decide(run, spec, observed, now, settings, committed=committed)
    have = {_key(c) for c in children}
    refused: dict[Key, str] = {}
    for obj in d.create:
        if _key(obj) in have:
            continue
        try:
            made = kube.create(own(obj, name, uid)) or _existing(kube, obj, name, uid)
        except ApiError as e:
            if retryable(e):
                raise
            refused[_key(obj)] = e.message
            continue
        written.append(made)
    if refused or written:
        observed = Observed([*children, *(w for w in written if _key(w) not in have)], observed.pods,
                            observed.events)
        if refused:  # decide again: the stage fails (or stalls, for a quota) with the apiserver's message
            d = decide(run, spec, observed, now, settings, refused, committed)
    for kind, child in d.delete:
        kube.delete(kind, ns, child)
    old = run.get("status") or {}
    if _eval_status(observed.pods, old, d.status, now) and d.requeue is None:
        # the Job's completion can reach the watch before its pod's termination message does: look again
        # soon (the pod's own update also wakes the run)
        d.requeue, d.reason = EVAL_SUMMARY_RETRY_S, "the eval pod's termination message"
    if _comparable(d.status) != _comparable(old):
        written.append(kube.merge_patch("FusionRun", ns, name, {"status": _nulls_for_removed(old, d.status)},
                                        sub="status"))
        for etype, reason, message in transitions(old, d.status):
            (post_event or kube.event)(run, etype, reason, message, timestamp(now))
    if d.delete_run:
        kube.delete("FusionRun", ns, name)
    d.written = written
    return d


def _nulls_for_removed(old: Obj, new: Obj) -> Obj:
    """A merge patch removes a top-level field only when it says null (e.g. outputUri once a run re-runs)."""
    return {**{k: None for k in old if k not in new or new[k] is None}, **new}


#: Seconds before reading an eval pod's termination message again (see `_eval_status`), and for how long
#: after the eval stage succeeded it is tried.
EVAL_SUMMARY_RETRY_S, EVAL_SUMMARY_PATIENCE_S = 2.0, 120.0


def _eval_status(pods: list[Obj], old: Obj, status: Obj, now: datetime) -> bool:
    """status.eval: kept while the eval stage's hash is unchanged, else read from its pods' termination
    message after it succeeded (docs/operator.md, "Status"); the pods come from the watch cache. True
    when the stage succeeded lately and no summary could be read yet (the caller looks again soon)."""
    entry = next((s for s in status["stages"] if s["name"] == "eval"), None)
    if entry is None or entry["state"] != "Succeeded":
        return False
    if (old.get("eval") or {}).get("hash") == entry["hash"]:
        status["eval"] = old["eval"]
        return False
    mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_STAGE) == "eval"
            and p["metadata"]["labels"].get(LABEL_STAGE_HASH) == entry["hash"]]
    found = eval_summary(mine, entry["hash"])
    if found is not None:
        status["eval"] = found
        return False
    done = entry.get("completionTime")
    return bool(done) and (now - parse_time(done)).total_seconds() < EVAL_SUMMARY_PATIENCE_S


def _controlled_by_other(obj: Obj, uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") != uid
               for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _adopt(kube: Kube, child: Obj, run_name: str, uid: str) -> Obj:
    meta = child["metadata"]
    patch = {"metadata": {"labels": {LABEL_RUN: run_name, LABEL_RUN_UID: uid},
                          "ownerReferences": [*(meta.get("ownerReferences") or []), owner_reference(run_name, uid)]}}
    return kube.merge_patch(child["kind"], meta["namespace"], meta["name"], patch)


def _existing(kube: Kube, obj: Obj, run_name: str, uid: str) -> Obj:
    """A child with our deterministic name exists but the watches have not shown it to us (409): ours, or an
    orphan to adopt. One controlled by another object is an error the user must resolve — except a child of
    an earlier run with the same name, which garbage collection is about to remove (retried)."""
    kind, ns, child = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    found = kube.get(kind, ns, child)
    if found is None:
        raise ApiError(409, "Conflict", f"{kind} {ns}/{child} was deleted while being created")
    found.setdefault("kind", kind)
    if is_owned(found, uid):
        return found
    if _controlled_by_other(found, uid):
        owners = [r for r in found["metadata"].get("ownerReferences") or [] if r.get("controller")]
        if any(r.get("kind") == "FusionRun" and r.get("name") == run_name for r in owners):
            raise ApiError(409, "Conflict", f"{kind} {ns}/{child} belongs to an earlier FusionRun {run_name} "
                                            "that is being deleted")
        raise SpecError(f"{kind} {ns}/{child} exists and belongs to someone else; rename the FusionRun")
    return _adopt(kube, found, run_name, uid)

"""One reconcile of a FusionRun (docs/architecture.md, "Operator"): read → build desired → adopt → create if absent →
derive phase and conditions → patch status only if it changed.

`decide` is pure (the FusionRun, its parsed spec, the observed children, the time → what to create,
what to delete, the new status, when to look again); `reconcile` does the I/O around it. Stages run
one after another in `wrpo.pipeline.plan.STAGES` order; a stage is done when its Job/PyTorchJob succeeded,
because `wrpo stage` exits 0 only after committing `<run>/<stage>/_MANIFEST.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from wrpo.errors import SpecError
from wrpo.pipeline.plan import BY_NAME, STAGE_NAMES, stage_hashes
from wrpo.pipeline.spec import FusionSpec, cluster_problems, parse_spec, problem_lines
from wrpo_operator import LABEL_RUN, LABEL_STAGE, LABEL_STAGE_HASH
from wrpo_operator.builders import (
    Obj,
    build_spec_configmap,
    build_stage_runner,
    build_stage_servers,
    is_owned,
    own,
    owner_reference,
    with_pod_annotations,
)
from wrpo_operator.kube import CHILD_KINDS, Kube
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

Key = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class Settings:
    """How often to look again while waiting (seconds); `from_env` reads WRPO_OPERATOR_* overrides."""

    poll: float = 10.0  # a Job runs
    training_poll: float = 30.0  # a PyTorchJob runs
    server_poll: float = 10.0  # vLLM servers start
    short: float = 2.0  # an old child is being deleted

    @classmethod
    def from_env(cls) -> Settings:
        def get(name: str, default: float) -> float:
            return float(os.environ.get(f"WRPO_OPERATOR_{name.upper()}_SECONDS", default))

        return cls(**{f: get(f, getattr(cls, f)) for f in cls.__dataclass_fields__})


@dataclass
class Decision:
    create: list[Obj] = field(default_factory=list)  # desired children: created when absent
    delete: list[Key] = field(default_factory=list)  # children to remove
    status: Obj = field(default_factory=dict)
    requeue: float | None = None  # look again after this many seconds; None: nothing to wait for
    reason: str = ""  # why we wait (for the TemporaryError)
    delete_run: bool = False  # the TTL after finish has passed


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


def decide(run: Obj, spec: FusionSpec, children: list[Obj], now: datetime, settings: Settings) -> Decision:
    meta = run["metadata"]
    name, ns, generation = meta["name"], meta["namespace"], meta.get("generation", 1)
    old = run.get("status") or {}
    run_uri = (spec.storage.run_uri or "").rstrip("/")
    hashes = {k: v[:HASH_PREFIX] for k, v in stage_hashes(spec).items()}
    observed = {_key(c): c for c in children}
    stages = _stage_entries(old, hashes)
    d = Decision()
    cm = build_spec_configmap(name, ns, spec)
    d.create.append(cm)
    keep: set[Key] = {_key(cm)}
    drop: set[Key] = set()  # observed children built from an older spec
    stamp = timestamp(now)
    retrying = old.get("observedGeneration") is not None and generation > old["observedGeneration"]

    current: Obj | None = None
    for entry in stages:
        if entry["state"] == "Succeeded":
            runner_key = _key(build_stage_runner(name, ns, spec, entry["name"], run_uri, entry["hash"]))
            if _label(observed.get(runner_key, {}), LABEL_STAGE_HASH) == entry["hash"]:
                keep.add(runner_key)  # a finished Job: keep it for its logs
            continue
        current = entry
        stage = entry["name"]
        extra = spec.cluster.pod_annotations
        runner = build_stage_runner(name, ns, spec, stage, run_uri, entry["hash"])
        runner = with_pod_annotations(runner, extra)
        servers = [with_pod_annotations(s, extra)
                   for s in build_stage_servers(name, ns, spec, stage, run_uri, entry["hash"])]
        found = observed.get(_key(runner))
        for child in [runner, *servers]:  # built from an older spec: deleted now, recreated next pass
            have = observed.get(_key(child))
            if have is not None and _label(have, LABEL_STAGE_HASH) != entry["hash"]:
                drop.add(_key(child))
                d.requeue, d.reason = settings.short, f"replacing {child['kind']} {child['metadata']['name']}"
        if _key(runner) in drop:
            found = None
        elif found is not None and found["metadata"].get("deletionTimestamp"):
            keep.add(_key(runner))
            d.requeue, d.reason = settings.short, f"waiting for {runner['metadata']['name']} to go"
            break
        if entry["state"] == "Failed" and retrying:
            entry.update(state="Pending", message="retrying after a spec change", completionTime=None)
            d.requeue, d.reason = settings.short, "retrying a failed stage"
            break  # the failed runner is not kept: deleted now, recreated on the next pass
        if entry["state"] == "Failed":
            keep.add(_key(runner))
            break
        if found is not None:
            state, message, failed = job_state(found)
            entry["retries"] = failed
            if state == "Succeeded":
                entry.update(state="Succeeded", completionTime=stamp, message=None,
                             outputUri=f"{run_uri}/{stage}/")
                entry.setdefault("startTime", stamp)
                keep.add(_key(runner))
                current = None
                continue  # the next stage starts in this same pass
            if state == "Failed":
                entry.update(state="Failed", completionTime=stamp, message=message)
                keep.add(_key(runner))
                break
        if spec.suspend:
            entry.update(state="Pending", message="suspended", startTime=None)
            break  # nothing of this stage is kept: active children are deleted
        deadline = spec.cluster.active_deadline_seconds
        started = entry.get("startTime")
        if deadline and started and (now - parse_time(started)).total_seconds() > deadline:
            entry.update(state="Failed", completionTime=stamp,
                         message=f"DeadlineExceeded: the stage ran longer than {deadline}s")
            keep.add(_key(runner))
            break
        entry.setdefault("startTime", stamp)
        d.create += [s for s in servers if _key(s) not in drop]
        keep.update(_key(s) for s in servers)
        keep.add(_key(runner))
        if found is not None:
            entry.update(state="Running", message=None)
        else:
            not_ready = [s["metadata"]["name"] for s in servers if s["kind"] == "Deployment"
                         and (_key(s) in drop or not deployment_ready(observed.get(_key(s), {})))]
            if not_ready:
                entry.update(state="Waiting", message=f"waiting for vLLM servers: {', '.join(not_ready)}")
                if d.requeue is None:
                    d.requeue, d.reason = settings.server_poll, entry["message"]
                break
            if d.requeue is None:  # not while an old runner is still being replaced
                d.create.append(runner)
                entry.update(state="Running", message=None)
        if d.requeue is None:
            training = BY_NAME[stage].distributed
            d.requeue = settings.training_poll if training else settings.poll
            d.reason = f"stage {stage} running"
        break

    d.delete = sorted(k for k in observed if k not in keep or k in drop)
    d.status = _run_status(old, stages, current, spec, generation, run_uri, now)
    _ttl(spec, d, now)
    return d


def _run_status(old: Obj, stages: list[Obj], current: Obj | None, spec: FusionSpec, generation: int,
                run_uri: str, now: datetime) -> Obj:
    done = sum(s["state"] == "Succeeded" for s in stages)
    started = [s["startTime"] for s in stages if s.get("startTime")]
    if current is None:
        phase, message = "Succeeded", f"fused model at {run_uri}/wrpo/model/"
    elif current["state"] == "Failed":
        phase, message = "Failed", f"stage {current['name']} failed: {current.get('message')}"
    elif spec.suspend:
        phase, message = "Suspended", f"suspended before stage {current['name']}"
    elif current["state"] in ("Running", "Waiting") or started:
        phase, message = "Running", current.get("message") or f"stage {current['name']} running"
    else:
        phase, message = "Pending", "waiting to start"
    finished = phase in ("Succeeded", "Failed")
    completion = old.get("completionTime") if old.get("phase") == phase else None
    return {
        "phase": phase,
        "stage": current["name"] if current else None,
        "progress": f"{done}/{len(stages)}",
        "message": message,
        "observedGeneration": generation,
        "runUri": run_uri,
        "outputUri": f"{run_uri}/wrpo/model/",
        "startTime": min(started) if started else None,
        "completionTime": (completion or timestamp(now)) if finished else None,
        "stages": [{k: v for k, v in s.items() if v is not None} for s in stages],
        "conditions": derive_conditions(phase, message, generation, old.get("conditions") or [], now),
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
        d.requeue, d.reason = left, f"deleting the run {int(left)}s after it finished (TTL)"


def _without_none(status: Obj) -> Obj:
    return {k: v for k, v in status.items() if v is not None}


def reconcile(run: Obj, kube: Kube, now: datetime | None = None, settings: Settings | None = None,
              on_event: Any = None) -> Decision:
    """Bring the children of one FusionRun in line with its spec and status; returns the decision."""
    now = now or datetime.now(UTC)
    settings = settings or Settings()
    meta = run["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    # 1. read
    spec = parse_spec(run.get("spec"), f"FusionRun {ns}/{name}: spec")
    check_cluster_spec(spec, f"FusionRun {ns}/{name}: spec")
    children = [c for kind in CHILD_KINDS for c in kube.list(kind, ns, f"{LABEL_RUN}={name}")]
    # 2. adopt labelled children that lost (or never had) their owner reference
    for child in children:
        if not is_owned(child, uid) and not _controlled_by_other(child, uid):
            kube.merge_patch(child["kind"], ns, child["metadata"]["name"],
                             {"metadata": {"ownerReferences": [owner_reference(name, uid)]}})
    # 3. build the desired children and decide
    d = decide(run, spec, children, now, settings)
    observed = {_key(c): c for c in children}
    # 4. create if absent (the spec ConfigMap is the one child whose content follows spec edits)
    for obj in d.create:
        have = observed.get(_key(obj))
        if have is None:
            if kube.create(own(obj, name, uid)) is None:
                _adopt_existing(kube, obj, name, uid)
        elif obj["kind"] == "ConfigMap" and have.get("data") != obj["data"]:
            kube.merge_patch("ConfigMap", ns, obj["metadata"]["name"], {"data": obj["data"]})
    for kind, child in d.delete:
        kube.delete(kind, ns, child)
    # 5. status, only if it changed; Events on transitions
    old = run.get("status") or {}
    _eval_status(kube, name, ns, old, d.status)
    if _without_none(d.status) != _without_none(old):
        kube.merge_patch("FusionRun", ns, name, {"status": d.status}, sub="status")
        for etype, reason, message in transitions(old, d.status):
            kube.event(run, etype, reason, message, timestamp(now))
            if on_event:
                on_event(etype, reason, message)
    if d.delete_run:
        kube.delete("FusionRun", ns, name)
    return d


def _eval_status(kube: Kube, name: str, ns: str, old: Obj, status: Obj) -> None:
    """status.eval: kept while the eval stage's hash is unchanged, else read once from its pods' termination
    message after it succeeded (docs/operator.md, "Status")."""
    entry = next((s for s in status["stages"] if s["name"] == "eval"), None)
    if entry is None or entry["state"] != "Succeeded":
        return
    if (old.get("eval") or {}).get("hash") == entry["hash"]:
        status["eval"] = old["eval"]
        return
    selector = f"{LABEL_RUN}={name},{LABEL_STAGE}=eval,{LABEL_STAGE_HASH}={entry['hash']}"
    found = eval_summary(kube.list("Pod", ns, selector), entry["hash"])
    if found is not None:
        status["eval"] = found


def _controlled_by_other(obj: Obj, uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") != uid
               for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _adopt_existing(kube: Kube, obj: Obj, run_name: str, uid: str) -> None:
    """A child with our deterministic name exists but was not listed (no run label): adopt it."""
    kind, ns, child = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    found = kube.get(kind, ns, child)
    if found is None or is_owned(found, uid):
        return
    if _controlled_by_other(found, uid):
        raise SpecError(f"{kind} {ns}/{child} exists and belongs to someone else; rename the FusionRun")
    stage = _label(obj, LABEL_STAGE)
    patch_labels = {LABEL_RUN: run_name, **({LABEL_STAGE: stage} if stage else {})}
    kube.merge_patch(kind, ns, child, {"metadata": {"labels": patch_labels,
                                                    "ownerReferences": [owner_reference(run_name, uid)]}})

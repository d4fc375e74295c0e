"""One reconcile of a FusionRun, the I/O around the pure `decide` (docs/architecture.md, "Operator";
docs/operator.md, "Reconcile"): what the watches saw → adopt labelled orphans → `decide` → create what is
absent → delete what is not wanted → read the stage summaries from pods → patch status only if it changed,
with an Event per transition.

`decide` (decide.py) says what to do; this module only does it: the apiserver calls go through `Kube`
(kube.py), and an apiserver refusal to create a child goes back into `decide` so the status says why.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from wrpo.errors import SpecError
from wrpo.pipeline.spec import FusionSpec, cluster_problems, parse_spec, problem_lines
from wrpo_operator import LABEL_RUN, LABEL_RUN_UID
from wrpo_operator.admission import admit, backend_refusal, refusal_message, refused_status, served_backends
from wrpo_operator.builders import Obj, is_owned, owner_reference, spec_hash, with_owner
from wrpo_operator.decide import Decision, Key, Observed, Settings, apply_ttl, decide, training_backend
from wrpo_operator.kube import ApiError, Kube, retryable
from wrpo_operator.runstate import RunState
from wrpo_operator.status import SUMMARY_RETRY_S, read_summaries, timestamp, transitions

__all__ = ["check_cluster_spec", "reconcile", "retryable"]


def check_cluster_spec(spec: FusionSpec, source: str) -> None:
    """The cluster-only rules (wrpo.pipeline.spec.CLUSTER_RULES: an s3:// run directory, batches that fit
    cluster.training, no relative paths). The CRD's CEL twins refuse such a FusionRun at admission; this
    catches one admitted under an older CRD."""
    problems = cluster_problems(spec)
    if problems:
        raise SpecError("\n".join(problem_lines(problems, source)))


def _comparable(status: Obj) -> Obj:
    """A status without nulls (the apiserver drops them): what decides whether to patch."""
    if isinstance(status, dict):
        return {k: _comparable(v) for k, v in status.items() if v is not None}
    if isinstance(status, list):
        return [_comparable(v) for v in status]
    return status




def _nulls_for_removed(old: Obj, new: Obj) -> Obj:
    """A merge patch removes a top-level field only when it says null (e.g. outputUri once a run re-runs)."""
    return {**{k: None for k in old if k not in new or new[k] is None}, **new}


#: The operator's memo of units committed in run directories (Settings.read_run_state).
RUN_STATE = RunState()

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
    admitted = spec_hash(spec)
    if (run.get("status") or {}).get("refusedHash") == admitted:  # refused before (admission.py): Failed
        d = Decision(status=run["status"])  # until the spec changes, and deleted by its TTL as any finished run
        apply_ttl(spec, d, now)
        if d.delete_run:
            kube.delete("FusionRun", ns, name)
        return d
    served: list[set[str]] = []  # discovery, asked at most once, only when needed

    def ask() -> set[str]:
        if not served:
            served.append(served_backends(kube))
        return served[0]

    backend = training_backend(run, spec, ask)  # `auto` asks only until status.training records it
    if backend is None:  # `auto` and neither is served (a run admitted by an earlier operator version)
        return _refuse(kube, run, str(backend_refusal(name, spec, None, ask())), admitted, now, post_event)
    refusals = admit(kube, run, spec, admitted, backend, served[0] if served else None)
    if refusals:  # a child the apiserver refuses: nothing is created (docs/operator.md, "Admission")
        return _refuse(kube, run, refusal_message(refusals), admitted, now, post_event)
    written: list[Obj] = []
    observed = _adopt_orphans(kube, observed, name, uid, written)
    state = run_state if run_state is not None else (RUN_STATE if settings.read_run_state else None)
    committed = (lambda stage: state.committed(uid, spec, stage)) if state is not None else None
    d = decide(run, spec, observed, now, settings, committed=committed, backend=backend)
    d.status["admittedHash"] = admitted
    refused = _create_absent(kube, d, observed, name, uid, written)
    if refused or written:
        have = {_key(c) for c in observed.children}
        observed = replace(observed, children=[*observed.children, *(w for w in written if _key(w) not in have)])
        if refused:  # decide again: the stage fails (or stalls, for a quota) with the apiserver's message
            d = decide(run, spec, observed, now, settings, refused, committed, backend)
            d.status["admittedHash"] = admitted
    for kind, child in d.delete:
        kube.delete(kind, ns, child)
    _patch_status(kube, run, d, observed, now, post_event, written)
    if d.delete_run:
        kube.delete("FusionRun", ns, name)
    d.written = written
    return d


def _refuse(kube: Kube, run: Obj, message: str, admitted: str, now: datetime, post_event: Any) -> Decision:
    """The spec's children are refused by the apiserver: Failed, SpecInvalid, one Warning Event."""
    meta, old = run["metadata"], run.get("status") or {}
    status = refused_status(run, message, admitted, now)
    written = [kube.merge_patch("FusionRun", meta["namespace"], meta["name"],
                                {"status": _nulls_for_removed(old, status)}, sub="status")]
    (post_event or kube.event)(run, "Warning", "SpecInvalid", message, timestamp(now))
    return Decision(status=status, written=written)


def _key(obj: Obj) -> Key:
    return obj["kind"], obj["metadata"]["name"]


def _adopt_orphans(kube: Kube, observed: Observed, name: str, uid: str, written: list[Obj]) -> Observed:
    """Adopt labelled children that lost (or never had) their owner reference."""
    children = []
    for child in observed.children:
        if not is_owned(child, uid) and not _controlled_by_other(child, uid):
            child = _adopt(kube, child, name, uid)
            written.append(child)
        children.append(child)
    return replace(observed, children=children)


def _create_absent(kube: Kube, d: Decision, observed: Observed, name: str, uid: str,
                   written: list[Obj]) -> dict[Key, str]:
    """Create the wanted children the watches have not shown; returns the refusals that retrying cannot fix."""
    have = {_key(c) for c in observed.children}
    refused: dict[Key, str] = {}
    for obj in d.create:
        if _key(obj) in have:
            continue
        try:
            made = kube.create(with_owner(obj, name, uid)) or _existing(kube, obj, name, uid)
        except ApiError as e:
            if retryable(e):
                raise
            refused[_key(obj)] = e.message
            continue
        written.append(made)
    return refused


def _patch_status(kube: Kube, run: Obj, d: Decision, observed: Observed, now: datetime, post_event: Any,
                  written: list[Obj]) -> None:
    """Patch the status (with the stage summaries read from pods) only if it changed, an Event per transition."""
    meta, old = run["metadata"], run.get("status") or {}
    if read_summaries(observed.pods, old, d.status, now) and d.requeue is None:
        d.requeue, d.reason = SUMMARY_RETRY_S, "a stage pod's termination message (its summary)"
    if _comparable(d.status) == _comparable(old):
        return
    written.append(kube.merge_patch("FusionRun", meta["namespace"], meta["name"],
                                    {"status": _nulls_for_removed(old, d.status)}, sub="status"))
    for etype, reason, message in transitions(old, d.status):
        (post_event or kube.event)(run, etype, reason, message, timestamp(now))


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

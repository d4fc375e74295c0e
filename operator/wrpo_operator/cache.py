"""What the watches saw, indexed by run (docs/operator.md, "Reconcile"). kopf's watch streams feed it (one
LIST + WATCH per kind, filtered server-side by the `fusion.wrpo.io/run` label); `reconcile` reads a run's
children, pods, Warning Events and Kueue's Workloads from it instead of listing them; the operator's own
writes go in at once (a write's response is newer than any event about it still in flight).

Children are matched to their run by owner UID (a re-created run with the same name never sees the old
run's children), pods by the run-UID label; orphans labelled with a run's name are offered for adoption.
Objects that carry the run's labels but are controlled by one of its children's controllers (the Jobs JobSet
makes of a TrainJob's runtime) are the run's descendants, matched by the run-UID label like pods.
Events and Workloads go with the child, descendant or pod they are about (the involved object, the
Workload's owner).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from wrpo_operator import LABEL_RUN, LABEL_RUN_UID
from wrpo_operator.decide import Observed
from wrpo_operator.queueing import trim_workload, workload_owner
from wrpo_operator.stalls import CREATE_FAILURES, MOUNT_FAILURES

Obj = dict[str, Any]
RunKey = tuple[str, str]  # (namespace, name)
ObjKey = tuple[str, str, str]  # (kind, namespace, name)


def _meta(obj: Obj) -> Obj:
    return obj.get("metadata") or {}


def _rv(obj: Obj) -> int | None:
    """resourceVersion as a number when it is one (etcd's revision; opaque by contract, so only used to
    refuse an event older than what a write returned)."""
    try:
        return int(_meta(obj).get("resourceVersion", ""))
    except ValueError:
        return None


def _controller_uid(obj: Obj) -> str | None:
    for ref in _meta(obj).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def trim(obj: Obj) -> Obj:
    """Without managedFields and the last-applied annotation (most of an object's size)."""
    meta = dict(_meta(obj))
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and "kubectl.kubernetes.io/last-applied-configuration" in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items()
                               if k != "kubectl.kubernetes.io/last-applied-configuration"}
    return {**obj, "metadata": meta}


def trim_pod(pod: Obj) -> Obj:
    """What stall detection, the GPU budget (the containers' GPU requests) and the stage's results need of a
    pod."""
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    gpu = "nvidia.com/gpu"
    containers = []
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("requests") or {}).get(gpu) or (res.get("limits") or {}).get(gpu)
        if value:
            containers.append({"name": c.get("name"), "resources": {"requests": {gpu: value}}})
    return {
        "kind": "Pod",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "labels", "deletionTimestamp",
                                          "resourceVersion", "ownerReferences") if k in meta},
        "spec": {"schedulingGates": spec.get("schedulingGates") or [], "containers": containers},
        "status": {k: status[k] for k in ("phase", "conditions", "containerStatuses", "initContainerStatuses",
                                          "reason", "message") if k in status},
    }


def trim_event(event: Obj) -> Obj | None:
    """A Warning Event that says pod creation was refused, or a pod's volumes could not be mounted (None for
    any other Event)."""
    if event.get("reason") not in (*CREATE_FAILURES, *MOUNT_FAILURES):
        return None
    inv = event.get("involvedObject") or {}
    return {"metadata": {k: _meta(event).get(k) for k in ("name", "namespace", "uid", "resourceVersion")},
            "involvedObject": {k: inv.get(k) for k in ("kind", "name", "uid")},
            "reason": event.get("reason"), "message": event.get("message", ""),
            "lastTimestamp": event.get("lastTimestamp") or event.get("eventTime") or "",
            "firstTimestamp": event.get("firstTimestamp") or event.get("eventTime") or "",
            "count": event.get("count", 1)}


class Cache:
    def __init__(self):
        self._lock = threading.RLock()
        self.runs: dict[RunKey, Obj] = {}
        self._run_by_uid: dict[str, RunKey] = {}
        self._objects: dict[ObjKey, Obj] = {}  # children, pods and events
        self._by_owner: dict[str, set[ObjKey]] = defaultdict(set)  # run UID → children it controls
        self._orphans: dict[RunKey, set[ObjKey]] = defaultdict(set)  # (ns, run label) → uncontrolled children
        self._pods: dict[str, set[ObjKey]] = defaultdict(set)  # run UID label → pods
        self._descendants: dict[str, set[ObjKey]] = defaultdict(set)  # run UID label → JobSet's Jobs
        self._events: dict[str, set[ObjKey]] = defaultdict(set)  # involved object's UID → events
        self._jobset_events: dict[tuple[str, str], set[ObjKey]] = defaultdict(set)  # (ns, JobSet) → its events
        self._workloads: dict[str, set[ObjKey]] = defaultdict(set)  # owner's UID → Kueue's Workloads
        self._child_by_uid: dict[str, ObjKey] = {}  # children and pods (the objects Events are about)
        self._gone: dict[ObjKey, str] = {}  # deleted by us: ignore older events of that UID until its DELETED

    # -- runs ------------------------------------------------------------------------------------------
    def put_run(self, run: Obj) -> RunKey:
        key = (_meta(run)["namespace"], _meta(run)["name"])
        with self._lock:
            have = self.runs.get(key)
            if have is not None and _meta(have).get("uid") == _meta(run).get("uid"):
                old, new = _rv(have), _rv(run)
                if old is not None and new is not None and new < old:
                    return key
            self.runs[key] = trim(run)
            self._run_by_uid[_meta(run)["uid"]] = key
        return key

    def drop_run(self, run: Obj) -> RunKey:
        key = (_meta(run)["namespace"], _meta(run)["name"])
        with self._lock:
            have = self.runs.get(key)
            if have is not None and _meta(have).get("uid") == _meta(run).get("uid"):
                del self.runs[key]
            self._run_by_uid.pop(_meta(run).get("uid", ""), None)
        return key

    def run(self, key: RunKey) -> Obj | None:
        with self._lock:
            return self.runs.get(key)

    # -- children, pods, events ------------------------------------------------------------------------
    def put(self, obj: Obj) -> list[RunKey]:
        """A child, pod, Event or Workload as a watch (or our write) shows it; returns the runs it concerns."""
        kind = obj.get("kind") or ("Event" if "involvedObject" in obj else "")
        if kind == "Pod":
            obj = trim_pod(obj)
        elif kind == "Event":
            trimmed = trim_event(obj)
            if trimmed is None:
                return []
            obj = {**trimmed, "kind": "Event"}
        elif kind == "Workload":
            obj = trim_workload(obj)
        else:
            obj = trim(obj)
        key = (kind, _meta(obj).get("namespace", ""), _meta(obj)["name"])
        with self._lock:
            if key in self._gone and self._gone[key] == _meta(obj).get("uid"):
                return []  # an event older than our delete
            have = self._objects.get(key)
            if have is not None and _meta(have).get("uid") == _meta(obj).get("uid"):
                old, new = _rv(have), _rv(obj)
                if old is not None and new is not None and new < old:
                    return self._wakes(have)
            if have is not None:
                self._unindex(key, have)
            self._objects[key] = obj
            self._index(key, obj)
            return self._wakes(obj)

    def remove(self, obj: Obj, ours: bool = False) -> list[RunKey]:
        """A DELETED event (or our own delete: `ours`, whose UID may be unknown)."""
        kind = obj.get("kind") or ("Event" if "involvedObject" in obj else "")
        key = (kind, _meta(obj).get("namespace", ""), _meta(obj).get("name", ""))
        with self._lock:
            if not ours:
                self._gone.pop(key, None)
            have = self._objects.pop(key, None)
            if have is None:
                return []
            self._unindex(key, have)
            if ours:
                if len(self._gone) > 10000:  # a bound: DELETED events normally clear them
                    self._gone.pop(next(iter(self._gone)))
                self._gone[key] = _meta(have).get("uid", "")
            return self._wakes(have)

    @staticmethod
    def _slot_of(key: ObjKey, obj: Obj) -> tuple[str, Any] | None:
        kind, ns, _ = key
        labels = _meta(obj).get("labels") or {}
        if kind == "Pod":
            return "_pods", labels.get(LABEL_RUN_UID, "")
        if kind == "Event":
            inv = obj["involvedObject"]
            if inv.get("kind") == "JobSet":  # a TrainJob's, of its name: the JobSet is not watched, its UID unknown
                return "_jobset_events", (ns, inv.get("name") or "")
            return "_events", inv.get("uid") or ""
        if kind == "Workload":
            return "_workloads", workload_owner(obj)
        if (uid := _controller_uid(obj)) is not None:
            if labels.get(LABEL_RUN_UID, uid) != uid:  # the run's labels, another controller: a child's made it
                return "_descendants", labels[LABEL_RUN_UID]
            return "_by_owner", uid
        if LABEL_RUN in labels:
            return "_orphans", (ns, labels[LABEL_RUN])
        return None

    def _index(self, key: ObjKey, obj: Obj) -> None:
        if key[0] not in ("Event", "Workload") and _meta(obj).get("uid"):
            self._child_by_uid[_meta(obj)["uid"]] = key
        slot = self._slot_of(key, obj)
        if slot is not None:
            getattr(self, slot[0])[slot[1]].add(key)

    def _unindex(self, key: ObjKey, obj: Obj) -> None:
        self._child_by_uid.pop(_meta(obj).get("uid", ""), None)
        slot = self._slot_of(key, obj)
        if slot is not None:
            index = getattr(self, slot[0])
            group = index.get(slot[1])
            if group is not None:
                group.discard(key)
                if not group:
                    del index[slot[1]]

    def _wakes(self, obj: Obj) -> list[RunKey]:
        kind, meta = obj.get("kind"), _meta(obj)
        if kind == "Pod":
            key = self._run_by_uid.get((meta.get("labels") or {}).get(LABEL_RUN_UID, ""))
            return [key] if key else []
        if kind in ("Event", "Workload"):
            about = obj["involvedObject"].get("uid") if kind == "Event" else workload_owner(obj)
            child_key = self._child_by_uid.get(about or "")
            if kind == "Event" and obj["involvedObject"].get("kind") == "JobSet":
                child_key = ("TrainJob", meta.get("namespace", ""), obj["involvedObject"].get("name") or "")
            return self._wakes(self._objects[child_key]) if child_key in self._objects else []
        uid = _controller_uid(obj)
        if uid is not None:  # a child's controlling run, else (a descendant) the run its label names
            key = self._run_by_uid.get(uid) or self._run_by_uid.get((meta.get("labels") or {}).get(LABEL_RUN_UID, ""))
            return [key] if key else []
        label = (meta.get("labels") or {}).get(LABEL_RUN)
        return [(meta.get("namespace", ""), label)] if label else []

    def observed(self, run: Obj) -> Observed:
        """A run's children (controlled by it, or orphans labelled with its name), pods, create failures and
        Kueue's Workloads of its children and pods, and its descendants (JobSet's Jobs) with their create
        failures."""
        meta = _meta(run)
        uid, ns = meta.get("uid", ""), meta.get("namespace", "")
        with self._lock:
            children = [self._objects[k] for k in sorted(self._by_owner.get(uid, ()))]
            children += [self._objects[k] for k in sorted(self._orphans.get((ns, meta.get("name", "")), ()))]
            pods = [self._objects[k] for k in sorted(self._pods.get(uid, ()))]
            descendants = [self._objects[k] for k in sorted(self._descendants.get(uid, ()))]
            uids = {_meta(c).get("uid") for c in [*children, *pods]}
            events = [self._objects[k] for u in uids | {_meta(d).get("uid") for d in descendants}
                      for k in sorted(self._events.get(u or "", ()))]
            events += [e for c in children if c.get("kind") == "TrainJob"
                       for e in self._jobset_events_of(ns, c)]
            workloads = [self._objects[k] for u in uids for k in sorted(self._workloads.get(u or "", ()))]
        return Observed(children, pods, events, workloads, descendants)

    def _jobset_events_of(self, ns: str, trainjob: Obj) -> list[Obj]:
        """Events on the JobSet of `trainjob` (Trainer names it after the TrainJob): those since the TrainJob's
        creation (an earlier TrainJob of that name had a JobSet of that name too)."""
        created = _meta(trainjob).get("creationTimestamp") or ""
        return [e for k in sorted(self._jobset_events.get((ns, _meta(trainjob).get("name", "")), ()))
                if ((e := self._objects[k]).get("firstTimestamp") or e.get("lastTimestamp") or "") >= created]

    def sizes(self) -> dict[str, int]:
        with self._lock:
            kinds: dict[str, int] = defaultdict(int)
            for kind, _, _ in self._objects:
                kinds[kind] += 1
            return {"FusionRun": len(self.runs), **kinds}

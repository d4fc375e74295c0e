"""Kueue's word on a run's children (docs/operator.md, "Kueue"): the Workloads Kueue makes for a suspended
Job or PyTorchJob and for each gated vLLM pod, trimmed for the watch cache, and why one waits.

Kueue names no run on a Workload (it copies only `labelKeysToCopy`), but it owns it: the Workload's
controller owner is the Job, PyTorchJob or pod it admits. So the cache keeps Workloads by their owner's UID,
like Warning Events by their involved object's, and a Workload's change wakes the run of its owner. Read
from `kueue.x-k8s.io/v1beta2`, which Kueue serves from v0.15 on; without it (no Kueue, or an older one) no
Workload is seen and a held stage says only which queue holds it.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

#: (group, version, plural) of Kueue's Workloads as the operator watches them.
WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
#: The Workload conditions that say whether and why it waits (Kueue's `QuotaReserved`, `Admitted`,
#: `Evicted`).
_CONDITIONS = ("QuotaReserved", "Admitted", "Evicted")


def trim_workload(wl: Obj) -> Obj:
    """What the operator reads of a Workload: its owners and its admission conditions."""
    meta = wl.get("metadata") or {}
    conditions = [
        {k: c.get(k) for k in ("type", "status", "reason", "message")}
        for c in (wl.get("status") or {}).get("conditions") or []
        if c.get("type") in _CONDITIONS
    ]
    return {
        "kind": "Workload",
        "metadata": {
            **{k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
            "ownerReferences": [
                {k: o.get(k) for k in ("kind", "name", "uid", "controller")} for o in meta.get("ownerReferences") or []
            ],
        },
        "spec": {"queueName": (wl.get("spec") or {}).get("queueName")},
        "status": {"conditions": conditions},
    }


def workload_owner(wl: Obj) -> str:
    """The UID of the object a Workload admits (its controller owner; else its first owner)."""
    owners = (wl.get("metadata") or {}).get("ownerReferences") or []
    chosen = next((o for o in owners if o.get("controller")), owners[0] if owners else {})
    return chosen.get("uid") or ""


def _condition(wl: Obj, ctype: str) -> Obj:
    return next((c for c in (wl.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), {})


def pending_reason(wl: Obj) -> str | None:
    """Why Kueue has not admitted the Workload (its `QuotaReserved=False` message, or an eviction's), or None
    when it is admitted or Kueue said nothing yet."""
    if _condition(wl, "Admitted").get("status") == "True":
        return None
    for ctype in ("Evicted", "QuotaReserved"):
        cond = _condition(wl, ctype)
        if cond.get("status") == ("True" if ctype == "Evicted" else "False") and cond.get("message"):
            return f"{cond.get('reason') or ctype}: {cond['message']}"
    return None


def kueue_reasons(subjects: list[tuple[str, str]], workloads: list[Obj]) -> list[str]:
    """`<subject>: <reason>` for each (subject, UID) whose Workload waits with a reason Kueue gave."""
    by_owner = {workload_owner(wl): wl for wl in workloads}
    out = []
    for subject, uid in subjects:
        wl = by_owner.get(uid) if uid else None
        reason = pending_reason(wl) if wl is not None else None
        if reason:
            out.append(f"{subject}: {reason}")
    return out

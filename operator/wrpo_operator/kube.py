"""The operator's only door to the apiserver for writes: a few REST verbs over `kubernetes.client.ApiClient`,
each call counted (the `wrpo_apiserver_requests_total` metric). Reads come from the watches (`cache`);
`on_change` tells the cache what a write returned, so the next reconcile sees it before its watch event."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wrpo_operator import FIELD_MANAGER, GROUP, PLURAL, VERSION

Obj = dict[str, Any]

#: kind → (API prefix, plural). The operator touches nothing else (and its RBAC grants nothing else).
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Pod": ("/api/v1", "pods"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PyTorchJob": ("/apis/kubeflow.org/v1", "pytorchjobs"),
    "TrainJob": ("/apis/trainer.kubeflow.org/v1alpha1", "trainjobs"),
    "TrainingRuntime": ("/apis/trainer.kubeflow.org/v1alpha1", "trainingruntimes"),
    "FusionRun": (f"/apis/{GROUP}/{VERSION}", PLURAL),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),  # leader election
}


class ApiError(Exception):
    """An apiserver error: `status` (HTTP), `reason`, and the Status object's `message`."""

    def __init__(self, status: int, reason: str, body: str = ""):
        self.status, self.reason, self.body = status, reason, body
        try:
            message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            message = body
        self.message = str(message)[:1000]
        super().__init__(f"{status} {reason}: {self.message}"[:500])


#: HTTP statuses of a refused creation that retrying the same request cannot fix.
NOT_RETRYABLE = (400, 403, 404, 422)


#: Refusals that pass once a cache catches up: an admission plugin that does not know the FusionRun kind yet
#: (OwnerReferencesPermissionEnforcement resolves owners by discovery, which lags a freshly installed CRD by a
#: few seconds), and the TrainJob webhooks of Trainer and of Kueue (`vtrainjob.kb.io`, "runtime '<name>' not
#: found"), whose informers have not seen the TrainingRuntime the operator's watch already showed
#: (docs/operator.md, "Training backends").
RUNTIME_NOT_SEEN = ("specified trainingRuntime must be created before the TrainJob", "vtrainjob.kb.io")
CACHE_LAG = ("no matches for kind", *RUNTIME_NOT_SEEN)


def retryable(e: ApiError) -> bool:
    """Worth retrying as is: server errors, throttling, conflicts, and refusals of a lagging cache (CACHE_LAG)."""
    return e.status not in NOT_RETRYABLE or any(m in e.message for m in CACHE_LAG)


@dataclass
class Kube:
    """Namespaced REST verbs on the kinds in RESOURCES. `calls` counts (verb, kind)."""

    api_client: Any
    calls: Counter = field(default_factory=Counter)
    on_change: Callable[[str, Obj], None] | None = None  # ("write", object) or ("delete", {kind, metadata})
    on_request: Callable[[str, str, float], None] | None = None  # (verb, kind, seconds) of every request
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _changed(self, what: str, obj: Obj) -> Obj:
        if self.on_change is not None and obj:
            self.on_change(what, obj)
        return obj

    def _path(self, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def request(self, verb: str, kind: str, method: str, path: str, body: Any = None,
                query: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> Obj:
        with self._lock:
            self.calls[(verb, kind)] += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api_client.param_serialize(
            method, path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        started = time.monotonic()
        resp = self.api_client.call_api(method, url, headers, body)
        resp.read()
        if self.on_request is not None:
            self.on_request(verb, kind, time.monotonic() - started)
        text = resp.data.decode() if isinstance(resp.data, bytes) else (resp.data or "")
        if resp.status >= 400:
            raise ApiError(resp.status, resp.reason or "", text)
        return json.loads(text) if text else {}

    def served(self, kind: str) -> bool:
        """Whether the apiserver serves `kind` (its group version's discovery document lists its plural);
        discovery needs no RBAC beyond being authenticated."""
        prefix, plural = RESOURCES[kind]
        try:
            found = self.request("discover", kind, "GET", prefix)
        except ApiError as e:
            if e.status in (404, 503):  # no such group version, or its aggregated server is down
                return False
            raise
        return any(r.get("name") == plural for r in found.get("resources") or [])

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.request("get", kind, "GET", self._path(kind, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def create(self, obj: Obj, dry_run: bool = False) -> Obj | None:
        """Create `obj`; None when it already exists (create-if-absent)."""
        kind, ns = obj["kind"], obj["metadata"]["namespace"]
        query = [("fieldManager", FIELD_MANAGER)] + ([("dryRun", "All")] if dry_run else [])
        try:
            made = self.request("create", kind, "POST", self._path(kind, ns), body=obj, query=query)
        except ApiError as e:
            if e.status == 409:
                return None
            raise
        return made if dry_run else self._changed("write", made)

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Obj, sub: str | None = None) -> Obj:
        return self._changed("write", self.request(
            "patch" + (f"/{sub}" if sub else ""), kind, "PATCH", self._path(kind, namespace, name, sub), body=patch,
            query=[("fieldManager", FIELD_MANAGER)], content_type="application/merge-patch+json"))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (pods go too); False when already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        gone = {"kind": kind, "metadata": {"name": name, "namespace": namespace}}
        try:
            self.request("delete", kind, "DELETE", self._path(kind, namespace, name), body=body)
        except ApiError as e:
            if e.status == 404:
                self._changed("delete", gone)
                return False
            raise
        self._changed("delete", gone)
        return True

    def event(self, involved: Obj, etype: str, reason: str, message: str, now: str) -> None:
        """A core/v1 Event on the FusionRun (`kubectl describe fr` shows it)."""
        meta = involved["metadata"]
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"],
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "type": etype, "reason": reason, "message": message[:1024],
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
        }
        self.request("create", "Event", "POST", self._path("Event", meta["namespace"]), body=body)

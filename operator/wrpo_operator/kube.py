"""The operator's only door to the apiserver: a few REST verbs over `kubernetes.client.ApiClient`,
each call counted (for the report's "API calls per run" and the `wrpo_operator_api_calls_total` metric)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wrpo_operator import FIELD_MANAGER, GROUP, PLURAL, VERSION

Obj = dict[str, Any]

#: kind → (API prefix, plural). The operator touches nothing else (and its RBAC grants nothing else).
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),  # read only: a finished stage's termination message (status.eval)
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PyTorchJob": ("/apis/kubeflow.org/v1", "pytorchjobs"),
    "FusionRun": (f"/apis/{GROUP}/{VERSION}", PLURAL),
}
#: Kinds of children, in the order reconcile lists them.
CHILD_KINDS = ("ConfigMap", "Deployment", "Service", "Job", "PyTorchJob")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, body: str = ""):
        self.status, self.reason, self.body = status, reason, body
        try:
            message = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            message = body
        super().__init__(f"{status} {reason}: {message}"[:500])


@dataclass
class Kube:
    """Namespaced REST verbs on the kinds in RESOURCES. `calls` counts (verb, kind)."""

    api_client: Any
    calls: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        resp = self.api_client.call_api(method, url, headers, body)
        resp.read()
        text = resp.data.decode() if isinstance(resp.data, bytes) else (resp.data or "")
        if resp.status >= 400:
            raise ApiError(resp.status, resp.reason or "", text)
        return json.loads(text) if text else {}

    def list(self, kind: str, namespace: str, selector: str) -> list[Obj]:
        """Objects of `kind` matching a label selector; [] when the kind is not served (no CRD)."""
        try:
            items = self.request("list", kind, "GET", self._path(kind, namespace),
                                 query=[("labelSelector", selector)])["items"]
        except ApiError as e:
            if e.status == 404:
                return []
            raise
        for item in items:  # a list's items carry no kind
            item.setdefault("kind", kind)
        return items

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
            return self.request("create", kind, "POST", self._path(kind, ns), body=obj, query=query)
        except ApiError as e:
            if e.status == 409:
                return None
            raise

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Obj, sub: str | None = None) -> Obj:
        return self.request("patch" + (f"/{sub}" if sub else ""), kind, "PATCH",
                            self._path(kind, namespace, name, sub), body=patch,
                            query=[("fieldManager", FIELD_MANAGER)],
                            content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (pods go too); False when already gone."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            self.request("delete", kind, "DELETE", self._path(kind, namespace, name), body=body)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

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

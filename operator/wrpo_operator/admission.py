"""Admission by the cluster itself (docs/operator.md, "Admission"): before anything is created for a new
spec, every child the whole run will create — every stage's Deployments, Services, Jobs, PyTorchJobs,
ConfigMaps and PVCs — is created with a server-side dry run (`dryRun=All`) in the run's namespace, so a
mistake that only a later stage's child shows (a toleration, a volume, an affinity) fails the run before its
first stage holds a GPU. Nothing here re-implements what the apiserver checks: its refusal is mapped back to
the spec field that made the refused part of the child (`spec_field`).

`run_children` is the one renderer of a run's children: the operator dry-runs what it returns and
`wrpo spec validate --cluster --server` does the same from outside the cluster (wrpo/cli/main.py).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from wrpo.pipeline.plan import STAGE_NAMES, STAGES, plan_hashes
from wrpo.pipeline.spec import FusionSpec
from wrpo_operator import LABEL_COMPONENT, LABEL_STAGE
from wrpo_operator.builders import (
    BACKEND_KINDS,
    Obj,
    build_spec_configmap,
    child_name,
    pod_templates,
    stage_children,
    stage_pod_class,
    with_owner,
)
from wrpo_operator.kube import RUNTIME_NOT_SEEN
from wrpo_operator.status import HASH_PREFIX

__all__ = ["Refusal", "dry_run", "refusal_message", "run_children", "spec_field"]

#: Dry-run requests in flight at once (the paper's 10-source run has 45 children: 47 requests).
WORKERS = 16
#: A refusal that says nothing about the spec: the real creation waits for the quota (a stall), not a failure;
#: the TrainJob webhooks (Trainer's, and Kueue's in a namespace Kueue manages) refuse a TrainJob whose
#: TrainingRuntime does not exist yet (in a dry run it never does: the TrainingRuntime is dry-run on its own,
#: and the TrainJob's schema is checked before any webhook).
NOT_THE_SPECS = ("exceeded quota", *RUNTIME_NOT_SEEN)


def run_children(name: str, namespace: str, spec: FusionSpec, uid: str, backend: str = "pytorchjob") -> list[Obj]:
    """Every child the run will create over all its stages and units, as the operator creates it (owner
    reference included): the spec ConfigMap, then `builders.stage_children` of each stage with the stage
    hashes `decide` gives them and the training `backend`. Children shared by stages (a PVC) appear once."""
    hashes = plan_hashes(spec)
    objs = [build_spec_configmap(name, namespace, spec)]
    run_uri = (spec.storage.run_uri or "").rstrip("/")
    for stage in STAGE_NAMES:
        objs += stage_children(name, namespace, spec, stage, run_uri, hashes.stages[stage][:HASH_PREFIX],
                               backend).all()
    seen: set[tuple[str, str]] = set()
    out = []
    for obj in objs:
        key = (obj["kind"], obj["metadata"]["name"])
        if key not in seen:
            seen.add(key)
            out.append(with_owner(obj, name, uid))
    return out


def template_jobs(obj: Obj) -> list[Obj]:
    """A Job for each pod template of a PyTorchJob or TrainingRuntime: the apiserver checks a Job's or
    Deployment's pod template when the child is created, but these only against the CRD's schema (their
    webhooks check neither affinity nor mounts, for one): the rest when their controllers make the pods —
    hours later. Dry-running a Job of the same template asks the apiserver the same question now (with the
    verbs the operator has already: it creates Jobs)."""
    if obj.get("kind") == "PyTorchJob":
        roles = list(obj["spec"]["pytorchReplicaSpecs"])
    elif obj.get("kind") == "TrainingRuntime":
        roles = [r["name"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]
    else:
        return []
    meta = obj["metadata"]
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {**meta, "name": f"{meta['name'][:50]}-{role.lower()}"},
             "spec": {"backoffLimit": 0, "template": template}}
            for role, template in zip(roles, pod_templates(obj), strict=True)]


@dataclass(frozen=True)
class Refusal:
    """The apiserver refused to create `kind`/`name`: its message, and the spec field it maps to (if any)."""

    kind: str
    name: str
    message: str
    field: str | None

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{where}the apiserver refused {self.kind} {self.name}: {self.message}"


#: Refused children named in the status message (a cluster-wide mistake refuses every child with a pod).
SHOWN = 5


def refusal_message(refusals: list[Refusal]) -> str:
    """One line per refused child, the first `SHOWN` (the status message and Event of SpecInvalid)."""
    lines = [str(r) for r in refusals[:SHOWN]]
    if len(refusals) > SHOWN:
        lines.append(f"... and {len(refusals) - SHOWN} more children refused")
    return "\n".join(lines)


def dry_run(kube: Any, objs: list[Obj], spec: FusionSpec | None = None, workers: int = WORKERS) -> list[Refusal]:
    """Create every object (and a Job of each PyTorchJob pod template, `template_jobs`) with `dryRun=All` in
    a small thread pool; the refusals, one per child in the order of `objs`. A refusal worth retrying (a
    server error, throttling) raises, as a real creation's would."""
    from wrpo_operator.kube import ApiError, retryable

    requests = [(o, o) for o in objs] + [(j, o) for o in objs for j in template_jobs(o)]

    def one(pair: tuple[Obj, Obj]) -> Refusal | None:
        body, child = pair
        try:
            kube.create(body, dry_run=True)
        except ApiError as e:
            if any(s in e.message for s in NOT_THE_SPECS):
                return None
            if retryable(e):
                raise
            return Refusal(child["kind"], child["metadata"]["name"], e.message,
                           spec_field(child, _causes(e) or [_field_in(e.message)], spec, body["kind"]))
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(requests)))) as pool:
        found = [r for r in pool.map(one, requests) if r is not None]
    first: dict[tuple[str, str], Refusal] = {}
    for r in found:  # one per child: a PyTorchJob's own refusal before its template Job's
        first.setdefault((r.kind, r.name), r)
    return list(first.values())


def _causes(e: Any) -> list[str]:
    """The field paths of the apiserver's Status `details.causes` (an Invalid refusal lists one per field)."""
    try:
        details = json.loads(e.body).get("details") or {}
    except (ValueError, AttributeError):
        return []
    return [c["field"] for c in details.get("causes") or [] if c.get("field")]


_FIELD_IN_MESSAGE = re.compile(r"(?:^|: )((?:metadata|spec)(?:\.[A-Za-z]+(?:\[\d+\])?)+)")


def _field_in(message: str) -> str:
    m = _FIELD_IN_MESSAGE.search(message)
    return m.group(1) if m else ""


# -- from a child's field to the spec's ------------------------------------------------------------

#: Where a child's pod template lives, by kind (the PyTorchJob's replica is any of Master/Worker).
_TEMPLATE = {
    "Deployment": r"spec\.template\.",
    "Job": r"spec\.template\.",
    "PyTorchJob": r"spec\.pytorchReplicaSpecs\[?\.?\w+\]?\.template\.",
    "TrainingRuntime": r"spec\.template\.spec\.replicatedJobs\[\d+\]\.template\.spec\.template\.",
}
#: A pod spec field → the spec field that fills it (`builders._pod_spec`, `_template_metadata`). `{c}` is the
#: pod class; a list that concatenates the cluster-wide list and the class's is resolved by index.
_POD_FIELDS: list[tuple[str, str]] = [
    (r"spec\.tolerations\[(\d+)\]", "tolerations"),
    (r"spec\.tolerations", "tolerations"),
    (r"spec\.volumes\[(\d+)\]", "volumes"),
    (r"spec\.(?:init)?[cC]ontainers\[\d+\]\.volumeMounts\[(\d+)\]", "volumeMounts"),
    (r"spec\.(?:init)?[cC]ontainers\[\d+\]\.image", "image"),
    (r"spec\.(?:init)?[cC]ontainers\[\d+\]\.resources", "resources"),
    (r"spec\.(?:init)?[cC]ontainers\[\d+\]\.env", "env"),
    (r"spec\.affinity", "cluster.pods.{c}.affinity"),
    (r"spec\.nodeSelector", "cluster.nodeSelector or cluster.pods.{c}.nodeSelector"),
    (r"spec\.priorityClassName", "cluster.pods.{c}.priorityClassName"),
    (r"spec\.schedulerName", "cluster.pods.{c}.schedulerName"),
    (r"spec\.imagePullSecrets", "cluster.imagePullSecrets or cluster.pods.{c}.imagePullSecrets"),
    (r"spec\.serviceAccountName", "cluster.serviceAccount"),
    (r"metadata\.annotations", "cluster.podAnnotations or cluster.pods.{c}.annotations"),
    (r"metadata\.labels", "cluster.pods.{c}.labels"),
]
#: Fields of the child itself (not its pods).
_CHILD_FIELDS: dict[str, list[tuple[str, str]]] = {
    "PersistentVolumeClaim": [(r"spec\.storageClassName", "cluster.checkpoints.storageClassName"),
                              (r"spec\.accessModes", "cluster.checkpoints.accessModes"),
                              (r"spec\.resources", "cluster.checkpoints.size")],
    "Job": [(r"spec\.activeDeadlineSeconds", "cluster.activeDeadlineSeconds"),
            (r"spec\.backoffLimit", "cluster.backoffLimit")],
    "PyTorchJob": [(r"spec\.runPolicy\.activeDeadlineSeconds", "cluster.activeDeadlineSeconds"),
                   (r"spec\.runPolicy\.schedulingPolicy", "cluster.schedulingPolicy")],
    "TrainingRuntime": [(r"spec\.mlPolicy", "cluster.training"),
                        (r"spec\.template\.spec\.replicatedJobs\[\d+\]\.template\.spec\.activeDeadlineSeconds",
                         "cluster.activeDeadlineSeconds"),
                        (r"spec\.template\.spec\.failurePolicy", "cluster.backoffLimit")],
    "TrainJob": [(r"spec\.trainer", "cluster.training")],
}


def pod_class(child: Obj) -> str:
    """The pod class (`cluster.pods.<class>`) of a child's pods: `vllm` for the servers, else its stage's."""
    lab = (child.get("metadata") or {}).get("labels") or {}
    if lab.get(LABEL_COMPONENT) == "vllm":
        return "vllm"
    return stage_pod_class(lab.get(LABEL_STAGE) or "")


def spec_field(child: Obj, fields: list[str], spec: FusionSpec | None = None, as_kind: str | None = None) -> str | None:
    """The spec field behind the first of `fields` (the apiserver's field paths in `child`, e.g.
    `spec.template.spec.tolerations[0]` of a stage Job; `as_kind`: in the `template_jobs` Job of a
    PyTorchJob) that the table knows; None if none is known. With `spec`, an index into a merged list names
    its entry."""
    kind = as_kind or child.get("kind", "")
    for field in fields:
        found = _child_field(kind, field) or _pod_field(child, kind, field, spec)
        if found:
            return found
    return None


def _child_field(kind: str, field: str) -> str | None:
    for pattern, target in _CHILD_FIELDS.get(kind, []):
        if re.match(pattern, field):
            return target
    return None


def _pod_field(child: Obj, kind: str, field: str, spec: FusionSpec | None) -> str | None:
    prefix = _TEMPLATE.get(kind)
    if prefix is None:
        return None
    m = re.match(prefix, field)
    if m is None:
        return None
    rest, cls = field[m.end():], pod_class(child)
    for pattern, target in _POD_FIELDS:
        hit = re.match(pattern, rest)
        if hit is None:
            continue
        if "." in target:
            return target.format(c=cls)
        index = int(hit.group(1)) if hit.groups() else None
        return _indexed(child, kind, rest, target, cls, index, spec)
    return None


def _indexed(child: Obj, kind: str, rest: str, what: str, cls: str, index: int | None,
             spec: FusionSpec | None) -> str:
    """A field of a list the builders make from the operator's own (or the cluster-wide) entries followed by
    the class's, `cluster.pods.<class>.<what>`: which spec entry the refused index is."""
    pods = f"cluster.pods.{cls}"
    template = (pod_templates(child) or [{}])[0]  # a `template_jobs` Job's is its PyTorchJob's
    pod = template.get("spec") or {}
    settings = getattr(spec.cluster.pods, cls) if spec is not None else None
    if what in ("tolerations", "volumes", "volumeMounts"):
        have = (_container(pod, rest) if what == "volumeMounts" else pod).get(what) or []
        mine = len(getattr(settings, {"volumeMounts": "volume_mounts"}.get(what, what))) if settings else None
        if index is None or mine is None:
            return f"cluster.{what} or {pods}.{what}" if what == "tolerations" else f"{pods}.{what}"
        first = len(have) - mine
        if index >= first:
            return f"{pods}.{what}[{index - first}]"
        return f"cluster.tolerations[{index}]" if what == "tolerations" else f"{pods}.{what}"
    if what == "image":
        return "cluster.vllmImage" if cls == "vllm" else "cluster.runtimeImage"
    if what == "resources":
        return "cluster.vllm" if cls == "vllm" else f"cluster.{'small' if cls == 'sampling' else cls}"
    return "cluster.vllm.env" if cls == "vllm" else "cluster.env"


def _container(pod: Obj, rest: str) -> Obj:
    m = re.match(r"spec\.(initContainers|containers)\[(\d+)\]", rest)
    items = (pod.get(m.group(1)) or []) if m else []
    return items[int(m.group(2))] if m and int(m.group(2)) < len(items) else {}


# -- in the reconcile -------------------------------------------------------------------------------

BACKEND_FIELD = "cluster.training.backend"
#: What a training backend needs installed (docs/operator.md, "Training backends").
_INSTALL = {"pytorchjob": "the Kubeflow training-operator v1 (kubeflow.org/v1 PyTorchJob)",
            "trainjob": "Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob)"}


def backend_refusal(name: str, spec: FusionSpec, backend: str | None, served: set[str]) -> Refusal | None:
    """A refusal naming `cluster.training.backend` when the resolved `backend` (None: `auto` found none) is not
    among the backends the apiserver `served`; None when it is served."""
    if backend in served:
        return None
    wanted = spec.cluster.training.backend
    kind = BACKEND_KINDS.get(backend or "", "PyTorchJob or TrainJob")
    if backend is None:
        message = (f"auto: the apiserver serves neither {_INSTALL['trainjob']} nor {_INSTALL['pytorchjob']}; "
                   "install one of them")
    else:
        other = next(iter(served), None)
        message = (f"{wanted}: the apiserver does not serve it; install {_INSTALL[backend]}"
                   + (f" or set {BACKEND_FIELD}: {other} (or auto)" if other else ""))
    first = next(row.name for row in STAGES if row.distributed)  # the first training stage's runner
    return Refusal(kind, child_name(name, first), message, BACKEND_FIELD)


def served_backends(kube: Any) -> set[str]:
    """The training backends the apiserver behind `kube` serves (by discovery)."""
    return {b for b, kind in BACKEND_KINDS.items() if kube.served(kind)}


def admit(kube: Any, run: Obj, spec: FusionSpec, spec_hash: str, backend: str = "pytorchjob",
          served: set[str] | None = None) -> list[Refusal] | None:
    """The refusals of the run's children for this spec, dry-running them only if `status.admittedHash` is
    not `spec_hash` already (once per spec hash); None when admitted before. A training `backend` the
    apiserver does not serve (`served`, asked by discovery when not given) is refused first."""
    if (run.get("status") or {}).get("admittedHash") == spec_hash:
        return None
    meta = run["metadata"]
    refused = backend_refusal(meta["name"], spec, backend, served_backends(kube) if served is None else served)
    if refused is not None:
        return [refused]
    return dry_run(kube, run_children(meta["name"], meta["namespace"], spec, meta["uid"], backend), spec)


def refused_status(run: Obj, message: str, spec_hash: str, now: Any) -> Obj:
    """Failed with the SpecInvalid condition (and the refused spec hash, so it is not asked again)."""
    from wrpo_operator.status import derive_conditions, timestamp

    meta, old = run["metadata"], run.get("status") or {}
    gen = meta.get("generation", 1)
    before = [c for c in old.get("conditions") or [] if c["type"] != "SpecInvalid"]
    was = next((c for c in old.get("conditions") or [] if c["type"] == "SpecInvalid"), {})
    since = was["lastTransitionTime"] if was.get("status") == "True" else timestamp(now)
    conditions = derive_conditions("Failed", message, gen, before, now)
    conditions.append({"type": "SpecInvalid", "status": "True", "reason": "ChildRefused", "message": message,
                       "lastTransitionTime": since, "observedGeneration": gen})
    return {"phase": "Failed", "message": message, "observedGeneration": gen, "refusedHash": spec_hash,
            "completionTime": timestamp(now), "conditions": conditions}


# -- from outside the cluster: `wrpo spec validate --cluster --server` ------------------------------

#: The owner UID of children rendered outside the cluster (the run does not exist yet).
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def ask_server(api_client: Any, name: str, namespace: str, spec: FusionSpec,
               workers: int = WORKERS) -> list[str]:
    """What the apiserver behind `api_client` says of a FusionRun `name` with `spec` in `namespace`: the
    FusionRun itself (the CRD's schema and rules) and every child `run_children` renders — the operator's
    own renderer and dry run — created with `dryRun=All`; one line per refusal, none if all are admitted."""
    from wrpo.pipeline.spec import API_VERSION
    from wrpo_operator import KIND
    from wrpo_operator.kube import ApiError, Kube

    kube = Kube(api_client)
    run = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace},
           "spec": spec.model_dump(mode="json", by_alias=True, exclude_none=True)}
    try:
        kube.create(run, dry_run=True)
    except ApiError as e:
        if e.status >= 500 or e.status == 404:
            raise
        return [f"the apiserver refused FusionRun {name}: {e.message}"]
    from wrpo_operator.decide import training_backend

    served = served_backends(kube)
    backend = training_backend(run, spec, lambda: served)
    refused = backend_refusal(name, spec, backend, served)
    if refused is not None:
        return [str(refused)]
    assert backend is not None
    return [str(r) for r in dry_run(kube, run_children(name, namespace, spec, PLACEHOLDER_UID, backend), spec,
                                    workers)]

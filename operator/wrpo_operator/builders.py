"""Pure builders: a FusionSpec (plus the run's name and namespace) → the Kubernetes objects of a stage.

Nothing here talks to the apiserver; `reconcile` adds owner references (`with_owner`) and creates the objects.
Every stage pod runs `wrpo stage <name> --spec /etc/wrpo/spec.yaml --run-uri <run>` from the runtime image,
the vLLM servers run `vllm serve` from the vLLM image. Every pod passes the `restricted` Pod Security
Standard (docs/operator.md, "Security"): seccomp RuntimeDefault, non-root, no privilege escalation, every
capability dropped, no service-account token.

`stage_children` is the one place that says which children a stage has (docs/operator.md, "How a run
proceeds"): its vLLM servers, the volumes it needs, and the runner that starts once the servers are ready.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from wrpo.pipeline.gpus import server_pod_gpus
from wrpo.pipeline.plan import external_endpoints, plan_hashes, servers
from wrpo.pipeline.plan import stage as plan_stage
from wrpo.pipeline.servers import HEALTH_PATH, Server, servers_gpus, vllm_options
from wrpo.pipeline.spec import (
    EndpointSpec,
    EnvVar,
    FusionSpec,
    PodSettings,
    StageResources,
    VLLMResources,
    VolumeSpec,
)
from wrpo.pipeline.strict_yaml import dump_yaml
from wrpo.pipeline.workdir import Workdir
from wrpo_operator import (
    API_VERSION,
    FIELD_MANAGER,
    KIND,
    LABEL_COMPONENT,
    LABEL_RUN,
    LABEL_RUN_UID,
    LABEL_SPEC_HASH,
    LABEL_STAGE,
    LABEL_STAGE_HASH,
    LABEL_TEMPLATE_HASH,
    QUEUE_LABEL,
)
from wrpo_operator.status import HASH_PREFIX

VLLM_PORT = 8000
PYTORCHJOB_PORT = 23456
#: Kubeflow Trainer v2 (docs/operator.md, "Training backends"): the API, the replicatedJob and container its
#: torch plugin injects the rendezvous variables into (PET_*), the label that marks that Job as the trainer,
#: and the port PET_MASTER_PORT names.
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
TRAINER_NODE = "node"
TRAINER_ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
TRAINJOB_PORT = 29500
#: The training backends (`cluster.training.backend`) and the runner kind each creates.
BACKEND_KINDS = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}
#: Volcano's pod annotation naming its queue (cluster.schedulingPolicy.queue on TrainJob pods).
VOLCANO_QUEUE_ANNOTATION = "scheduling.volcano.sh/queue-name"
SPEC_DIR = "/etc/wrpo"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
WEIGHTS_DIR = "/weights"
MODELS_DIR = "/models"
WORK_DIR = "/work"  # the scratch volume: WRPO_WORKDIR (docs/architecture.md, "Workdir"), HF_HOME, HOME
RUN_AS = 1000  # the runtime image's user; the vLLM image runs as it too
Obj = dict[str, Any]

#: Pod and container security contexts of the `restricted` Pod Security Standard.
POD_SECURITY: Obj = {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
                     "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: Obj = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                           "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
#: `cluster` fields that shape no child (left out of the template hash).
_NOT_IN_TEMPLATES = ("ttlSecondsAfterFinished", "stallTimeoutSeconds")
#: `cluster` fields that only the pods of one class read (the rest shape every pod). A pod class is a plan
#: row's resource class, or `vllm` for the servers; `cluster.pods.<class>` holds its settings.
_POD_CLASS_FIELDS = {
    "vllm": ("vllm", "modelVolume"),
    "small": ("small",),
    "sampling": ("small",),
    "scoring": ("scoring",),
    "training": ("training", "schedulingPolicy", "checkpoints"),
}


def child_name(run_name: str, suffix: str) -> str:
    """`<run>-<suffix>`, shortened with a hash to a 63-character DNS label when too long."""
    name = f"{run_name}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def _digest(payload: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:n]


def template_hash(spec: FusionSpec, pod_class: str, stage_hash: str | None) -> str:
    """What the user controls in a child's pods: the stage hash and the `cluster` fields that shape pods of
    this class, defaults left out. A child whose label differs is replaced (docs/operator.md, "Spec
    changes"); a new operator version that builds pods differently, or a new `cluster` field at its
    default, changes no label and so restarts nothing."""
    cluster = spec.cluster.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    mine = set(_POD_CLASS_FIELDS[pod_class])
    others = {f for fields in _POD_CLASS_FIELDS.values() for f in fields} - mine
    shaping = {k: v for k, v in cluster.items() if k not in others and k not in _NOT_IN_TEMPLATES}
    class_pods = shaping.pop("pods", {}).get(pod_class)
    if class_pods:
        shaping["pods"] = class_pods
    # the key stays "component" (the name of a pod class before): a renamed key would change every hash
    return _digest({"stage": stage_hash, "component": pod_class, "cluster": shaping})


def labels(run_name: str, stage: str | None, component: str, stage_hash: str | None = None,
           template: str | None = None) -> dict[str, str]:
    """A child's labels; `component` says what the child is: `vllm`, `stage` (a runner), `spec`, `checkpoints`."""
    out = {
        "app.kubernetes.io/name": "wrpo",
        "app.kubernetes.io/instance": run_name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        LABEL_RUN: run_name,
        LABEL_COMPONENT: component,
    }
    if stage:
        out[LABEL_STAGE] = stage
    if stage_hash:
        out[LABEL_STAGE_HASH] = stage_hash
    if template:
        out[LABEL_TEMPLATE_HASH] = template
    return out


def owner_reference(run_name: str, uid: str) -> Obj:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run_name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def with_owner(obj: Obj, run_name: str, uid: str) -> Obj:
    """`obj` with the FusionRun as its controlling owner (garbage collection deletes it with the run) and the
    run's UID on it and its pods (so a re-created run with the same name never reads the old run's pods)."""
    meta = obj.setdefault("metadata", {})
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != uid]
    meta["ownerReferences"] = [*refs, owner_reference(run_name, uid)]
    meta.setdefault("labels", {}).update({LABEL_RUN: run_name, LABEL_RUN_UID: uid})
    for template in pod_templates(obj):
        template.setdefault("metadata", {}).setdefault("labels", {})[LABEL_RUN_UID] = uid
    for template in job_templates(obj):
        template.setdefault("metadata", {}).setdefault("labels", {}).update({LABEL_RUN: run_name, LABEL_RUN_UID: uid})
    return obj


def is_owned(obj: Obj, uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# -- the spec ConfigMap ---------------------------------------------------------------------------

def spec_text(spec: FusionSpec) -> str:
    """The FusionSpec as stage pods read it (camelCase, defaults filled in)."""
    return _yaml_of(spec.model_dump_json(by_alias=True))


@functools.lru_cache(maxsize=256)
def _yaml_of(spec_json: str) -> str:
    # reconcile builds the spec ConfigMap on every pass: dump each spec once (YAML emitting is slow)
    # read back by the pods' strict loader: ambiguous words quoted ('n': 5), as `dump_spec_yaml` writes it
    return dump_yaml(json.loads(spec_json))


def spec_hash(spec: FusionSpec) -> str:
    """A short hash of the whole spec (names its ConfigMap)."""
    return _digest(spec.model_dump(mode="json", by_alias=True), 10)


def spec_configmap_name(run_name: str, spec: FusionSpec) -> str:
    """One immutable ConfigMap per spec: a pod always reads the spec its child was built from."""
    return child_name(run_name, f"spec-{spec_hash(spec)}")


def build_spec_configmap(run_name: str, namespace: str, spec: FusionSpec) -> Obj:
    """The FusionSpec as /etc/wrpo/spec.yaml for every stage pod; immutable, named by its hash."""
    lab = {**labels(run_name, None, "spec"), LABEL_SPEC_HASH: spec_hash(spec)}
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": spec_configmap_name(run_name, spec), "namespace": namespace, "labels": lab},
        "immutable": True,
        "data": {"spec.yaml": spec_text(spec)},
    }


# -- pieces shared by every pod ---------------------------------------------------------------------

def _env(entries: list[EnvVar]) -> list[Obj]:
    out = []
    for e in entries:
        if e.secret_key_ref is None:
            out.append({"name": e.name, "value": e.value})
            continue
        ref = {"name": e.secret_key_ref.name, "key": e.secret_key_ref.key}
        if e.secret_key_ref.optional:
            ref["optional"] = True
        out.append({"name": e.name, "valueFrom": {"secretKeyRef": ref}})
    return out


def _s3_env(spec: FusionSpec) -> list[Obj]:
    """S3 settings; credentials only as Secret references, so nothing secret is in any object."""
    env: list[Obj] = []
    secret = spec.storage.credentials_secret
    if secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        env.append({"name": "AWS_SESSION_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_SESSION_TOKEN",
                                                   "optional": True}}})
    if spec.storage.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": spec.storage.s3_endpoint})
    if spec.storage.s3_region:
        env.append({"name": "AWS_REGION", "value": spec.storage.s3_region})
    return env


def _common_env(spec: FusionSpec, pod_class: str) -> list[Obj]:
    """What every container of a pod class gets: the scratch layout, the HF token by reference, then
    `cluster.env` and the class's `env` (later entries win)."""
    env = [{"name": "HOME", "value": f"{WORK_DIR}/home"}, {"name": "WRPO_WORKDIR", "value": WORK_DIR},
           {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"}]
    if spec.cluster.hf_token_secret:
        env.append({"name": "HF_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": spec.cluster.hf_token_secret, "key": "HF_TOKEN"}}})
    return env + _env(spec.cluster.env) + _env(_settings(spec, pod_class).env)


def _api_key_env(endpoints: list[EndpointSpec]) -> list[Obj]:
    """API keys of external endpoints, from their Secrets (key `api-key`) into the named env vars."""
    refs = {e.api_key_env: e.api_key_secret for e in endpoints if e.api_key_secret and e.api_key_env}
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": "api-key"}}}
            for env, secret in refs.items()]


def _resources(res: StageResources, gpus: int | None = None) -> Obj:
    gpus = res.gpus if gpus is None else gpus
    out: Obj = {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": {"memory": res.memory}}
    if gpus:
        out["requests"]["nvidia.com/gpu"] = str(gpus)
        out["limits"]["nvidia.com/gpu"] = str(gpus)
    return out


def _vllm_resources(res: VLLMResources, tensor_parallel_size: int) -> Obj:
    """`cluster.vllm` requests; GPUs default to the server's tensor-parallel size (0: a CPU server)."""
    gpus = server_pod_gpus(tensor_parallel_size, res.gpus)
    gpu = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    # No memory limit: loading large checkpoints peaks above the steady state.
    out: Obj = {"requests": {"cpu": res.cpu, "memory": res.memory, **gpu}}
    if gpu:
        out["limits"] = gpu
    return out


def _settings(spec: FusionSpec, pod_class: str) -> PodSettings:
    """`cluster.pods.<pod_class>`."""
    return getattr(spec.cluster.pods, pod_class)


def _pod_spec(spec: FusionSpec, pod_class: str, containers: list[Obj], volumes: list[Obj], restart: str,
              init: list[Obj] | None = None) -> Obj:
    """A pod spec with the cluster-wide settings and its class's (`cluster.pods.<pod_class>`) merged."""
    c, pods = spec.cluster, _settings(spec, pod_class)
    pod: Obj = {"restartPolicy": restart, "containers": containers, "volumes": [*volumes, *pods.volumes],
                "enableServiceLinks": False, "automountServiceAccountToken": False,
                "securityContext": dict(POD_SECURITY)}
    if init:
        pod["initContainers"] = init
    if c.service_account:
        pod["serviceAccountName"] = c.service_account
    if c.node_selector or pods.node_selector:
        pod["nodeSelector"] = {**c.node_selector, **pods.node_selector}
    if c.tolerations or pods.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True)
                              for t in [*c.tolerations, *pods.tolerations]]
    if pods.affinity:
        pod["affinity"] = dict(pods.affinity)
    if pods.priority_class_name:
        pod["priorityClassName"] = pods.priority_class_name
    if pods.scheduler_name:
        pod["schedulerName"] = pods.scheduler_name
    pull = list(dict.fromkeys([*c.image_pull_secrets, *pods.image_pull_secrets]))
    if pull:
        pod["imagePullSecrets"] = [{"name": n} for n in pull]
    return pod


def _template_metadata(spec: FusionSpec, pod_class: str, lab: dict[str, str]) -> Obj:
    pods = _settings(spec, pod_class)
    meta: Obj = {"labels": {**pods.labels, **lab}}
    if spec.cluster.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.cluster.queue_name
    annotations = {**spec.cluster.pod_annotations, **pods.annotations}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _volume(name: str, vol: VolumeSpec) -> Obj:
    """A generic ephemeral volume (a PVC made with the pod and deleted with it), or a sized emptyDir."""
    if vol.type == "emptyDir":
        return {"name": name, "emptyDir": {"sizeLimit": vol.size}}
    claim: Obj = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": vol.size}}}
    if vol.storage_class_name:
        claim["storageClassName"] = vol.storage_class_name
    return {"name": name, "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}


def _spec_volume(run_name: str, spec: FusionSpec) -> tuple[Obj, Obj]:
    return ({"name": "spec", "configMap": {"name": spec_configmap_name(run_name, spec)}},
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})


def _scratch_volume(spec: FusionSpec) -> tuple[Obj, Obj]:
    return _volume("scratch", spec.cluster.scratch), {"name": "scratch", "mountPath": WORK_DIR}


def _shm_volume(size: str | None = None) -> tuple[Obj, Obj]:
    empty_dir = {"medium": "Memory", **({"sizeLimit": size} if size else {})}
    return ({"name": "dshm", "emptyDir": empty_dir}, {"name": "dshm", "mountPath": "/dev/shm"})


def _models_volume(spec: FusionSpec) -> list[tuple[Obj, Obj]]:
    if not spec.cluster.models_pvc:
        return []
    claim = {"claimName": spec.cluster.models_pvc, "readOnly": True}
    return [({"name": "models", "persistentVolumeClaim": claim},
             {"name": "models", "mountPath": MODELS_DIR, "readOnly": True})]


def checkpoints_pvc_name(run_name: str) -> str:
    return child_name(run_name, "checkpoints")


def checkpoints_mount_path(run_uri: str) -> str:
    """The run's scratch folder under WRPO_WORKDIR (docs/architecture.md, "Workdir"): training checkpoints
    live there, so the per-run PVC mounted here survives a restarted pod."""
    return f"{WORK_DIR}/{Workdir(run_uri).base.name}/scratch"


def build_checkpoints_pvc(run_name: str, namespace: str, spec: FusionSpec) -> Obj:
    """The run's PVC for training checkpoints (kept until the run succeeds; deleted with the run)."""
    ck = spec.cluster.checkpoints
    claim: Obj = {"accessModes": list(ck.access_modes), "resources": {"requests": {"storage": ck.size}}}
    if ck.storage_class_name:
        claim["storageClassName"] = ck.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": checkpoints_pvc_name(run_name), "namespace": namespace,
                         "labels": labels(run_name, None, "checkpoints")},
            "spec": claim}


def _runtime_container(spec: FusionSpec, pod_class: str, name: str, command: list[str], env: list[Obj],
                       mounts: list[Obj], resources: Obj) -> Obj:
    return {
        "name": name, "image": spec.cluster.runtime_image, "imagePullPolicy": spec.cluster.image_pull_policy,
        "command": command, "env": [*_common_env(spec, pod_class), *env], "volumeMounts": mounts,
        "resources": resources, "securityContext": dict(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def stage_command(stage: str, run_uri: str, endpoints: dict[str, str] | None = None,
                  target_endpoint: str | None = None, reward_endpoint: str | None = None,
                  unit: str | None = None, shards: int = 1) -> list[str]:
    """`wrpo stage ...` as the local runner runs it (endpoints of in-cluster servers added); one `unit`
    only, or part `$(JOB_COMPLETION_INDEX)` of `shards` (an Indexed Job's pod: the kubelet expands it)."""
    cmd = ["wrpo", "stage", stage, "--spec", SPEC_FILE, "--run-uri", run_uri]
    if unit:
        cmd += ["--unit", unit]
    if shards > 1:
        cmd += ["--shard", f"$(JOB_COMPLETION_INDEX)/{shards}"]
    for source, url in sorted((endpoints or {}).items()):
        cmd += ["--endpoint", f"{source}={url}"]
    if target_endpoint:
        cmd += ["--target-endpoint", target_endpoint]
    if reward_endpoint:
        cmd += ["--reward-endpoint", reward_endpoint]
    return cmd


# -- vLLM servers -------------------------------------------------------------------------------------

def vllm_url(run_name: str, namespace: str, server: Server, v1: bool = True) -> str:
    url = f"http://{child_name(run_name, server.key)}.{namespace}.svc:{VLLM_PORT}"
    return f"{url}/v1" if v1 else url


def vllm_args(spec: FusionSpec, server: Server, model_path: str) -> list[str]:
    """`vllm serve` arguments of a server pod: the model path, then `wrpo.pipeline.servers.vllm_options` (the
    same options as a local server; a pod without GPUs, `cluster.vllm.gpus: 0`, gets the CPU options)."""
    gpu = server_pod_gpus(server.tensor_parallel_size, spec.cluster.vllm.gpus) > 0
    return [model_path, *vllm_options(server, "0.0.0.0", VLLM_PORT, gpu)]


def _probe(probe: Any) -> Obj:
    """An HTTP probe of the server's health path from `cluster.vllm.*Probe`."""
    out = {"httpGet": {"path": HEALTH_PATH, "port": VLLM_PORT}, "periodSeconds": probe.period_seconds,
           "failureThreshold": probe.failure_threshold, "timeoutSeconds": probe.timeout_seconds}
    if probe.initial_delay_seconds:
        out["initialDelaySeconds"] = probe.initial_delay_seconds
    return out


def progress_deadline_seconds(res: VLLMResources) -> int:
    """How long a server Deployment may take to become Available before it counts as stalled: by default
    the startup probe's whole budget plus two minutes for scheduling and the image pull."""
    if res.progress_deadline_seconds:
        return res.progress_deadline_seconds
    start = res.startup_probe
    return start.initial_delay_seconds + start.period_seconds * start.failure_threshold + 120


def build_vllm_deployment(run_name: str, namespace: str, spec: FusionSpec, server: Server,
                          stage: str, stage_hash: str | None = None) -> Obj:
    """A vLLM Deployment of `server.replicas` pods; weights from the models PVC, or fetched from S3 by an init
    container into `cluster.modelVolume`."""
    name = child_name(run_name, server.key)
    lab = labels(run_name, stage, "vllm", stage_hash, template_hash(spec, "vllm", stage_hash))
    select = {LABEL_RUN: run_name, LABEL_COMPONENT: "vllm", "fusion.wrpo.io/server": server.key}
    pods = _settings(spec, "vllm")
    scratch_vol, scratch_mount = _scratch_volume(spec)
    shm_vol, shm_mount = _shm_volume(spec.cluster.vllm.shm_size)
    volumes, mounts, init = [scratch_vol, shm_vol], [scratch_mount, shm_mount], []
    model_path = server.model
    for vol, mount in _models_volume(spec):
        volumes.append(vol)
        mounts.append(mount)
    if server.model.startswith("s3://"):
        model_path = f"{WEIGHTS_DIR}/model"
        spec_vol, spec_mount = _spec_volume(run_name, spec)
        volumes += [_volume("weights", spec.cluster.model_volume), spec_vol]
        mounts.append({"name": "weights", "mountPath": WEIGHTS_DIR, "readOnly": True})
        init.append(_runtime_container(
            spec, "vllm", "fetch-weights", ["wrpo", "fetch", server.model, model_path], _s3_env(spec),
            [{"name": "weights", "mountPath": WEIGHTS_DIR}, spec_mount, scratch_mount],
            _resources(spec.cluster.small)))
    res = spec.cluster.vllm
    container = {
        "name": "vllm", "image": spec.cluster.vllm_image, "imagePullPolicy": spec.cluster.image_pull_policy,
        "command": ["vllm", "serve"], "args": vllm_args(spec, server, model_path),
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1" if server.model.startswith(("s3://", "/")) else "0"},
                *[{"name": k, "value": v} for k, v in sorted(res.env.items())], *_common_env(spec, "vllm")],
        "resources": _vllm_resources(res, server.tensor_parallel_size),
        "volumeMounts": [*mounts, *pods.volume_mounts],
        # Big models load for many minutes: the startup probe allows that long; then /health must keep passing.
        "startupProbe": _probe(res.startup_probe),
        "readinessProbe": _probe(res.readiness_probe),
        "livenessProbe": _probe(res.liveness_probe),
        "securityContext": dict(CONTAINER_SECURITY),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(lab)}
    if spec.cluster.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.cluster.queue_name
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": server.replicas,  # data-parallel copies behind one Service
            "strategy": {"type": "Recreate"},  # never two servers on the same GPUs
            "progressDeadlineSeconds": progress_deadline_seconds(res),
            "selector": {"matchLabels": select},
            "template": {
                "metadata": _template_metadata(spec, "vllm", {**lab, **select}),
                "spec": {**_pod_spec(spec, "vllm", [container], volumes, "Always", init),
                         "terminationGracePeriodSeconds": 30},
            },
        },
    }


def build_vllm_service(run_name: str, namespace: str, server: Server, stage: str,
                       stage_hash: str | None = None) -> Obj:
    """The server's Service (it carries no template hash: `cluster.*` changes never touch it). Headless: its
    name resolves to the addresses of the Ready server pods, so the sampling client sees every replica and
    spreads its requests over them itself (a ClusterIP would pin each kept-alive connection to one pod) and
    retries a dead replica's requests on the others (docs/operator.md, "Sampling replicas")."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": child_name(run_name, server.key), "namespace": namespace,
                     "labels": labels(run_name, stage, "vllm", stage_hash)},
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_RUN: run_name, LABEL_COMPONENT: "vllm", "fusion.wrpo.io/server": server.key},
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": VLLM_PORT, "protocol": "TCP"}],
        },
    }


# -- stage Jobs and PyTorchJobs ---------------------------------------------------------------------

def stage_pod_class(name: str) -> str:
    """The plan row's resource class: which `cluster.*` section and `cluster.pods.*` settings its pods use."""
    return plan_stage(name).resource_class


def stage_resources(spec: FusionSpec, name: str) -> StageResources:
    """The `cluster.*` section of the stage's resource class (the plan row's `resource_class`)."""
    kind = stage_pod_class(name)
    if kind == "scoring":
        return spec.cluster.scoring
    if kind == "training":
        return spec.cluster.training
    return spec.cluster.small  # small stages and the sampling clients (the servers hold the GPUs)


def stage_args(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
               unit: str | None = None, shards: int = 1, serve: bool = True) -> list[str]:
    """The stage's `wrpo stage` command with the URLs of the servers its plan row needs (of `unit`'s
    servers only, for one unit; none with `serve=False`: the commit of a stage whose units are done)."""
    needed = [s for s in servers(spec, stage, run_uri) if serve and (unit is None or s.source in (None, unit))]
    endpoints = {s.source: vllm_url(run_name, namespace, s) for s in needed if s.source}
    target = next((vllm_url(run_name, namespace, s) for s in needed if s.plays("target")), None)
    reward = next((vllm_url(run_name, namespace, s, v1=False) for s in needed if s.plays("reward")), None)
    return stage_command(stage, run_uri, endpoints, target, reward, unit, shards)


def stage_shards(spec: FusionSpec, stage: str) -> int:
    """Pods of a shardable stage's Indexed Job: `parallelism` of its resource class (1: a plain Job)."""
    return stage_resources(spec, stage).parallelism if plan_stage(stage).shards else 1


def shard_parallelism(spec: FusionSpec, stage: str) -> int:
    """How many shard pods run at once: all of them, or as many as `cluster.gpuBudget` holds beside the
    stage's servers."""
    k, budget = stage_shards(spec, stage), spec.cluster.gpu_budget
    gpus = stage_resources(spec, stage).gpus
    if budget is None or not gpus:
        return k
    free = budget - servers_gpus(servers(spec, stage, ""), spec.cluster.vllm.gpus)
    return max(1, min(k, free // gpus))


def _stage_pod(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
               container_name: str, command: list[str], restart: str, ports: list[Obj] | None = None,
               res: StageResources | None = None) -> Obj:
    pod_class = stage_pod_class(stage)
    pods = _settings(spec, pod_class)
    spec_vol, spec_mount = _spec_volume(run_name, spec)
    scratch_vol, scratch_mount = _scratch_volume(spec)
    shm_vol, shm_mount = _shm_volume()
    volumes, mounts = [spec_vol, scratch_vol, shm_vol], [spec_mount, scratch_mount, shm_mount]
    for vol, mount in _models_volume(spec):
        volumes.append(vol)
        mounts.append(mount)
    init: list[Obj] = []
    if plan_stage(stage).distributed and spec.cluster.checkpoints.enabled:
        volumes.append({"name": "checkpoints",
                        "persistentVolumeClaim": {"claimName": checkpoints_pvc_name(run_name)}})
        mounts.append({"name": "checkpoints", "mountPath": checkpoints_mount_path(run_uri)})
        # The checkpoint PVC is mounted inside the scratch volume. The container runtime would make its
        # mount point, and so the run's folder around it where the stage writes, as root (0755): a
        # non-root stage could not write there. Made first, as the pod's user, with the scratch volume only.
        init.append(_runtime_container(spec, pod_class, "workdir", ["mkdir", "-p", checkpoints_mount_path(run_uri)],
                                       [], [scratch_mount], _resources(spec.cluster.small)))
    env = [*_s3_env(spec), {"name": "WRPO_STAGE", "value": stage}]
    env += _api_key_env(external_endpoints(spec, stage))  # external endpoints' keys, from their Secrets
    container = _runtime_container(spec, pod_class, container_name, command, env, [*mounts, *pods.volume_mounts],
                                   _resources(res or stage_resources(spec, stage)))
    if ports:
        container["ports"] = ports
    return _pod_spec(spec, pod_class, [container], volumes, restart, init=init or None)


def _runner_labels(run_name: str, spec: FusionSpec, stage: str, stage_hash: str | None) -> dict[str, str]:
    return labels(run_name, stage, "stage", stage_hash, template_hash(spec, stage_pod_class(stage), stage_hash))


def build_stage_job(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                    stage_hash: str | None = None, unit: str | None = None, shards: int = 1,
                    serve: bool = True) -> Obj:
    """A batch/v1 Job for a small, sampling-client or scoring stage (retried up to backoffLimit); for one
    `unit` (`<run>-<stage>-<unit>`), or an Indexed Job of `shards` pods, each retried on its own
    (`backoffLimitPerIndex`). With `cluster.queueName` it is created suspended for Kueue to admit."""
    lab = _runner_labels(run_name, spec, stage, stage_hash)
    if unit:
        lab["fusion.wrpo.io/unit"] = unit
    command = stage_args(run_name, namespace, spec, stage, run_uri, unit, shards, serve)
    job_spec: Obj = {
        "backoffLimit": spec.cluster.backoff_limit,
        "completions": 1, "parallelism": 1,
        "template": {"metadata": _template_metadata(spec, stage_pod_class(stage), lab),
                     # a commit of finished units or shards only writes the manifest: `cluster.small`, no GPU
                     "spec": _stage_pod(run_name, namespace, spec, stage, run_uri, "stage", command, "Never",
                                        res=None if serve else spec.cluster.small)},
    }
    if shards > 1:
        job_spec.update(completionMode="Indexed", completions=shards,
                        parallelism=shard_parallelism(spec, stage), backoffLimitPerIndex=spec.cluster.backoff_limit)
        del job_spec["backoffLimit"]  # a failed shard is retried alone; the Job fails once a shard used up its own
    if spec.cluster.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.cluster.active_deadline_seconds
    suffix = f"{stage}-{unit}" if unit else f"{stage}-shards" if shards > 1 else stage
    meta: Obj = {"name": child_name(run_name, suffix), "namespace": namespace, "labels": dict(lab)}
    if spec.cluster.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.cluster.queue_name
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def torchrun_command(stage: str, run_uri: str, nodes: int = 1) -> list[str]:
    """torchrun for one stage. One node: `--standalone` (a local rendezvous, nothing to resolve).
    More: the variables the training-operator (v1.9) and Trainer v2's torch plugin both give (PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT; `$(VAR)` is expanded by the kubelet)."""
    if nodes == 1:
        launch = ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=$(PET_NPROC_PER_NODE)"]
    else:
        launch = ["torchrun", "--nnodes=$(PET_NNODES)", "--nproc-per-node=$(PET_NPROC_PER_NODE)",
                  "--node-rank=$(PET_NODE_RANK)", "--master-addr=$(PET_MASTER_ADDR)",
                  "--master-port=$(PET_MASTER_PORT)"]
    return [*launch, "-m", "wrpo.cli", *stage_command(stage, run_uri)[1:]]


def build_pytorchjob(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                     stage_hash: str | None = None) -> Obj:
    """A Kubeflow PyTorchJob (Master + nodes-1 Workers) running the SFT or WRPO stage under torchrun; suspended
    for Kueue with `cluster.queueName`, gang-scheduled with `cluster.schedulingPolicy`."""
    res = spec.cluster.training
    lab = _runner_labels(run_name, spec, stage, stage_hash)
    ports = [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}]

    def replica(count: int) -> Obj:
        pod = _stage_pod(run_name, namespace, spec, stage, run_uri, "pytorch",
                         torchrun_command(stage, run_uri, res.nodes), "OnFailure", ports)
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": _template_metadata(spec, "training", lab), "spec": pod}}

    replicas = {"Master": replica(1)}
    if res.nodes > 1:
        replicas["Worker"] = replica(res.nodes - 1)
    run_policy: Obj = {"cleanPodPolicy": "Running", "backoffLimit": spec.cluster.backoff_limit}
    if spec.cluster.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = spec.cluster.active_deadline_seconds
    gang = spec.cluster.scheduling_policy
    if gang is not None:
        policy: Obj = {"minAvailable": gang.min_available or res.nodes}
        for key, value in (("queue", gang.queue), ("priorityClass", gang.priority_class),
                           ("scheduleTimeoutSeconds", gang.schedule_timeout_seconds)):
            if value is not None:
                policy[key] = value
        run_policy["schedulingPolicy"] = policy
    meta: Obj = {"name": child_name(run_name, stage), "namespace": namespace, "labels": dict(lab)}
    if spec.cluster.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.cluster.queue_name
        run_policy["suspend"] = True
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": meta,
        "spec": {"nprocPerNode": str(res.procs_per_node), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }


def build_training_runtime(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                           stage_hash: str | None = None) -> Obj:
    """A namespaced Kubeflow Trainer v2 TrainingRuntime for one training stage, holding the whole pod template
    (the PyTorchJob's: security context, Secrets by reference, scratch and checkpoint volumes, pod settings)
    in a JobSet of one replicatedJob `node`, an Indexed Job of `nodes` pods (Trainer sets its parallelism from
    `mlPolicy.numNodes`). Its torch plugin gives the `node` container PET_NNODES, PET_NPROC_PER_NODE,
    PET_NODE_RANK and PET_MASTER_ADDR/PORT, which `torchrun_command` reads. Only fields Trainer v2.0 through
    v2.2 all have are used (docs/operator.md, "Training backends"). A failed pod restarts the whole JobSet
    (torchrun's group) up to `cluster.backoffLimit` times; a deadline fails it at once."""
    res = spec.cluster.training
    lab = _runner_labels(run_name, spec, stage, stage_hash)
    ports = [{"name": "trainjob-port", "containerPort": TRAINJOB_PORT}]
    pod = _stage_pod(run_name, namespace, spec, stage, run_uri, TRAINER_NODE,
                     torchrun_command(stage, run_uri, res.nodes), "Never", ports)
    meta = _template_metadata(spec, "training", lab)
    gang = spec.cluster.scheduling_policy
    if gang is not None:  # Volcano reads its queue and priority from the pods (no gang: docs/operator.md)
        if gang.queue:
            meta.setdefault("annotations", {})[VOLCANO_QUEUE_ANNOTATION] = gang.queue
        if gang.priority_class:
            pod.setdefault("priorityClassName", gang.priority_class)
    job: Obj = {"completionMode": "Indexed", "backoffLimit": 0, "template": {"metadata": meta, "spec": pod}}
    if spec.cluster.active_deadline_seconds:
        job["activeDeadlineSeconds"] = spec.cluster.active_deadline_seconds
    # the run's labels on JobSet's Job too: the operator's Job watch sees it, and with it the FailedCreate Events
    # of a pod creation the apiserver refused (docs/operator.md, "Stalls"); with_owner adds the run's UID
    job_labels = {TRAINER_ANCESTOR_LABEL: "trainer", LABEL_RUN: run_name, LABEL_STAGE: stage}
    jobset: Obj = {
        "replicatedJobs": [{"name": TRAINER_NODE, "replicas": 1,
                            "template": {"metadata": {"labels": job_labels}, "spec": job}}],
        "failurePolicy": {"maxRestarts": spec.cluster.backoff_limit,
                          "rules": [{"name": "deadline", "action": "FailJobSet",
                                     "onJobFailureReasons": ["DeadlineExceeded"]}]},
    }
    return {
        "apiVersion": TRAINER_API, "kind": "TrainingRuntime",
        # the framework label: the Kubeflow SDK's TrainerClient lists only runtimes that name their framework
        "metadata": {"name": child_name(run_name, stage), "namespace": namespace,
                     "labels": {**lab, TRAINER_FRAMEWORK_LABEL: "torch"}},
        # no numProcPerNode here: Trainer v2.2 dropped it from the runtime's torch policy (the apiserver prunes
        # it without a word and PET_NPROC_PER_NODE falls back to one per GPU or CPU); the TrainJob sets it
        "spec": {"mlPolicy": {"numNodes": res.nodes, "torch": {}},
                 "template": {"spec": jobset}},
    }


def build_trainjob(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                   stage_hash: str | None = None) -> Obj:
    """A Kubeflow Trainer v2 TrainJob that only names the stage's TrainingRuntime (`build_training_runtime`,
    same name) and sets `trainer.numNodes` and `trainer.numProcPerNode` (an integer is valid from v2.0 to
    v2.2; Trainer's torch plugin fills the `node` container's PET_* variables from them, and only for a
    TrainJob with a `trainer`); suspended for Kueue with `cluster.queueName`."""
    lab = _runner_labels(run_name, spec, stage, stage_hash)
    name = child_name(run_name, stage)
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(lab)}
    job_spec: Obj = {"runtimeRef": {"apiGroup": TRAINER_API.split("/")[0], "kind": "TrainingRuntime", "name": name},
                     "trainer": {"numNodes": spec.cluster.training.nodes,
                                 "numProcPerNode": spec.cluster.training.procs_per_node}}
    if spec.cluster.queue_name:
        meta["labels"][QUEUE_LABEL] = spec.cluster.queue_name
        job_spec["suspend"] = True
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": meta, "spec": job_spec}


def build_stage_runner(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                       stage_hash: str | None = None, backend: str = "pytorchjob") -> Obj:
    """The child that runs `stage`: a PyTorchJob or a TrainJob (`backend`) for training stages, else a Job."""
    if not plan_stage(stage).distributed:
        return build_stage_job(run_name, namespace, spec, stage, run_uri, stage_hash)
    build = build_trainjob if backend == "trainjob" else build_pytorchjob
    return build(run_name, namespace, spec, stage, run_uri, stage_hash)


def build_stage_servers(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                        stage_hash: str | None = None) -> list[Obj]:
    """Deployment + Service of every vLLM server the stage needs (none for external endpoints)."""
    out: list[Obj] = []
    for server in servers(spec, stage, run_uri):
        out.append(build_vllm_deployment(run_name, namespace, spec, server, stage, stage_hash))
        out.append(build_vllm_service(run_name, namespace, server, stage, stage_hash))
    return out


@dataclass
class UnitChildren:
    """One unit of a stage whose units have servers of their own (sample-sources: a source): its vLLM
    Deployment + Service and the Job running `wrpo stage <stage> --unit <unit>`, all labelled with the
    unit's hash, so a unit committed under an earlier spec (another source added) is still done."""

    name: str
    hash: str
    gpus: int  # held by its servers from their creation until they are deleted
    servers: list[Obj] = field(default_factory=list)
    runner: Obj = field(default_factory=dict)


@dataclass
class StageChildren:
    """The children of one stage: `servers` (vLLM Deployments and Services) and `volumes` are created at
    once; each runner once every Deployment in its `after` is Available and every runner in its
    `after_runners` succeeded. `units`: a sliding window of units under `cluster.gpuBudget` (the
    operator admits them, `window.admit`), before the runners, which then only commit the stage."""

    servers: list[Obj] = field(default_factory=list)
    volumes: list[Obj] = field(default_factory=list)
    templates: list[Obj] = field(default_factory=list)  # TrainingRuntimes its TrainJob names, made at once
    runners: list[Obj] = field(default_factory=list)
    after: dict[str, list[str]] = field(default_factory=dict)  # runner name → Deployment names it waits for
    after_runners: dict[str, list[str]] = field(default_factory=dict)  # runner name → runners to succeed first
    units: list[UnitChildren] = field(default_factory=list)

    def all(self) -> list[Obj]:
        unit_kids = [o for u in self.units for o in (*u.servers, u.runner)]
        return [*self.volumes, *self.templates, *self.servers, *unit_kids, *self.runners]


def has_server_units(stage: str) -> bool:
    """A stage whose units each need their own servers (sample-sources): run as a window of units."""
    row = plan_stage(stage)
    return row.units == "sources" and row.servers == "sources"


def stage_children(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                   stage_hash: str | None = None, backend: str = "pytorchjob") -> StageChildren:
    """The desired children of `stage` and what each runner waits for, from its plan row alone (no stage
    is special-cased: `servers`, `units`, `shards`, `distributed` and `resource_class` say everything);
    `backend` (pytorchjob or trainjob, resolved from `cluster.training.backend`) says how a training stage
    runs."""
    if has_server_units(stage):
        return _unit_children(run_name, namespace, spec, stage, run_uri, stage_hash)
    kids = StageChildren(servers=build_stage_servers(run_name, namespace, spec, stage, run_uri, stage_hash))
    if plan_stage(stage).distributed and spec.cluster.checkpoints.enabled:
        kids.volumes.append(build_checkpoints_pvc(run_name, namespace, spec))
    deployments = [s["metadata"]["name"] for s in kids.servers if s["kind"] == "Deployment"]
    shards = stage_shards(spec, stage)
    if shards > 1:  # an Indexed Job of shards, then a Job that commits the stage from their parts
        job = build_stage_job(run_name, namespace, spec, stage, run_uri, stage_hash, shards=shards)
        kids.runners.append(job)
        kids.after[job["metadata"]["name"]] = deployments
        commit = build_stage_job(run_name, namespace, spec, stage, run_uri, stage_hash, serve=False)
        kids.runners.append(commit)
        kids.after_runners[commit["metadata"]["name"]] = [job["metadata"]["name"]]
        return kids
    runner = build_stage_runner(run_name, namespace, spec, stage, run_uri, stage_hash, backend)
    if runner["kind"] == "TrainJob":
        kids.templates.append(build_training_runtime(run_name, namespace, spec, stage, run_uri, stage_hash))
    kids.runners.append(runner)
    kids.after[runner["metadata"]["name"]] = deployments
    return kids


def _unit_children(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                   stage_hash: str | None) -> StageChildren:
    unit_hashes = plan_hashes(spec).units[stage]
    by_source: dict[str, list[Server]] = {}
    for server in servers(spec, stage, run_uri):
        by_source.setdefault(server.source or "", []).append(server)
    kids = StageChildren()
    for unit, full_hash in unit_hashes.items():
        h = full_hash[:HASH_PREFIX]
        served = by_source.get(unit, [])
        unit_servers = []
        for server in served:
            unit_servers += [build_vllm_deployment(run_name, namespace, spec, server, stage, h),
                             build_vllm_service(run_name, namespace, server, stage, h)]
        kids.units.append(UnitChildren(unit, h, servers_gpus(served, spec.cluster.vllm.gpus), unit_servers,
                                       build_stage_job(run_name, namespace, spec, stage, run_uri, h, unit=unit)))
    commit = build_stage_job(run_name, namespace, spec, stage, run_uri, stage_hash, serve=False)
    kids.runners.append(commit)
    kids.after[commit["metadata"]["name"]] = []
    return kids


def pod_templates(obj: Obj) -> list[Obj]:
    """The pod templates of a Deployment, Job, PyTorchJob or TrainingRuntime (a TrainJob has none)."""
    if obj.get("kind") == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    if obj.get("kind") == "TrainingRuntime":
        return [t["spec"]["template"] for t in job_templates(obj)]
    if obj.get("kind") == "TrainJob":
        return []
    return [obj["spec"]["template"]] if "template" in (obj.get("spec") or {}) else []


def job_templates(obj: Obj) -> list[Obj]:
    """The Job templates of a TrainingRuntime (its JobSet's replicatedJobs; none for any other kind)."""
    if obj.get("kind") != "TrainingRuntime":
        return []
    return [r["template"] for r in obj["spec"]["template"]["spec"]["replicatedJobs"]]


def configmaps_used(obj: Obj) -> set[str]:
    """Names of the ConfigMaps the pods of `obj` mount."""
    return {v["configMap"]["name"] for t in pod_templates(obj) for v in (t.get("spec") or {}).get("volumes") or []
            if v.get("configMap")}

"""Pure builders: a FusionSpec (plus the run's name and namespace) → the Kubernetes objects of a stage.

Nothing here talks to the apiserver; `reconcile` adds owner references (`own`) and creates the objects.
Every pod runs `wrpo stage <name> --spec /etc/wrpo/spec.yaml --run-uri <run>` from the runtime image,
except the vLLM servers, which run `vllm serve` from the vLLM image.
"""

from __future__ import annotations

import hashlib
from typing import Any

from wrpo.pipeline.plan import Server, external_endpoints, servers
from wrpo.pipeline.plan import stage as plan_stage
from wrpo.pipeline.spec import EndpointSpec, FusionSpec, StageResources, VLLMResources, dump_spec_yaml
from wrpo_operator import (
    API_VERSION,
    FIELD_MANAGER,
    KIND,
    LABEL_COMPONENT,
    LABEL_RUN,
    LABEL_STAGE,
    LABEL_STAGE_HASH,
)

VLLM_PORT = 8000
PYTORCHJOB_PORT = 23456
SPEC_DIR = "/etc/wrpo"
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
WEIGHTS_DIR = "/weights"
MODELS_DIR = "/models"
Obj = dict[str, Any]


def child_name(run_name: str, suffix: str) -> str:
    """`<run>-<suffix>`, shortened with a hash to a 63-character DNS label when too long."""
    name = f"{run_name}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def labels(run_name: str, stage: str | None, component: str, stage_hash: str | None = None) -> dict[str, str]:
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
    return out


def owner_reference(run_name: str, uid: str) -> Obj:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": run_name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def own(obj: Obj, run_name: str, uid: str) -> Obj:
    """`obj` with the FusionRun as its controlling owner (garbage collection deletes it with the run)."""
    meta = obj.setdefault("metadata", {})
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != uid]
    meta["ownerReferences"] = [*refs, owner_reference(run_name, uid)]
    meta.setdefault("labels", {})[LABEL_RUN] = run_name
    return obj


def is_owned(obj: Obj, uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# -- the spec ConfigMap ---------------------------------------------------------------------------

def spec_configmap_name(run_name: str) -> str:
    return child_name(run_name, "spec")


def build_spec_configmap(run_name: str, namespace: str, spec: FusionSpec) -> Obj:
    """The FusionSpec as /etc/wrpo/spec.yaml for every stage pod (camelCase, defaults filled in)."""
    text = dump_spec_yaml(spec)  # read back by the pods' strict loader: ambiguous words quoted ('n': 5)
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": spec_configmap_name(run_name), "namespace": namespace,
                     "labels": labels(run_name, None, "spec")},
        "data": {"spec.yaml": text},
    }


# -- pieces shared by every pod ---------------------------------------------------------------------

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
    gpus = tensor_parallel_size if res.gpus is None else res.gpus
    gpu = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    # No memory limit: loading large checkpoints peaks above the steady state.
    out: Obj = {"requests": {"cpu": res.cpu, "memory": res.memory, **gpu}}
    if gpu:
        out["limits"] = gpu
    return out


def _pod_spec(spec: FusionSpec, containers: list[Obj], volumes: list[Obj], restart: str,
              init: list[Obj] | None = None) -> Obj:
    pod: Obj = {"restartPolicy": restart, "containers": containers, "volumes": volumes,
                "enableServiceLinks": False}
    if init:
        pod["initContainers"] = init
    if spec.cluster.service_account:
        pod["serviceAccountName"] = spec.cluster.service_account
    if spec.cluster.node_selector:
        pod["nodeSelector"] = dict(spec.cluster.node_selector)
    if spec.cluster.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.cluster.tolerations]
    return pod


def _spec_volume(run_name: str) -> tuple[Obj, Obj]:
    return ({"name": "spec", "configMap": {"name": spec_configmap_name(run_name)}},
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})


def _shm_volume(size: str | None = None) -> tuple[Obj, Obj]:
    empty_dir = {"medium": "Memory", **({"sizeLimit": size} if size else {})}
    return ({"name": "dshm", "emptyDir": empty_dir}, {"name": "dshm", "mountPath": "/dev/shm"})


def _models_volume(spec: FusionSpec) -> list[tuple[Obj, Obj]]:
    if not spec.cluster.models_pvc:
        return []
    claim = {"claimName": spec.cluster.models_pvc, "readOnly": True}
    return [({"name": "models", "persistentVolumeClaim": claim},
             {"name": "models", "mountPath": MODELS_DIR, "readOnly": True})]


_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _runtime_container(spec: FusionSpec, name: str, command: list[str], env: list[Obj], mounts: list[Obj],
                       resources: Obj) -> Obj:
    return {
        "name": name, "image": spec.cluster.runtime_image, "imagePullPolicy": spec.cluster.image_pull_policy,
        "command": command, "env": [{"name": "HOME", "value": "/tmp"}, *env], "volumeMounts": mounts,
        "resources": resources, "securityContext": {**_SECURITY, "runAsNonRoot": True},
    }


def stage_command(stage: str, run_uri: str, endpoints: dict[str, str] | None = None,
                  target_endpoint: str | None = None, reward_endpoint: str | None = None) -> list[str]:
    """`wrpo stage ...` as the local runner runs it (endpoints of in-cluster servers added)."""
    cmd = ["wrpo", "stage", stage, "--spec", SPEC_FILE, "--run-uri", run_uri]
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
    args = [model_path, "--served-model-name", server.served_name, "--host", "0.0.0.0",
            "--port", str(VLLM_PORT), "--tensor-parallel-size", str(server.tensor_parallel_size),
            "--gpu-memory-utilization", str(server.gpu_memory_utilization), "--seed", str(spec.sampling.seed)]
    if server.max_model_len:
        args += ["--max-model-len", str(server.max_model_len)]
    if server.runner == "pooling":
        args += ["--runner", "pooling"]
    return [*args, *server.args]


def _probe(path: str, period: int, failures: int) -> Obj:
    return {"httpGet": {"path": path, "port": VLLM_PORT}, "periodSeconds": period,
            "failureThreshold": failures, "timeoutSeconds": 5}


def build_vllm_deployment(run_name: str, namespace: str, spec: FusionSpec, server: Server,
                          stage: str, stage_hash: str | None = None) -> Obj:
    """A one-replica vLLM Deployment; weights from the models PVC, or fetched from S3 first."""
    name = child_name(run_name, server.key)
    lab = labels(run_name, stage, "vllm", stage_hash)
    select = {LABEL_RUN: run_name, LABEL_COMPONENT: "vllm", "fusion.wrpo.io/server": server.key}
    spec_vol, spec_mount = _spec_volume(run_name)
    shm_vol, shm_mount = _shm_volume(spec.cluster.vllm.shm_size)
    volumes, mounts, init = [shm_vol], [shm_mount], []
    model_path = server.model
    for vol, mount in _models_volume(spec):
        volumes.append(vol)
        mounts.append(mount)
    if server.model.startswith("s3://"):
        model_path = f"{WEIGHTS_DIR}/model"
        volumes += [{"name": "weights", "emptyDir": {}}, spec_vol]
        mounts.append({"name": "weights", "mountPath": WEIGHTS_DIR, "readOnly": True})
        init.append(_runtime_container(
            spec, "fetch-weights", ["wrpo", "fetch", server.model, model_path], _s3_env(spec),
            [{"name": "weights", "mountPath": WEIGHTS_DIR}, spec_mount], _resources(spec.cluster.small)))
    container = {
        "name": "vllm", "image": spec.cluster.vllm_image, "imagePullPolicy": spec.cluster.image_pull_policy,
        "command": ["vllm", "serve"], "args": vllm_args(spec, server, model_path),
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1" if server.model.startswith(("s3://", "/")) else "0"}]
        + [{"name": k, "value": v} for k, v in sorted(spec.cluster.vllm.env.items())],
        "resources": _vllm_resources(spec.cluster.vllm, server.tensor_parallel_size),
        "volumeMounts": mounts,
        # Big models load for many minutes: the startup probe allows 30; then /health must keep passing.
        "startupProbe": _probe("/health", 10, 180),
        "readinessProbe": _probe("/health", 5, 3),
        "livenessProbe": _probe("/health", 15, 4),
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": lab},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two servers on the same GPUs
            "selector": {"matchLabels": select},
            "template": {
                "metadata": {"labels": {**lab, **select}},
                "spec": {**_pod_spec(spec, [container], volumes, "Always", init),
                         "terminationGracePeriodSeconds": 30},
            },
        },
    }


def build_vllm_service(run_name: str, namespace: str, server: Server, stage: str,
                       stage_hash: str | None = None) -> Obj:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": child_name(run_name, server.key), "namespace": namespace,
                     "labels": labels(run_name, stage, "vllm", stage_hash)},
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_RUN: run_name, LABEL_COMPONENT: "vllm", "fusion.wrpo.io/server": server.key},
            "ports": [{"name": "http", "port": VLLM_PORT, "targetPort": VLLM_PORT, "protocol": "TCP"}],
        },
    }


# -- stage Jobs and PyTorchJobs ---------------------------------------------------------------------

def stage_resources(spec: FusionSpec, name: str) -> StageResources:
    """The `cluster.*` section of the stage's resource class (the plan row's `resources`)."""
    kind = plan_stage(name).resources
    if kind == "scoring":
        return spec.cluster.scoring
    if kind == "training":
        return spec.cluster.training
    return spec.cluster.small  # small stages and the sampling clients (the servers hold the GPUs)


def stage_args(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str) -> list[str]:
    """The stage's `wrpo stage` command with the URLs of the servers its plan row needs."""
    needed = {s.key: s for s in servers(spec, stage, run_uri)}
    endpoints = {s.source: vllm_url(run_name, namespace, s) for s in needed.values() if s.source}
    target = vllm_url(run_name, namespace, needed["target"]) if "target" in needed else None
    reward = vllm_url(run_name, namespace, needed["reward"], v1=False) if "reward" in needed else None
    return stage_command(stage, run_uri, endpoints, target, reward)


def _stage_pod(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
               container_name: str, command: list[str], restart: str, ports: list[Obj] | None = None) -> Obj:
    spec_vol, spec_mount = _spec_volume(run_name)
    shm_vol, shm_mount = _shm_volume()
    volumes, mounts = [spec_vol, shm_vol], [spec_mount, shm_mount]
    for vol, mount in _models_volume(spec):
        volumes.append(vol)
        mounts.append(mount)
    env = [*_s3_env(spec), {"name": "WRPO_STAGE", "value": stage}]
    env += _api_key_env(external_endpoints(spec, stage))  # external endpoints' keys, from their Secrets
    container = _runtime_container(spec, container_name, command, env, mounts,
                                   _resources(stage_resources(spec, stage)))
    if ports:
        container["ports"] = ports
    return _pod_spec(spec, [container], volumes, restart)


def build_stage_job(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                    stage_hash: str | None = None) -> Obj:
    """A batch/v1 Job for a small, sampling-client or scoring stage (retried up to backoffLimit)."""
    lab = labels(run_name, stage, "stage", stage_hash)
    command = stage_args(run_name, namespace, spec, stage, run_uri)
    job_spec: Obj = {
        "backoffLimit": spec.cluster.backoff_limit,
        "completions": 1, "parallelism": 1,
        "template": {"metadata": {"labels": lab},
                     "spec": _stage_pod(run_name, namespace, spec, stage, run_uri, "stage", command,
                                        "Never")},
    }
    if spec.cluster.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.cluster.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": child_name(run_name, stage), "namespace": namespace, "labels": lab},
            "spec": job_spec}


def torchrun_command(stage: str, run_uri: str, nodes: int = 1) -> list[str]:
    """torchrun for one stage. One node: `--standalone` (a local rendezvous, nothing to resolve).
    More: the training-operator's variables (v1.9: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
    PET_MASTER_ADDR/PORT; `$(VAR)` is expanded by the kubelet)."""
    if nodes == 1:
        launch = ["torchrun", "--standalone", "--nnodes=1", "--nproc-per-node=$(PET_NPROC_PER_NODE)"]
    else:
        launch = ["torchrun", "--nnodes=$(PET_NNODES)", "--nproc-per-node=$(PET_NPROC_PER_NODE)",
                  "--node-rank=$(PET_NODE_RANK)", "--master-addr=$(PET_MASTER_ADDR)",
                  "--master-port=$(PET_MASTER_PORT)"]
    return [*launch, "-m", "wrpo.cli", *stage_command(stage, run_uri)[1:]]


def build_pytorchjob(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                     stage_hash: str | None = None) -> Obj:
    """A Kubeflow PyTorchJob (Master + nodes-1 Workers) running the SFT or WRPO stage under torchrun."""
    res = spec.cluster.training
    lab = labels(run_name, stage, "stage", stage_hash)
    ports = [{"name": "pytorchjob-port", "containerPort": PYTORCHJOB_PORT}]

    def replica(count: int) -> Obj:
        pod = _stage_pod(run_name, namespace, spec, stage, run_uri, "pytorch",
                         torchrun_command(stage, run_uri, res.nodes), "OnFailure", ports)
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": lab}, "spec": pod}}

    replicas = {"Master": replica(1)}
    if res.nodes > 1:
        replicas["Worker"] = replica(res.nodes - 1)
    run_policy: Obj = {"cleanPodPolicy": "Running", "backoffLimit": spec.cluster.backoff_limit}
    if spec.cluster.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = spec.cluster.active_deadline_seconds
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": child_name(run_name, stage), "namespace": namespace, "labels": lab},
        "spec": {"nprocPerNode": str(res.procs_per_node), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }


def build_stage_runner(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                       stage_hash: str | None = None) -> Obj:
    """The child that runs `stage`: a PyTorchJob for training stages, else a Job."""
    build = build_pytorchjob if plan_stage(stage).distributed else build_stage_job
    return build(run_name, namespace, spec, stage, run_uri, stage_hash)


def build_stage_servers(run_name: str, namespace: str, spec: FusionSpec, stage: str, run_uri: str,
                        stage_hash: str | None = None) -> list[Obj]:
    """Deployment + Service of every vLLM server the stage needs (none for external endpoints)."""
    out: list[Obj] = []
    for server in servers(spec, stage, run_uri):
        out.append(build_vllm_deployment(run_name, namespace, spec, server, stage, stage_hash))
        out.append(build_vllm_service(run_name, namespace, server, stage, stage_hash))
    return out


def pod_templates(obj: Obj) -> list[Obj]:
    """The pod templates of a Deployment, Job or PyTorchJob."""
    if obj["kind"] == "PyTorchJob":
        return [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
    return [obj["spec"]["template"]] if "template" in obj.get("spec", {}) else []


def with_pod_annotations(obj: Obj, annotations: dict[str, str]) -> Obj:
    """`obj` with extra annotations on its pods (`spec.cluster.podAnnotations`)."""
    if not annotations:
        return obj
    for template in pod_templates(obj):
        template.setdefault("metadata", {}).setdefault("annotations", {}).update(annotations)
    return obj

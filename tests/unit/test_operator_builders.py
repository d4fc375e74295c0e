"""Pure builders: spec → Kubernetes objects (no cluster; tests/cluster/test_operator_dryrun.py
sends the same objects to a real apiserver with dryRun=All)."""

from __future__ import annotations

import json

import pytest
import yaml

from wrpo.pipeline.plan import STAGE_NAMES, servers
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import LABEL_RUN, LABEL_STAGE
from wrpo_operator import builders as b

RUN, NS, URI = "demo", "team-a", "s3://bucket/runs/demo"



def source_server(spec, name):
    """The plan's server of one source (the rows the operator and the local runtime share)."""
    return next(s for s in servers(spec, "sample-sources", "s3://b/r") if s.source == name)

def make_spec(**over):
    data = {
        "target": {"model": "s3://bucket/models/target", "tensorParallelSize": 2},
        "sources": [
            {"name": "llama", "model": "s3://bucket/models/llama", "tensorParallelSize": 4,
             "maxModelLen": 4096},
            {"name": "qwen", "model": "/models/qwen", "vllmArgs": ["--enforce-eager"]},
            {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "gpt",
                                         "apiKeyEnv": "API_KEY", "apiKeySecret": "api-key"}},
        ],
        "dataset": {"uri": "s3://bucket/data/prompts.jsonl"},
        "storage": {"runUri": URI, "s3Endpoint": "http://s3.local:8333", "credentialsSecret": "s3-creds"},
        "cluster": {"modelsPvc": "models", "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "nodeSelector": {"pool": "gpu"}, "activeDeadlineSeconds": 3600,
                    "training": {"gpus": 8, "nodes": 2, "procsPerNode": 8, "cpu": "32", "memory": "512Gi"},
                    "checkpoints": {"accessModes": ["ReadWriteMany"]}},
    }
    data.update(over)
    return parse_spec(data)


@pytest.fixture
def spec():
    return make_spec()


def test_child_names_are_deterministic_dns_labels():
    assert b.child_name("demo", "sft") == "demo-sft"
    long = b.child_name("a" * 40, "src-" + "b" * 40)
    assert len(long) <= 63 and long == b.child_name("a" * 40, "src-" + "b" * 40)
    assert long != b.child_name("a" * 40, "src-" + "b" * 39 + "c")


def test_spec_configmap_round_trips_and_is_named_by_its_content(spec):
    cm = b.build_spec_configmap(RUN, NS, spec)
    assert cm["metadata"]["name"].startswith("demo-spec-") and cm["metadata"]["labels"][LABEL_RUN] == RUN
    assert cm["immutable"] is True
    assert parse_spec(yaml.safe_load(cm["data"]["spec.yaml"])) == spec
    other = make_spec(wrpo={"beta": 0.05})
    assert b.build_spec_configmap(RUN, NS, other)["metadata"]["name"] != cm["metadata"]["name"]
    assert b.build_spec_configmap(RUN, NS, make_spec())["metadata"]["name"] == cm["metadata"]["name"]


def test_own_sets_the_controlling_owner_reference():
    obj = b.with_owner({"metadata": {"name": "x"}}, RUN, "uid-1")
    (ref,) = obj["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun", "name": RUN, "uid": "uid-1",
                   "controller": True, "blockOwnerDeletion": True}
    assert b.is_owned(obj, "uid-1") and obj["metadata"]["labels"][LABEL_RUN] == RUN
    job = b.with_owner(b.build_stage_runner(RUN, NS, make_spec(), "prepare", URI), RUN, "uid-1")
    assert job["spec"]["template"]["metadata"]["labels"]["fusion.wrpo.io/run-uid"] == "uid-1"  # its pods too
    assert len(b.with_owner(obj, RUN, "uid-1")["metadata"]["ownerReferences"]) == 1  # idempotent


def _container(obj, name=None):
    pod = obj["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if name in (None, c["name"]))


def test_sampling_stage_gets_one_vllm_server_per_model_source(spec):
    objs = b.build_stage_servers(RUN, NS, spec, "sample-sources", URI, "h")
    assert [(o["kind"], o["metadata"]["name"]) for o in objs] == [
        ("Deployment", "demo-src-llama"), ("Service", "demo-src-llama"),
        ("Deployment", "demo-src-qwen"), ("Service", "demo-src-qwen"),
    ]  # the external API source gets none


@pytest.mark.parametrize("source,tp,model_arg,init", [
    ("llama", 4, "/weights/model", True),  # s3:// → fetched by an init container
    ("qwen", 1, "/models/qwen", False),  # a folder on the models PVC
])
def test_vllm_deployment(spec, source, tp, model_arg, init):
    src = next(s for s in spec.sources if s.name == source)
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, src.name), "sample-sources", "h")
    c = _container(dep, "vllm")
    pod = dep["spec"]["template"]["spec"]
    assert c["image"] == spec.cluster.vllm_image and c["command"] == ["vllm", "serve"]
    args = c["args"]
    assert args[0] == model_arg
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert flags["--served-model-name"] == source and flags["--tensor-parallel-size"] == str(tp)
    assert flags["--gpu-memory-utilization"] == "0.9" and flags["--seed"] == "42"
    assert ("--max-model-len" in args) == (source == "llama")
    assert ("--enforce-eager" in args) == (source == "qwen")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == str(tp)  # cluster.vllm.gpus unset
    assert c["resources"]["requests"]["memory"] == "32Gi" and "memory" not in c["resources"]["limits"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": 8000}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "models" for v in pod["volumes"])
    assert bool(pod.get("initContainers")) == init
    if init:
        fetch = pod["initContainers"][0]
        assert fetch["command"] == ["wrpo", "fetch", "s3://bucket/models/llama", "/weights/model"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"} and dep["spec"]["replicas"] == 1
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    sel = dep["spec"]["selector"]["matchLabels"]
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v for k, v in sel.items())


@pytest.mark.parametrize("vllm,gpus", [({"gpus": 0}, None), ({"gpus": 2}, "2"), ({}, "4")])
def test_vllm_resources_come_from_cluster_vllm(vllm, gpus):
    spec = make_spec(cluster={"vllm": {**vllm, "cpu": "3", "memory": "6Gi", "shmSize": "1Gi"}})
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, spec.sources[0].name), "sample-sources")
    res = _container(dep, "vllm")["resources"]
    assert res["requests"]["cpu"] == "3" and res["requests"]["memory"] == "6Gi"
    assert res["requests"].get("nvidia.com/gpu") == gpus
    assert res.get("limits", {}).get("nvidia.com/gpu") == gpus
    shm = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}


def test_vllm_env_comes_from_cluster_vllm_env():
    spec = make_spec(cluster={"vllm": {"env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}})
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, spec.sources[0].name), "sample-sources")
    env = {e["name"]: e["value"] for e in _container(dep, "vllm")["env"]}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "HF_HUB_OFFLINE" in env


def test_vllm_service_selects_its_deployment(spec):
    server = source_server(spec, spec.sources[0].name)
    svc = b.build_vllm_service(RUN, NS, server, "sample-sources")
    dep = b.build_vllm_deployment(RUN, NS, spec, server, "sample-sources")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == 8000
    # headless: the name resolves to every Ready replica, whose port is the URL's (no port translation)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["port"] == 8000


def test_sampling_job_gets_endpoints_and_api_keys_by_reference(spec):
    job = b.build_stage_runner(RUN, NS, spec, "sample-sources", URI, "h")
    assert job["kind"] == "Job" and job["metadata"]["name"] == "demo-sample-sources"
    c = _container(job)
    assert c["command"][:7] == ["wrpo", "stage", "sample-sources", "--spec", "/etc/wrpo/spec.yaml",
                                "--run-uri", URI]
    assert "llama=http://demo-src-llama.team-a.svc:8000/v1" in c["command"]
    assert not any(a.startswith("api=") for a in c["command"])  # external: the stage reads the spec
    env = {e["name"]: e for e in c["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "api-key", "key": "api-key"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://s3.local:8333"
    assert job["spec"]["backoffLimit"] == 2 and job["spec"]["activeDeadlineSeconds"] == 3600
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["metadata"]["labels"][LABEL_STAGE] == "sample-sources"


def test_no_secret_value_appears_in_any_object(spec):
    """Credentials are only ever Secret references: no env var of any object carries a literal key."""
    for stage in STAGE_NAMES:
        objs = [b.build_stage_runner(RUN, NS, spec, stage, URI),
                *b.build_stage_servers(RUN, NS, spec, stage, URI)]
        for obj in objs:
            text = json.dumps(obj)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "API_KEY"):
                if key in text:
                    assert f'"name": "{key}", "valueFrom"' in text, (stage, key)


@pytest.mark.parametrize("stage", ["score-sources", "score-target", "ref-logps"])
def test_scoring_jobs_use_scoring_resources(spec, stage):
    c = _container(b.build_stage_runner(RUN, NS, spec, stage, URI))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["command"][2] == stage


@pytest.mark.parametrize("stage", ["prepare", "select-sources", "build-pairs"])
def test_small_stages_are_short_cpu_jobs(spec, stage):
    job = b.build_stage_runner(RUN, NS, spec, stage, URI)
    assert job["kind"] == "Job" and "nvidia.com/gpu" not in json.dumps(job)


@pytest.mark.parametrize("stage", ["sft", "wrpo"])
def test_training_stages_are_pytorchjobs(spec, stage):
    pj = b.build_stage_runner(RUN, NS, spec, stage, URI, "h")
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["kind"] == "PyTorchJob"
    assert pj["spec"]["nprocPerNode"] == "8"
    assert pj["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 2,
                                       "activeDeadlineSeconds": 3600}
    reps = pj["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 1
    for rep in reps.values():
        (c,) = rep["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
        assert c["command"][0] == "torchrun" and "--nnodes=$(PET_NNODES)" in c["command"]
        assert c["command"][c["command"].index("-m") + 1:][:3] == ["wrpo.cli", "stage", stage]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_single_node_training_has_no_workers():
    spec = make_spec(cluster={"training": {"gpus": 1, "nodes": 1}})
    pj = b.build_pytorchjob(RUN, NS, spec, "sft", URI)
    assert list(pj["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    command = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nnodes=1"]


def test_sample_target_serves_the_sft_model_from_the_run(spec):
    (dep, svc) = b.build_stage_servers(RUN, NS, spec, "sample-target", URI)
    assert dep["metadata"]["name"] == "demo-target"
    fetch = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][2] == f"{URI}/sft/model/"
    assert "--tensor-parallel-size" in _container(dep)["args"]
    job = b.build_stage_runner(RUN, NS, spec, "sample-target", URI)
    cmd = _container(job)["command"]
    assert cmd[cmd.index("--target-endpoint") + 1] == "http://demo-target.team-a.svc:8000/v1"


def test_remote_reward_without_endpoint_is_served_for_scoring():
    spec = make_spec(reward={"type": "remote", "model": "/models/rm"})
    (dep, _svc) = b.build_stage_servers(RUN, NS, spec, "score-sources", URI)
    assert "--runner" in _container(dep)["args"]
    cmd = _container(b.build_stage_runner(RUN, NS, spec, "score-sources", URI))["command"]
    assert cmd[cmd.index("--reward-endpoint") + 1] == "http://demo-reward.team-a.svc:8000"
    assert b.build_stage_servers(RUN, NS, spec, "ref-logps", URI) == []


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_every_stage_pod_mounts_the_spec_and_runs_as_non_root(spec, stage):
    obj = b.build_stage_runner(RUN, NS, spec, stage, URI)
    pods = ([r["template"]["spec"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
            if obj["kind"] == "PyTorchJob" else [obj["spec"]["template"]["spec"]])
    for pod in pods:
        cm = b.spec_configmap_name(RUN, spec)
        assert {"name": "spec", "configMap": {"name": cm}} in pod["volumes"]
        c = pod["containers"][0]
        assert c["securityContext"]["runAsNonRoot"] is True
        assert c["image"] == spec.cluster.runtime_image


# -- restricted pods, per-component settings, volumes, queues ----------------------------------------------

#: Volume types the `restricted` Pod Security Standard allows (kubernetes.io/docs, pod-security-standards).
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """The rules of the `restricted` Pod Security Standard (v1.35) that a pod spec breaks. The cluster test
    (tests/cluster/test_operator_security.py) has the real apiserver enforce the same standard."""
    out = []
    psc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(key)
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']}: {kinds}")
    for c in containers:
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            out.append(f"{c['name']}: runAsNonRoot")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{c['name']}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
    return out


def all_pods(spec) -> list[tuple[str, dict]]:
    out = []
    for stage in STAGE_NAMES:
        for obj in [*b.build_stage_servers(RUN, NS, spec, stage, URI, "h"),
                    b.build_stage_runner(RUN, NS, spec, stage, URI, "h")]:
            out += [(f"{stage}/{obj['metadata']['name']}", t["spec"]) for t in b.pod_templates(obj)]
    return out


def test_every_pod_passes_the_restricted_standard_and_mounts_no_token(spec):
    pods = all_pods(make_spec(reward={"type": "remote", "model": "s3://bucket/models/rm"}))
    assert len(pods) >= 13
    for where, pod in pods:
        assert restricted_violations(pod) == [], where
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["securityContext"]["runAsUser"] == 1000  # vLLM too (its image would run as root)


def test_the_restricted_checker_catches_what_it_checks():
    (where, pod), *_ = all_pods(make_spec())
    c = pod["containers"][0]
    for breaks in ({"containers": [{**c, "securityContext": {}}]},
                   {"containers": [{**c, "securityContext": {**c["securityContext"], "runAsUser": 0}}]},
                   {"containers": [{**c, "securityContext": {**c["securityContext"], "seccompProfile": None}}],
                    "securityContext": {}},
                   {"volumes": [*pod["volumes"], {"name": "h", "hostPath": {"path": "/"}}]}):
        assert restricted_violations({**pod, **breaks}), breaks


def test_secrets_reach_pods_only_by_reference():
    spec = make_spec(cluster={"hfTokenSecret": "hf", "env": [
        {"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "key"}},
        {"name": "LOG_LEVEL", "value": "debug"}],
        "pods": {"vllm": {"env": [{"name": "VLLM_API_KEY", "secretKeyRef": {"name": "v", "key": "k",
                                                                             "optional": True}}]}}})
    for where, pod in all_pods(spec):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            env = {e["name"]: e for e in c["env"]}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}, where
            assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "key"}
            assert env["LOG_LEVEL"]["value"] == "debug"
            assert ("VLLM_API_KEY" in env) == (c["name"] in ("vllm", "fetch-weights")), where


def test_env_entries_need_exactly_one_source():
    from wrpo.errors import SpecError

    for bad in ({"name": "A"}, {"name": "A", "value": "x", "secretKeyRef": {"name": "s", "key": "k"}}):
        with pytest.raises(SpecError, match="cluster.env"):
            make_spec(cluster={"env": [bad]})


def test_per_component_settings_merge_over_the_cluster_wide_ones():
    gpu_affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
    spec = make_spec(cluster={
        "nodeSelector": {"pool": "ml"}, "tolerations": [{"key": "ml", "operator": "Exists"}],
        "imagePullSecrets": ["registry"], "podAnnotations": {"team": "fusion"},
        "pods": {
            "vllm": {"nodeSelector": {"gpu": "h100"}, "affinity": gpu_affinity, "priorityClassName": "serving",
                     "labels": {"cost-center": "42", "fusion.wrpo.io/run": "hijack"},
                     "volumes": [{"name": "cache", "emptyDir": {}}],
                     "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
            "training": {"schedulerName": "volcano", "tolerations": [{"key": "train", "operator": "Exists"}],
                         "imagePullSecrets": ["registry", "private"], "annotations": {"team": "training"}},
            "small": {"priorityClassName": "batch-low"}}})
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, "llama"), "sample-sources", "h")
    pod, meta = dep["spec"]["template"]["spec"], dep["spec"]["template"]["metadata"]
    assert pod["nodeSelector"] == {"pool": "ml", "gpu": "h100"} and pod["affinity"] == gpu_affinity
    assert pod["priorityClassName"] == "serving" and pod["imagePullSecrets"] == [{"name": "registry"}]
    assert meta["labels"]["cost-center"] == "42" and meta["labels"]["fusion.wrpo.io/run"] == RUN  # ours win
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
    assert {"name": "cache", "mountPath": "/cache"} in pod["containers"][0]["volumeMounts"]
    pj = b.build_stage_runner(RUN, NS, spec, "sft", URI, "h")
    tpl = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert tpl["spec"]["schedulerName"] == "volcano" and "priorityClassName" not in tpl["spec"]
    assert tpl["spec"]["tolerations"] == [{"key": "ml", "operator": "Exists"}, {"key": "train", "operator": "Exists"}]
    assert tpl["spec"]["imagePullSecrets"] == [{"name": "registry"}, {"name": "private"}]
    assert tpl["metadata"]["annotations"] == {"team": "training"}
    small = b.build_stage_runner(RUN, NS, spec, "prepare", URI, "h")["spec"]["template"]
    assert small["spec"]["priorityClassName"] == "batch-low" and "affinity" not in small["spec"]
    scoring = b.build_stage_runner(RUN, NS, spec, "score-sources", URI, "h")["spec"]["template"]
    assert "priorityClassName" not in scoring["spec"] and scoring["metadata"]["annotations"] == {"team": "fusion"}


def test_scratch_models_and_checkpoints_volumes():
    spec = make_spec(cluster={"scratch": {"size": "50Gi", "storageClassName": "fast"},
                              "modelVolume": {"type": "emptyDir", "size": "300Gi"},
                              "checkpoints": {"size": "1Ti", "accessModes": ["ReadWriteMany"]},
                              "training": {"gpus": 8, "nodes": 2}})
    job = b.build_stage_runner(RUN, NS, spec, "prepare", URI)
    pod = job["spec"]["template"]["spec"]
    scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
    claim = scratch["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
                     "storageClassName": "fast"}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["WRPO_WORKDIR"] == "/work" and env["HF_HOME"] == "/work/hf" and env["HOME"] == "/work/home"
    assert {"name": "scratch", "mountPath": "/work"} in pod["containers"][0]["volumeMounts"]
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, "llama"), "sample-sources")
    weights = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights")
    assert weights == {"name": "weights", "emptyDir": {"sizeLimit": "300Gi"}}
    # training pods mount the run's PVC at the workdir's scratch folder, where checkpoints live
    from wrpo.pipeline.workdir import Workdir

    pj = b.build_stage_runner(RUN, NS, spec, "wrpo", URI)
    for rep in pj["spec"]["pytorchReplicaSpecs"].values():
        mounts = {m["name"]: m["mountPath"] for m in rep["template"]["spec"]["containers"][0]["volumeMounts"]}
        folder = Workdir(URI, None).base  # <WRPO_WORKDIR>/<run key> with WRPO_WORKDIR=/work
        assert mounts["checkpoints"] == f"/work/{folder.name}/scratch"
        assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "demo-checkpoints"}} \
            in rep["template"]["spec"]["volumes"]
    pvc = b.build_checkpoints_pvc(RUN, NS, spec)
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}}
    kids = b.stage_children(RUN, NS, spec, "sft", URI, "h")
    assert [o["kind"] for o in kids.volumes] == ["PersistentVolumeClaim"]
    assert b.stage_children(RUN, NS, spec, "prepare", URI, "h").volumes == []


def test_probes_and_the_progress_deadline_follow_cluster_vllm():
    spec = make_spec(cluster={"vllm": {"startupProbe": {"periodSeconds": 20, "failureThreshold": 360},
                                       "readinessProbe": {"periodSeconds": 2}}})
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, "llama"), "sample-sources")
    c = _container(dep, "vllm")
    assert c["startupProbe"]["periodSeconds"] == 20 and c["startupProbe"]["failureThreshold"] == 360
    assert c["readinessProbe"]["periodSeconds"] == 2 and c["readinessProbe"]["failureThreshold"] == 3
    assert c["livenessProbe"]["periodSeconds"] == 15
    assert dep["spec"]["progressDeadlineSeconds"] == 20 * 360 + 120
    default = b.build_vllm_deployment(RUN, NS, make_spec(), source_server(spec, "llama"), "sample-sources")
    assert default["spec"]["progressDeadlineSeconds"] == 10 * 180 + 120  # 30 min to load, then 2 more


def test_a_queue_suspends_runners_and_labels_every_child():
    spec = make_spec(cluster={"queueName": "gpu-queue", "training": {"gpus": 8, "nodes": 2},
                              "checkpoints": {"enabled": False}})
    job = b.build_stage_runner(RUN, NS, spec, "prepare", URI)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    pj = b.build_stage_runner(RUN, NS, spec, "sft", URI)
    assert pj["spec"]["runPolicy"]["suspend"] is True
    assert pj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    dep = b.build_vllm_deployment(RUN, NS, spec, source_server(spec, "llama"), "sample-sources")
    assert dep["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "suspend" not in b.build_stage_runner(RUN, NS, make_spec(), "prepare", URI)["spec"]


def test_gang_scheduling_policy_of_pytorchjobs():
    spec = make_spec(cluster={"schedulingPolicy": {"queue": "research", "scheduleTimeoutSeconds": 600},
                              "training": {"gpus": 8, "nodes": 4}, "checkpoints": {"accessModes": ["ReadWriteMany"]}})
    policy = b.build_stage_runner(RUN, NS, spec, "wrpo", URI)["spec"]["runPolicy"]["schedulingPolicy"]
    assert policy == {"minAvailable": 4, "queue": "research", "scheduleTimeoutSeconds": 600}
    assert "schedulingPolicy" not in b.build_stage_runner(RUN, NS, make_spec(), "wrpo", URI)["spec"]["runPolicy"]


def test_the_template_hash_moves_with_what_shapes_the_pods_and_nothing_else():
    base = make_spec()
    h = {c: b.template_hash(base, c, "s1") for c in ("vllm", "sampling", "scoring", "training", "small")}
    assert b.template_hash(base, "vllm", "s2") != h["vllm"]  # another stage hash
    vllm = make_spec(cluster={**base.cluster.model_dump(by_alias=True), "vllm": {"memory": "1Ti"}})
    assert b.template_hash(vllm, "vllm", "s1") != h["vllm"]
    assert all(b.template_hash(vllm, c, "s1") == h[c] for c in ("sampling", "scoring", "training", "small"))
    image = make_spec(cluster={**base.cluster.model_dump(by_alias=True), "runtimeImage": "r:2"})
    assert all(b.template_hash(image, c, "s1") != h[c] for c in h)  # every pod runs (or inits with) it
    pods = make_spec(cluster={**base.cluster.model_dump(by_alias=True),
                              "pods": {"scoring": {"priorityClassName": "x"}}})
    assert [c for c in h if b.template_hash(pods, c, "s1") != h[c]] == ["scoring"]
    # operational settings and fields written at their defaults change nothing
    same = make_spec(cluster={**base.cluster.model_dump(by_alias=True), "stallTimeoutSeconds": 60,
                              "ttlSecondsAfterFinished": 5, "scratch": {"type": "ephemeral"}})
    assert all(b.template_hash(same, c, "s1") == h[c] for c in h)


def test_multi_node_training_needs_a_shared_checkpoint_volume():
    from wrpo.errors import SpecError

    with pytest.raises(SpecError, match="cluster: 'checkpoints.accessModes' needs ReadWriteMany"):
        make_spec(cluster={"training": {"gpus": 8, "nodes": 2}})
    make_spec(cluster={"training": {"gpus": 8, "nodes": 2}, "checkpoints": {"enabled": False}})
    make_spec(cluster={"training": {"gpus": 8, "nodes": 1}})


def test_eval_stage_serves_three_models_and_a_local_judge_and_passes_their_endpoints():
    spec = make_spec(dataset={"uri": "s3://bucket/data/prompts.jsonl", "evalSize": 16},
                     eval={"judge": {"model": "s3://bucket/models/judge", "tensorParallelSize": 2}})
    children = b.build_stage_servers(RUN, NS, spec, "eval", URI, "h")
    deployments = {d["metadata"]["name"]: d for d in children if d["kind"] == "Deployment"}
    assert sorted(deployments) == ["demo-eval-fused", "demo-eval-sft", "demo-eval-target", "demo-judge"]
    assert [s["metadata"]["name"] for s in children if s["kind"] == "Service"] == sorted(deployments, key=list(
        deployments).index)
    args = {n: d["spec"]["template"]["spec"]["containers"][0]["args"] for n, d in deployments.items()}
    inits = {n: d["spec"]["template"]["spec"].get("initContainers", []) for n, d in deployments.items()}
    assert inits["demo-eval-fused"][0]["command"][2] == f"{URI}/wrpo/model/"  # fetched from the run
    assert inits["demo-eval-sft"][0]["command"][2] == f"{URI}/sft/model/"
    assert inits["demo-eval-target"][0]["command"][2] == "s3://bucket/models/target"
    assert args["demo-judge"][args["demo-judge"].index("--tensor-parallel-size") + 1] == "2"
    job = b.build_stage_runner(RUN, NS, spec, "eval", URI, "h")
    command = _container(job)["command"]
    for role, child in (("target", "eval-target"), ("sft", "eval-sft"), ("fused", "eval-fused"), ("judge", "judge")):
        assert f"{role}=http://demo-{child}.team-a.svc:8000/v1" in command
    assert job["kind"] == "Job" and _container(job)["resources"]["requests"]["nvidia.com/gpu"] == "1"  # scoring


def test_eval_stage_gets_an_endpoint_judges_key_and_no_servers_without_prompts():
    judge = {"endpoint": {"url": "https://judge.example.com/v1", "model": "big", "apiKeyEnv": "JUDGE_KEY",
                          "apiKeySecret": "judge-key"}}
    spec = make_spec(eval={"judge": judge, "prompts": "s3://bucket/mt_bench.jsonl"})
    env = {e["name"]: e for e in _container(b.build_stage_runner(RUN, NS, spec, "eval", URI, "h"))["env"]}
    assert env["JUDGE_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "judge-key", "key": "api-key"}
    assert "API_KEY" not in env  # the sources' keys stay with the sampling stage
    assert len(b.build_stage_servers(RUN, NS, spec, "eval", URI, "h")) == 6  # no server for an endpoint judge
    assert b.build_stage_servers(RUN, NS, make_spec(), "eval", URI, "h") == []  # no eval prompts: no servers
    reward_judge = make_spec(reward={"type": "judge", "judge": judge})
    score_env = {e["name"] for e in _container(b.build_stage_runner(RUN, NS, reward_judge, "score-sources", URI,
                                                                    "h"))["env"]}
    assert "JUDGE_KEY" in score_env and b.build_stage_servers(RUN, NS, reward_judge, "score-sources", URI, "h") == []


# -- one server, two launchers (wrpo.pipeline.servers) ------------------------------------------------------

def _options(argv: list[str]) -> list[str]:
    """A vLLM command line's options after the model, host and port left out (they differ by design)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--host", "--port"):
            skip = True
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("gpus", [None, 0])
def test_a_local_server_and_its_deployment_run_the_same_vllm_options(monkeypatch, gpus):
    """The local subprocess and the cluster Deployment of one plan Server differ only in how vLLM is started
    (`python -m ...api_server --model M` / `vllm serve M`), the host and the port: on GPUs and on CPU alike."""
    from wrpo.data import serving

    spec = make_spec(cluster={"vllm": {"gpus": gpus}} if gpus is not None else {},
                     sampling={"seed": 7})
    monkeypatch.setattr(serving, "on_gpu", lambda: gpus is None)
    for server in servers(spec, "sample-sources", URI):
        local = serving.VLLMServer.of(server, "/weights/model", python="/py").command()
        assert local[:5] == ["/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/weights/model"]
        dep = b.build_vllm_deployment(RUN, NS, spec, server, "sample-sources", "h")
        cluster = _container(dep)["args"]
        assert _options(local[5:]) == _options(cluster[1:]), server.key
        assert cluster[cluster.index("--seed") + 1] == "7"  # the engine seed, on both sides
        assert ("--enforce-eager" in cluster) == (gpus == 0 or server.source == "qwen")


def test_a_server_with_replicas_is_one_deployment_of_that_many_pods():
    spec = make_spec(target={"model": "s3://bucket/models/target", "replicas": 3})
    (server,) = servers(spec, "sample-target", URI)
    dep = b.build_vllm_deployment(RUN, NS, spec, server, "sample-target", "h")
    assert dep["spec"]["replicas"] == 3
    from wrpo.pipeline.gpus import object_gpus

    assert object_gpus(dep) == server.gpus(spec.cluster.vllm.gpus) == 3


def test_an_eval_judge_that_is_also_the_reward_judge_is_one_deployment():
    """reward.type judge with the same local model and settings as eval.judge: one server for both roles."""
    judge = {"model": "s3://bucket/models/judge", "tensorParallelSize": 2}
    spec = make_spec(dataset={"uri": "s3://bucket/data/prompts.jsonl", "evalSize": 16},
                     reward={"type": "judge", "judge": {**judge, "servedName": "grader"}}, eval={"judge": judge})
    children = b.build_stage_servers(RUN, NS, spec, "eval", URI, "h")
    deployments = {d["metadata"]["name"]: d for d in children if d["kind"] == "Deployment"}
    assert sorted(deployments) == ["demo-eval-fused", "demo-eval-sft", "demo-eval-target", "demo-judge"]
    args = _container(deployments["demo-judge"])["args"]
    assert args[args.index("--served-model-name"):][:3] == ["--served-model-name", "judge", "grader"]
    command = _container(b.build_stage_runner(RUN, NS, spec, "eval", URI, "h"))["command"]
    assert "judge=http://demo-judge.team-a.svc:8000/v1" in command
    assert command[command.index("--reward-endpoint") + 1] == "http://demo-judge.team-a.svc:8000"
    # another judge model: two servers
    other = make_spec(dataset={"uri": "s3://bucket/data/prompts.jsonl", "evalSize": 16},
                      reward={"type": "judge", "judge": {**judge, "tensorParallelSize": 1}}, eval={"judge": judge})
    names = [d["metadata"]["name"] for d in b.build_stage_servers(RUN, NS, other, "eval", URI, "h")
             if d["kind"] == "Deployment"]
    assert sorted(names) == ["demo-eval-fused", "demo-eval-sft", "demo-eval-target", "demo-judge", "demo-reward"]

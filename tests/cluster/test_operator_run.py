"""The operator against the harness's control plane: the chart's ServiceAccount (RBAC enforced), a
real kopf process, kwok completing stage pods. Reports reconciles and API calls of a tiny run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import GROUP, LABEL_RUN, PLURAL, VERSION

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wrpo-operator"
RELEASE = "wrpo-operator"


def tiny_spec(**cluster) -> dict:
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["cluster"].update(cluster)
    return spec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """`python -m wrpo_operator` as a local process acting as the chart's ServiceAccount."""

    def __init__(self, identity, namespace: str, log: Path):
        self.identity, self.namespace, self.log = identity, namespace, log
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Operator:
        env = {**os.environ, **self.identity.env(),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]),
               "WRPO_OPERATOR_POLL_SECONDS": "1", "WRPO_OPERATOR_TRAINING_POLL_SECONDS": "1",
               "WRPO_OPERATOR_SERVER_POLL_SECONDS": "1", "WRPO_OPERATOR_SHORT_SECONDS": "1",
               "WRPO_OPERATOR_METRICS_PORT": str(self.metrics_port),
               "WRPO_OPERATOR_SCANNING": "false"}  # as the chart sets it in namespace scope
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [sys.executable, "-m", "wrpo_operator", "--standalone", f"--namespace={self.namespace}",
                f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz", "--debug"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        wait(lambda: self._get(f"http://127.0.0.1:{self.liveness_port}/healthz"), 60, "operator liveness",
             self)
        return self

    def _get(self, url: str) -> str | None:
        assert self.process and self.process.poll() is None, f"operator exited:\n{self.tail()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        text = self._get(f"http://127.0.0.1:{self.metrics_port}/metrics") or ""
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(wrpo_\w+)(\{[^}]*\})? ([0-9.e+]+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def kopf_patches(self) -> int:
        return len(re.findall(r"Merge-patching the (?:resource|status) with", self.log.read_text()))

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def wait(check, timeout: float, what: str, operator: Operator | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    detail = operator.tail() if operator else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{detail}")


@pytest.fixture
def apis(k8s_api_client):
    from kubernetes import client

    return (client.CustomObjectsApi(k8s_api_client), client.BatchV1Api(k8s_api_client),
            client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client))


@pytest.fixture
def operator(k8s_namespace, helm_install, service_account, tmp_path):
    """The chart installed in namespace scope, and the operator running as its ServiceAccount."""
    helm_install(CHART, RELEASE, k8s_namespace, wait=True,
                 values={"scope": "namespace", "metrics": {"enabled": False}})
    identity = service_account(k8s_namespace, RELEASE, create=False)
    op = Operator(identity, k8s_namespace, tmp_path / "operator.log").start()
    yield op
    op.kill(signal.SIGTERM)
    print(f"\noperator log: {op.log}")


def create_run(custom, ns: str, name: str, spec: dict, annotations: dict | None = None) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FusionRun",
            "metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def patch_run(custom, ns, name, patch: dict) -> dict:
    return custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch,
                                                 _content_type="application/merge-patch+json")


def get_run(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def wait_phase(custom, ns, name, phases, timeout, operator) -> dict:
    phases = {phases} if isinstance(phases, str) else set(phases)

    def check():
        status = get_run(custom, ns, name).get("status") or {}
        return status if status.get("phase") in phases else None

    return wait(check, timeout, f"FusionRun {name} phase in {phases}", operator)


def children(apis, ns, name) -> dict[str, list[dict]]:
    custom, batch, apps, core = apis
    sel = f"{LABEL_RUN}={name}"
    return {
        "Job": batch.list_namespaced_job(ns, label_selector=sel).to_dict()["items"],
        "Deployment": apps.list_namespaced_deployment(ns, label_selector=sel).to_dict()["items"],
        "Service": core.list_namespaced_service(ns, label_selector=sel).to_dict()["items"],
        "ConfigMap": core.list_namespaced_config_map(ns, label_selector=sel).to_dict()["items"],
        "PyTorchJob": custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs",
                                                           label_selector=sel)["items"],
    }


def events(core, ns, name) -> list[tuple[str, str, str]]:
    items = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    items.sort(key=lambda e: (e.first_timestamp or e.event_time, e.metadata.creation_timestamp))
    ours = [e for e in items if e.source and e.source.component == "wrpo-operator"]
    return [(e.type, e.reason, e.message) for e in ours]


def test_tiny_run_walks_the_stages_in_order_and_succeeds(operator, apis, k8s_namespace):
    custom, batch, apps, core = apis
    create_run(custom, k8s_namespace, "tiny", tiny_spec())
    t0 = time.monotonic()
    status = wait_phase(custom, k8s_namespace, "tiny", ["Succeeded", "Failed"], 300, operator)
    elapsed = time.monotonic() - t0
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}" and status["outputUri"] == "s3://wrpo/runs/tiny/wrpo/model/"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Ready"] == "True" and conds["Succeeded"] == "True" and conds["Progressing"] == "False"
    kids = children(apis, k8s_namespace, "tiny")
    assert len(kids["Job"]) == len(STAGE_NAMES) - 2 and len(kids["PyTorchJob"]) == 2 and len(kids["ConfigMap"]) == 1
    assert kids["Deployment"] == [] and kids["Service"] == []  # GPUs freed after each sampling stage
    # in order: each runner was created after the previous stage completed
    stages = status["stages"]
    created = {j["metadata"]["name"]: j["metadata"]["creation_timestamp"] for j in kids["Job"]}
    created.update({p["metadata"]["name"]: p["metadata"]["creationTimestamp"] for p in kids["PyTorchJob"]})
    for prev, cur in zip(stages, stages[1:], strict=False):
        assert str(created[f"tiny-{cur['name']}"]).replace(" ", "T")[:19] >= prev["completionTime"][:19]
    reasons = [r for _, r, _ in events(core, k8s_namespace, "tiny")]
    assert reasons.count("StageStarted") == reasons.count("StageSucceeded") == len(STAGE_NAMES)
    assert "RunSucceeded" in reasons
    m = operator.metrics()
    calls = {k: v for k, v in m.items() if k.startswith("wrpo_apiserver_requests_total")}
    report = {
        "seconds": round(elapsed, 1),
        "reconciles": m.get('wrpo_reconciles_total{result="ok"}'),
        "reconciler_api_calls": sum(calls.values()),
        "by_verb": {re.sub(r'.*kind="(\w+)",verb="([\w/]+)".*', r"\2 \1", k): v for k, v in calls.items()},
        "kopf_patches": operator.kopf_patches(),
    }
    print("\nTINY RUN:", json.dumps(report, sort_keys=True))
    (Path(os.environ.get("WRPO_REPORT_DIR", operator.log.parent)) / "tiny-run-calls.json").write_text(
        json.dumps(report, indent=1))


def test_failed_stage_is_retried_then_fails_the_run(operator, apis, k8s_namespace):
    custom, batch, apps, core = apis
    create_run(custom, k8s_namespace, "bad",
               tiny_spec(backoffLimit=1, podAnnotations={"wrpo.test/fail": "true"}))
    status = wait_phase(custom, k8s_namespace, "bad", "Failed", 180, operator)
    assert status["stage"] == "prepare" and "BackoffLimitExceeded" in status["message"]
    assert status["stages"][0]["retries"] == 2  # the first pod and one retry
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "Failed"
    evs = events(core, k8s_namespace, "bad")
    assert ("Warning", "StageFailed") in [(t, r) for t, r, _ in evs]
    assert ("Warning", "RunFailed") in [(t, r) for t, r, _ in evs]
    pods = core.list_namespaced_pod(k8s_namespace, label_selector="fusion.wrpo.io/stage=prepare").items
    assert len(pods) == 2 and all(p.status.phase == "Failed" for p in pods)


def test_operator_restart_mid_run_finishes_without_duplicates(operator, apis, k8s_namespace):
    custom, batch, apps, core = apis
    create_run(custom, k8s_namespace, "restart", tiny_spec(podAnnotations={"wrpo.test/run-duration": "3s"}))
    def at_scoring():
        return (get_run(custom, k8s_namespace, "restart").get("status") or {}).get("stage") == "score-sources"

    wait(at_scoring, 180, "stage score-sources", operator)
    operator.kill()  # SIGKILL, mid-stage
    time.sleep(5)  # the running Job finishes while nobody watches
    operator.start()
    status = wait_phase(custom, k8s_namespace, "restart", ["Succeeded", "Failed"], 300, operator)
    assert status["phase"] == "Succeeded"
    kids = children(apis, k8s_namespace, "restart")
    assert len(kids["Job"]) == len(STAGE_NAMES) - 2 and len(kids["PyTorchJob"]) == 2
    for job in kids["Job"]:
        pods = core.list_namespaced_pod(k8s_namespace, label_selector=f"job-name={job['metadata']['name']}")
        assert len(pods.items) == 1, job["metadata"]["name"]  # no stage ran twice
    assert [st["state"] for st in status["stages"]] == ["Succeeded"] * len(STAGE_NAMES)
    # Events are best effort: those of the reconcile in flight at the SIGKILL may be lost, but no stage
    # may be reported started twice.
    started = [m for _, r, m in events(core, k8s_namespace, "restart") if r == "StageStarted"]
    assert len(started) == len(set(started)) and len(started) >= 8, started


def test_suspend_removes_active_children_and_resume_continues(operator, apis, k8s_namespace):
    custom, batch, apps, core = apis
    create_run(custom, k8s_namespace, "pause", tiny_spec(podAnnotations={"wrpo.test/run-duration": "2s"}))
    wait(lambda: children(apis, k8s_namespace, "pause")["Deployment"], 120, "vLLM Deployments", operator)
    prepare_uid = batch.read_namespaced_job("pause-prepare", k8s_namespace).metadata.uid
    patch_run(custom, k8s_namespace, "pause", {"spec": {"suspend": True}})
    status = wait_phase(custom, k8s_namespace, "pause", "Suspended", 60, operator)
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Suspended"] == "True"

    def quiet():
        kids = children(apis, k8s_namespace, "pause")
        jobs = [j["metadata"]["name"] for j in kids["Job"]]
        return not kids["Deployment"] and not kids["Service"] and jobs == ["pause-prepare"]

    wait(quiet, 60, "active children removed", operator)
    patch_run(custom, k8s_namespace, "pause", {"spec": {"suspend": False}})
    status = wait_phase(custom, k8s_namespace, "pause", ["Succeeded", "Failed"], 300, operator)
    assert status["phase"] == "Succeeded"
    assert batch.read_namespaced_job("pause-prepare", k8s_namespace).metadata.uid == prepare_uid  # not re-run
    reasons = [r for _, r, _ in events(core, k8s_namespace, "pause")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_deleting_the_run_removes_every_child(operator, apis, k8s_namespace):
    custom, batch, apps, core = apis
    create_run(custom, k8s_namespace, "gone", tiny_spec(podAnnotations={"wrpo.test/run-duration": "3s"}))
    wait(lambda: children(apis, k8s_namespace, "gone")["Deployment"], 120, "vLLM Deployments", operator)
    custom.delete_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, "gone",
                                           body={"propagationPolicy": "Background"})

    def all_gone():
        with contextlib.suppress(Exception):
            get_run(custom, k8s_namespace, "gone")
            return False
        kids = children(apis, k8s_namespace, "gone")
        pods = core.list_namespaced_pod(k8s_namespace, label_selector=f"{LABEL_RUN}=gone").items
        return not any(kids.values()) and not pods

    wait(all_gone, 120, "FusionRun and all its children gone", operator)


def test_stage_names_cover_the_plan():
    assert len(STAGE_NAMES) == 11

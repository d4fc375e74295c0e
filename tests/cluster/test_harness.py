"""The harness is a real control plane: admission, controllers, scheduler, RBAC, kwok Stages,
the training-operator, helm and the pod runner each do their real work here."""

from __future__ import annotations

import contextlib
import sys
import textwrap

import pytest
from k8s_harness import FAIL_ANNOTATION, RUN_DURATION_ANNOTATION, wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


def test_crd_cel_rule_rejects_bad_object_with_apiserver_message(k8s_api_client, k8s_namespace):
    ext = client.ApiextensionsV1Api(k8s_api_client)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.wrpo.io"},
        "spec": {
            "group": "test.wrpo.io",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                        "x-kubernetes-validations": [
                            {"rule": "self.min <= self.max", "message": "min must not exceed max"}
                        ],
                    }},
                }},
            }],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:
        wait_for("Widget CRD Established", lambda: any(
            c.type == "Established" and c.status == "True"
            for c in ext.read_custom_resource_definition("widgets.test.wrpo.io").status.conditions or []
        ), 30)
        custom = client.CustomObjectsApi(k8s_api_client)

        def widget(name, lo, hi):
            return {"apiVersion": "test.wrpo.io/v1", "kind": "Widget",
                    "metadata": {"name": name}, "spec": {"min": lo, "max": hi}}

        # Creation right after Established can race discovery; retry the good object briefly.
        wait_for("good Widget accepted", lambda: custom.create_namespaced_custom_object(
            "test.wrpo.io", "v1", k8s_namespace, "widgets", widget("good", 1, 2)), 120)
        with pytest.raises(ApiException) as bad:
            custom.create_namespaced_custom_object("test.wrpo.io", "v1", k8s_namespace, "widgets",
                                                   widget("bad", 3, 2))
        assert bad.value.status == 422
        assert "min must not exceed max" in bad.value.body
        assert "spec: Invalid value" in bad.value.body
    finally:
        ext.delete_custom_resource_definition("widgets.test.wrpo.io")


def _deployment(name: str, replicas: int = 2, gpus: int = 0) -> dict:
    resources = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [
                {"name": "main", "image": "example.invalid/server:1", "resources": resources}
            ]}},
        },
    }


def test_deployment_gets_replicaset_and_ready_pods_on_kwok_nodes(k8s_cluster, k8s_api_client, k8s_namespace):
    apps, core = client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client)
    apps.create_namespaced_deployment(k8s_namespace, _deployment("web", replicas=2, gpus=1))
    wait_for("Deployment web available", lambda: (
        apps.read_namespaced_deployment("web", k8s_namespace).status.ready_replicas == 2), 60)
    replicasets = apps.list_namespaced_replica_set(k8s_namespace).items
    assert [rs.metadata.owner_references[0].name for rs in replicasets] == ["web"]
    pods = core.list_namespaced_pod(k8s_namespace, label_selector="app=web").items
    assert len(pods) == 2
    for pod in pods:
        assert pod.spec.node_name in k8s_cluster.nodes
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
        assert pod.metadata.owner_references[0].kind == "ReplicaSet"


def test_unschedulable_gpu_request_stays_pending(k8s_api_client, k8s_namespace):
    apps, core = client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client)
    apps.create_namespaced_deployment(k8s_namespace, _deployment("huge", replicas=1, gpus=64))

    def unschedulable():
        pods = core.list_namespaced_pod(k8s_namespace, label_selector="app=huge").items
        return pods and any(c.reason == "Unschedulable" for c in pods[0].status.conditions or [])

    wait_for("pod marked Unschedulable by the scheduler", unschedulable, 180)


def test_deleting_owner_garbage_collects_children(k8s_api_client, k8s_namespace):
    apps, core = client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client)
    apps.create_namespaced_deployment(k8s_namespace, _deployment("gc", replicas=1))
    wait_for("Deployment gc ready", lambda: (
        apps.read_namespaced_deployment("gc", k8s_namespace).status.ready_replicas == 1), 60)
    apps.delete_namespaced_deployment("gc", k8s_namespace, propagation_policy="Background")
    wait_for("ReplicaSets and Pods of gc collected", lambda: (
        not apps.list_namespaced_replica_set(k8s_namespace).items
        and not core.list_namespaced_pod(k8s_namespace, label_selector="app=gc").items), 60)

    # An owner reference set by hand is honoured as well.
    owner = core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(k8s_namespace, {"metadata": {
        "name": "child",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                             "uid": owner.metadata.uid}],
    }})
    core.delete_namespaced_config_map("owner", k8s_namespace)

    def child_gone():
        try:
            core.read_namespaced_config_map("child", k8s_namespace)
        except ApiException as e:
            return e.status == 404
        return False

    wait_for("child ConfigMap collected", child_gone, 180)


def _pytorchjob(name: str, workers: int, fail: bool = False) -> dict:
    def replica(count: int) -> dict:
        annotations = {FAIL_ANNOTATION: "true", "wrpo.test/exit-code": "3"} if fail else {}
        return {
            "replicas": count, "restartPolicy": "Never",
            "template": {"metadata": {"annotations": annotations}, "spec": {"containers": [{
                "name": "pytorch", "image": "example.invalid/runtime:1",
                "command": ["python", "-c", "print('train')"],
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
            }]}},
        }

    specs = {"Master": replica(1)}
    if workers:
        specs["Worker"] = replica(workers)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"runPolicy": {"backoffLimit": 0}, "pytorchReplicaSpecs": specs}}


def _job_condition(custom, namespace, name) -> set[str]:
    job = custom.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", name)
    return {c["type"] for c in job.get("status", {}).get("conditions", []) if c["status"] == "True"}


def test_pytorchjob_gets_pods_and_services_and_succeeds(k8s_api_client, k8s_namespace):
    custom, core = client.CustomObjectsApi(k8s_api_client), client.CoreV1Api(k8s_api_client)
    custom.create_namespaced_custom_object("kubeflow.org", "v1", k8s_namespace, "pytorchjobs",
                                           _pytorchjob("train", workers=1))
    wait_for("PyTorchJob Succeeded",
             lambda: "Succeeded" in _job_condition(custom, k8s_namespace, "train"), 90)

    def pods_when_all_succeeded():
        # The training operator calls the job Succeeded once the master has; the worker, run by kwok on its
        # own clock, may finish a moment later (a loaded machine showed it still Running).
        pods = core.list_namespaced_pod(k8s_namespace,
                                        label_selector="training.kubeflow.org/job-name=train").items
        return pods if {p.status.phase for p in pods} == {"Succeeded"} else None

    pods = wait_for("both PyTorchJob pods Succeeded", pods_when_all_succeeded, 60)
    replica_types = sorted(p.metadata.labels["training.kubeflow.org/replica-type"] for p in pods)
    assert replica_types == ["master", "worker"]
    master = next(p for p in pods if p.metadata.labels["training.kubeflow.org/replica-type"] == "master")
    env = {e.name: e.value for e in master.spec.containers[0].env}
    assert env["RANK"] == "0" and "WORLD_SIZE" in env and "MASTER_PORT" in env  # the operator's
    services = core.list_namespaced_service(k8s_namespace).items
    assert "train-master-0" in {s.metadata.name for s in services}


def test_pytorchjob_with_fail_hook_fails(k8s_api_client, k8s_namespace):
    custom, core = client.CustomObjectsApi(k8s_api_client), client.CoreV1Api(k8s_api_client)
    custom.create_namespaced_custom_object("kubeflow.org", "v1", k8s_namespace, "pytorchjobs",
                                           _pytorchjob("broken", workers=0, fail=True))
    wait_for("PyTorchJob Failed", lambda: "Failed" in _job_condition(custom, k8s_namespace, "broken"), 90)
    pod = core.list_namespaced_pod(k8s_namespace,
                                   label_selector="training.kubeflow.org/job-name=broken").items[0]
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3


def test_pytorchjob_webhook_rejects_invalid_job(k8s_api_client, k8s_namespace):
    custom = client.CustomObjectsApi(k8s_api_client)
    job = _pytorchjob("no-master", workers=1)
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2  # the webhook allows only 1
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object("kubeflow.org", "v1", k8s_namespace, "pytorchjobs", job)
    assert "validator.pytorchjob.training-operator.kubeflow.org" in rejected.value.body


def test_batch_job_completes_and_fail_hook_retries(k8s_api_client, k8s_namespace):
    batch = client.BatchV1Api(k8s_api_client)

    def job(name, annotations, backoff):
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "spec": {
            "backoffLimit": backoff, "template": {
                "metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never", "containers": [
                    {"name": "main", "image": "example.invalid/x:1", "command": ["true"]}]}}}}

    batch.create_namespaced_job(k8s_namespace, job("ok", {RUN_DURATION_ANNOTATION: "4s"}, 0))
    batch.create_namespaced_job(k8s_namespace, job("retry", {FAIL_ANNOTATION: "true"}, 1))
    wait_for("Job ok complete",
             lambda: batch.read_namespaced_job("ok", k8s_namespace).status.succeeded == 1, 180)

    def failed_after_retry():
        status = batch.read_namespaced_job("retry", k8s_namespace).status
        return any(c.type == "Failed" and c.status == "True" for c in status.conditions or []) and status

    status = wait_for("Job retry Failed after its retry", failed_after_retry, 300)
    assert status.failed == 2  # the first pod and one retry
    ok = batch.read_namespaced_job("ok", k8s_namespace).status
    assert (ok.completion_time - ok.start_time).total_seconds() >= 3  # the run-duration knob


def test_service_account_rbac_is_enforced(k8s_api_client, k8s_namespace, service_account):
    rbac = client.RbacAuthorizationV1Api(k8s_api_client)
    rbac.create_namespaced_role(k8s_namespace, {
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    })
    rbac.create_namespaced_role_binding(k8s_namespace, {
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}],
    })
    identity = service_account(k8s_namespace, "reader")
    with contextlib.closing(identity.api_client()) as api:
        core = client.CoreV1Api(api)
        core.list_namespaced_config_map(k8s_namespace)  # inside the Role
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(k8s_namespace)  # outside it
        assert denied.value.status == 403
        assert identity.username in denied.value.body
        with pytest.raises(ApiException) as denied_write:
            core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "x"}})
        assert denied_write.value.status == 403


def test_pod_runner_runs_job_pod_command(k8s_api_client, local_namespace, pod_runner, tmp_path):
    core, batch = client.CoreV1Api(k8s_api_client), client.BatchV1Api(k8s_api_client)
    core.create_namespaced_secret(local_namespace, {"metadata": {"name": "s3"},
                                                    "stringData": {"key": "sekret"}})
    out = tmp_path / "out.txt"
    code = ("import os, pathlib; pathlib.Path(os.environ['OUT']).write_text("
            "os.environ['SECRET'] + ' ' + os.environ['ENDPOINT'] + ' ' + os.environ['POD'])")
    batch.create_namespaced_job(local_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "write"}, "spec": {
            "backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "example.invalid/runtime:1",
                "command": ["python", "-c", code],
                "env": [
                    {"name": "OUT", "value": str(out)},
                    {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
                    {"name": "ENDPOINT", "value": "http://models.other.svc.cluster.local:8000/v1"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
            }]}}}})
    pod_runner(local_namespace, host_map={"models.other": "127.0.0.1:18000"})
    wait_for("Job write complete",
             lambda: batch.read_namespaced_job("write", local_namespace).status.succeeded == 1, 180)
    secret, endpoint, pod_name = out.read_text().split(" ")
    assert secret == "sekret"
    assert endpoint == "http://127.0.0.1:18000/v1"
    assert pod_name.startswith("write-")
    pod = core.read_namespaced_pod(pod_name, local_namespace)
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_pod_runner_failing_command_fails_job(k8s_api_client, local_namespace, pod_runner):
    batch = client.BatchV1Api(k8s_api_client)
    batch.create_namespaced_job(local_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "boom"}, "spec": {
            "backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "example.invalid/runtime:1",
                "command": ["python", "-c", "import sys; print('start'); print('boom'); sys.exit(7)"]}]}}}})
    runner = pod_runner(local_namespace)
    wait_for("Job boom Failed", lambda: any(
        c.type == "Failed" and c.status == "True"
        for c in batch.read_namespaced_job("boom", local_namespace).status.conditions or []), 60)
    (pod_name,) = runner.pods
    assert "boom" in runner.logs(pod_name)
    core = client.CoreV1Api(k8s_api_client)
    pod = core.read_namespaced_pod(pod_name, local_namespace)
    assert pod.status.container_statuses[0].state.terminated.exit_code == 7
    # The apiserver serves the pod's log (the kwok Node's kubelet endpoint is the harness's log server),
    # as `kubectl logs` and client SDKs read it.
    assert core.read_namespaced_pod_log(pod_name, local_namespace, container="main") == "start\nboom\n"
    assert core.read_namespaced_pod_log(pod_name, local_namespace, tail_lines=1) == "boom\n"


def test_apiserver_reports_a_pod_without_a_local_log(k8s_cluster, k8s_api_client, k8s_namespace):
    """A pod kwok ran (no process, so no log) gets the log server's 404, as NotFound through the apiserver."""
    batch, core = client.BatchV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client)
    batch.create_namespaced_job(k8s_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "kwok-run"}, "spec": {
            "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "example.invalid/runtime:1"}]}}}})
    wait_for("Job kwok-run complete",
             lambda: batch.read_namespaced_job("kwok-run", k8s_namespace).status.succeeded == 1, 60)
    (pod,) = core.list_namespaced_pod(k8s_namespace, label_selector="job-name=kwok-run").items
    result = k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod.metadata.name, check=False)
    assert result.returncode != 0
    assert "NotFound" in result.stderr and f"pods/log {pod.metadata.name}" in result.stderr, result.stderr


def test_pod_runner_serves_deployment_behind_service(k8s_api_client, local_namespace, pod_runner, tmp_path):
    """A long-running pod with a readiness probe; a Job reaches it through the Service name."""
    apps, core, batch = (client.AppsV1Api(k8s_api_client), client.CoreV1Api(k8s_api_client),
                         client.BatchV1Api(k8s_api_client))
    server = [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "8000",
              "--directory", str(tmp_path)]
    (tmp_path / "health").write_text("ok")
    deployment = _deployment("model", replicas=1)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container.update(command=server, readinessProbe={"httpGet": {"path": "/health", "port": 8000}})
    apps.create_namespaced_deployment(local_namespace, deployment)
    core.create_namespaced_service(local_namespace, {"metadata": {"name": "model"}, "spec": {
        "selector": {"app": "model"}, "ports": [{"port": 80, "targetPort": 8000}]}})
    runner = pod_runner(local_namespace)
    wait_for("Deployment model ready", lambda: (
        apps.read_namespaced_deployment("model", local_namespace).status.ready_replicas == 1), 60)

    fetch = ("import os, urllib.request; print(urllib.request.urlopen(os.environ['URL']"
             ", timeout=5).read().decode())")
    batch.create_namespaced_job(local_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "client"}, "spec": {
            "backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "main", "image": "example.invalid/runtime:1", "command": ["python", "-c", fetch],
                "env": [{"name": "URL", "value": f"http://model.{local_namespace}.svc:80/health"}],
            }]}}}})
    wait_for("Job client complete",
             lambda: batch.read_namespaced_job("client", local_namespace).status.succeeded == 1, 180)
    client_pod = next(name for name in runner.pods if name.startswith("client-"))
    assert runner.logs(client_pod).rstrip().endswith("ok")

    (server_pod,) = [p for name, p in runner.pods.items() if name.startswith("model-")]
    assert server_pod.process.poll() is None
    apps.delete_namespaced_deployment("model", local_namespace)
    wait_for("server process stopped after the pod was deleted",
             lambda: server_pod.process.poll() is not None, 180)


def test_helm_install_tiny_chart(helm_install, k8s_api_client, k8s_namespace, tmp_path):
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\nreplicas: 1\n")
    (chart / "templates" / "resources.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: {{ .Release.Name }}-config
        data:
          greeting: {{ .Values.greeting | quote }}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {{ .Release.Name }}-app
        spec:
          replicas: {{ .Values.replicas }}
          selector:
            matchLabels: {app: {{ .Release.Name }}}
          template:
            metadata:
              labels: {app: {{ .Release.Name }}}
            spec:
              containers:
              - name: app
                image: example.invalid/app:1
        """))
    release = helm_install(chart, "tiny", k8s_namespace, values={"greeting": "hi"}, wait=True)
    assert release.status["info"]["status"] == "deployed"
    config_map = client.CoreV1Api(k8s_api_client).read_namespaced_config_map("tiny-config", k8s_namespace)
    assert config_map.data == {"greeting": "hi"}
    deployment = client.AppsV1Api(k8s_api_client).read_namespaced_deployment("tiny-app", k8s_namespace)
    assert deployment.status.ready_replicas == 1

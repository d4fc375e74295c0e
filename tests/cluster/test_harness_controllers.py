"""The optional controllers of the harness do their real work: Kubeflow Trainer v2 turns a TrainJob into a
JobSet, the JobSet controller makes its Jobs and pods (run by the pod runner) and the TrainJob completes;
Kueue admits Jobs against a ClusterQueue's GPU quota and keeps the rest suspended. Skipped without
tests/cluster/build-controllers.sh's output, failed instead with WRPO_REQUIRE_CONTROLLERS=1
(docs/cluster-harness.md, "Optional controllers")."""

from __future__ import annotations

import contextlib
import json

import pytest
from k8s_harness import (
    JOBSET_API,
    KUEUE_API,
    KUEUE_LOCAL_QUEUE,
    KUEUE_QUEUE_LABEL,
    RUN_DURATION_ANNOTATION,
    TRAINER_API,
    controller_versions,
    install_crds,
    start_api_server,
    trainer_compat_crds,
    wait_for,
)
from kubernetes import client
from kubernetes.client.rest import ApiException
from trainer_objects import condition, train_job, training_runtime

pytestmark = pytest.mark.cluster

# What the runtime's container runs: print the rendezvous variables the Trainer's torch plugin gave it.
PRINT_PET_ENV = (
    "import json, os; print(json.dumps({k: v for k, v in sorted(os.environ.items()) "
    "if k.startswith('PET_') or k == 'JOB_COMPLETION_INDEX'}))"
)


def test_trainjob_runs_as_jobset_pods_with_torch_rendezvous_env(
    k8s_controllers, k8s_api_client, local_namespace, pod_runner
):
    custom, batch, core = (
        client.CustomObjectsApi(k8s_api_client),
        client.BatchV1Api(k8s_api_client),
        client.CoreV1Api(k8s_api_client),
    )
    group, version = TRAINER_API
    ns, name = local_namespace, "echo"
    runner = pod_runner(ns)
    runtime = training_runtime("torch-echo", ["python", "-c", PRINT_PET_ENV])
    custom.create_namespaced_custom_object(group, version, ns, "trainingruntimes", runtime)
    custom.create_namespaced_custom_object(group, version, ns, "trainjobs", train_job(name, "torch-echo", 2))

    def complete():
        job = custom.get_namespaced_custom_object(group, version, ns, "trainjobs", name)
        failed = condition(job, "Failed")
        assert not (failed and failed["status"] == "True"), f"TrainJob failed: {failed}"
        done = condition(job, "Complete")
        return job if done and done["status"] == "True" else None

    try:
        completed = wait_for(f"TrainJob {name} Complete", complete, 120)
    finally:
        print(f"pod runner errors: {runner.errors}")
    # The Trainer made the JobSet (owned by the TrainJob), the JobSet controller made the Job and its pods.
    js_group, js_version = JOBSET_API
    jobset = custom.get_namespaced_custom_object(js_group, js_version, ns, "jobsets", name)
    assert [o["uid"] for o in jobset["metadata"]["ownerReferences"]] == [completed["metadata"]["uid"]]
    assert condition(jobset, "Completed")["status"] == "True"
    jobs = batch.list_namespaced_job(ns, label_selector=f"jobset.sigs.k8s.io/jobset-name={name}").items
    assert [j.metadata.name for j in jobs] == [f"{name}-node-0"]
    assert jobs[0].spec.completion_mode == "Indexed" and jobs[0].spec.completions == 2
    pods = core.list_namespaced_pod(ns, label_selector=f"jobset.sigs.k8s.io/jobset-name={name}").items
    assert sorted(p.status.phase for p in pods) == ["Succeeded", "Succeeded"]
    # What each process got: torchrun's rendezvous variables, one node rank per pod. Trainer names the first pod
    # by its host name under the JobSet's headless Service; the pod runner resolved that to the pod's address
    # (docs/cluster-harness.md, "The pod runner").
    first = next(p for p in pods if p.spec.hostname == f"{name}-node-0-0" and p.spec.subdomain == name)
    sent = {e.name: e.value for e in first.spec.containers[0].env}
    assert sent["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}"
    envs = sorted(
        (json.loads(runner.logs(p.metadata.name).strip().splitlines()[-1]) for p in pods),
        key=lambda env: env["PET_NODE_RANK"],
    )
    assert envs == [
        {
            "JOB_COMPLETION_INDEX": str(rank),
            "PET_MASTER_ADDR": runner.pods[first.metadata.name].ip,
            "PET_MASTER_PORT": "29500",
            "PET_NNODES": "2",
            "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1",
        }
        for rank in (0, 1)
    ]


def test_trainer_webhook_rejects_a_trainjob_it_cannot_run(k8s_controllers, k8s_api_client, k8s_namespace):
    custom = client.CustomObjectsApi(k8s_api_client)
    group, version = TRAINER_API
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(
            group, version, k8s_namespace, "trainjobs", train_job("no-runtime", "missing", 1)
        )
    # The Trainer's validating webhook (not the CRD schema) names the runtime it does not know.
    assert refused.value.status in (400, 403, 422), refused.value.body
    assert "validator.trainjob.trainer.kubeflow.org" in refused.value.body
    assert "specified trainingRuntime must be created before the TrainJob is created" in refused.value.body


def test_jobset_webhook_rejects_a_success_policy_on_a_job_it_does_not_have(
    k8s_controllers, k8s_api_client, k8s_namespace
):
    custom = client.CustomObjectsApi(k8s_api_client)
    group, version = JOBSET_API
    job_template = {
        "spec": {
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "example.invalid/x:1"}]}
            }
        }
    }
    jobset = {
        "apiVersion": f"{group}/{version}",
        "kind": "JobSet",
        "metadata": {"name": "bad-target"},
        "spec": {
            "replicatedJobs": [{"name": "workers", "replicas": 1, "template": job_template}],
            "successPolicy": {"operator": "All", "targetReplicatedJobs": ["leader"]},
        },
    }
    with pytest.raises(ApiException) as refused:
        custom.create_namespaced_custom_object(group, version, k8s_namespace, "jobsets", jobset)
    # JobSet's validating webhook (served on 127.0.0.1 with the harness CA), not the CRD schema.
    assert "vjobset.kb.io" in refused.value.body, refused.value.body
    assert "invalid replicatedJob name 'leader' does not appear in .spec.ReplicatedJobs" in refused.value.body


def _gpu_job(name: str, queue: str, gpus: int, run_for: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {KUEUE_QUEUE_LABEL: queue}},
        "spec": {
            "suspend": False,  # Kueue's webhook suspends it on creation; Kueue unsuspends it when admitted
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": {RUN_DURATION_ANNOTATION: run_for}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "example.invalid/train:1",
                            "resources": {
                                "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
                                "limits": {"nvidia.com/gpu": str(gpus)},
                            },
                        }
                    ],
                },
            },
        },
    }


def test_kueue_admits_within_the_gpu_quota_and_queues_the_rest(k8s_controllers, k8s_api_client, kueue_namespace):
    custom, batch, core = (
        client.CustomObjectsApi(k8s_api_client),
        client.BatchV1Api(k8s_api_client),
        client.CoreV1Api(k8s_api_client),
    )
    group, version = KUEUE_API
    ns, queue = kueue_namespace, KUEUE_LOCAL_QUEUE

    def workload(job_name: str) -> dict | None:
        for wl in custom.list_namespaced_custom_object(group, version, ns, "workloads")["items"]:
            if any(o["kind"] == "Job" and o["name"] == job_name for o in wl["metadata"].get("ownerReferences", [])):
                return wl
        return None

    def admitted(job_name: str):
        wl = workload(job_name)
        return wl if wl and (condition(wl, "Admitted") or {}).get("status") == "True" else None

    # Each Job asks 6 of the ClusterQueue's 8 GPUs (a kwok Node has 8): only one fits at a time.
    created = batch.create_namespaced_job(ns, _gpu_job("first", queue, 6, "20s"))
    assert created.spec.suspend is True  # Kueue's mutating webhook, at admission
    wait_for("Workload of Job first admitted", lambda: admitted("first"), 180)
    wait_for("Job first unsuspended", lambda: batch.read_namespaced_job("first", ns).spec.suspend is False, 120)
    batch.create_namespaced_job(ns, _gpu_job("second", queue, 6, "1s"))

    def pending_for_quota():
        wl = workload("second")
        reserved = condition(wl, "QuotaReserved") if wl else None
        waiting = reserved and reserved["status"] == "False" and "insufficient" in reserved["message"]
        return reserved if waiting else None

    reason = wait_for("Workload of Job second pending for quota", pending_for_quota, 120)
    assert reason["reason"] == "Pending"
    assert "nvidia.com/gpu" in reason["message"], reason["message"]
    # While the first runs, the second stays suspended and has no pod: nothing runs beyond the quota.
    assert batch.read_namespaced_job("first", ns).status.active == 1
    assert batch.read_namespaced_job("second", ns).spec.suspend is True
    assert not core.list_namespaced_pod(ns, label_selector="job-name=second").items
    assert admitted("second") is None

    # Once the first finishes, its quota comes back and Kueue admits the second.
    wait_for("Job first complete", lambda: batch.read_namespaced_job("first", ns).status.succeeded == 1, 180)
    wait_for("Workload of Job second admitted", lambda: admitted("second"), 180)
    wait_for("Job second complete", lambda: batch.read_namespaced_job("second", ns).status.succeeded == 1, 180)
    first = workload("first")
    assert (condition(first, "Finished") or {}).get("status") == "True", first.get("status")


def test_kueue_leaves_namespaces_it_does_not_manage_alone(k8s_controllers, k8s_api_client, k8s_namespace):
    """The session's other tests label children for a queue no Kueue serves: outside the namespaces labelled
    KUEUE_NAMESPACE_LABEL, Kueue neither suspends such a Job nor makes a Workload for it."""
    batch, custom = client.BatchV1Api(k8s_api_client), client.CustomObjectsApi(k8s_api_client)
    group, version = KUEUE_API
    created = batch.create_namespaced_job(k8s_namespace, _gpu_job("unmanaged", "team-gpus", 6, "1s"))
    assert created.spec.suspend is False
    wait_for(
        "Job unmanaged complete", lambda: batch.read_namespaced_job("unmanaged", k8s_namespace).status.succeeded, 60
    )
    assert not custom.list_namespaced_custom_object(group, version, k8s_namespace, "workloads")["items"]


def test_kueue_admits_a_trainjob_of_a_queue(k8s_controllers, k8s_api_client, kueue_namespace):
    """Kueue v0.17 suspends a TrainJob labelled for its LocalQueue and unsuspends it on admission by writing
    `spec.runtimePatches` (a Trainer v2.2 field: on Trainer v2.0 the update was refused and the TrainJob stayed
    suspended). kwok completes the JobSet's pods in this namespace."""
    custom = client.CustomObjectsApi(k8s_api_client)
    group, version = TRAINER_API
    ns, name = kueue_namespace, "queued"
    custom.create_namespaced_custom_object(
        group, version, ns, "trainingruntimes", training_runtime("torch-queued", ["python", "-c", "pass"])
    )
    created = custom.create_namespaced_custom_object(
        group, version, ns, "trainjobs", train_job(name, "torch-queued", 2, queue=KUEUE_LOCAL_QUEUE)
    )
    assert created["spec"].get("suspend") is True  # Kueue's mutating webhook, at admission

    def workload():
        for wl in custom.list_namespaced_custom_object(*KUEUE_API, ns, "workloads")["items"]:
            if any(o["kind"] == "TrainJob" and o["name"] == name for o in wl["metadata"].get("ownerReferences", [])):
                return wl
        return None

    def admitted():
        wl = workload()
        return wl if wl and (condition(wl, "Admitted") or {}).get("status") == "True" else None

    wl = wait_for(f"Workload of TrainJob {name} admitted", admitted, 60)
    assert [ps["count"] for ps in wl["spec"]["podSets"]] == [2]

    def get():
        return custom.get_namespaced_custom_object(group, version, ns, "trainjobs", name)

    wait_for(f"TrainJob {name} unsuspended", lambda: get()["spec"].get("suspend") is False, 30)

    def complete():
        job = get()
        failed = condition(job, "Failed")
        assert not (failed and failed["status"] == "True"), f"TrainJob failed: {failed}"
        return (condition(job, "Complete") or {}).get("status") == "True"

    wait_for(f"TrainJob {name} Complete", complete, 90)
    wait_for(
        f"Workload of TrainJob {name} Finished",
        lambda: (condition(workload(), "Finished") or {}).get("status") == "True",
        30,
    )


def _contains(sent, got, path: str = "") -> list[str]:
    """Where `got` lacks or changed what `sent` has (fields the apiserver pruned or rewrote)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path or "."]
        return [p for key, value in sent.items() for p in _contains(value, got.get(key), f"{path}.{key}")]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, got, strict=True)) for p in _contains(a, b, f"{path}[{i}]")]
    return [] if sent == got else [path]


def _trainer_shapes(queue: str) -> tuple[dict, list[dict]]:
    """The TrainingRuntime and TrainJobs the compatibility test sends: a TrainJob that only sets numNodes and
    numProcPerNode (what the operator creates) and one with every other `trainer` field it may set."""
    runtime = training_runtime("compat", ["python", "-c", "pass"], num_nodes=2, labels={"app.kubernetes.io/name": "x"})
    full = {
        "command": ["torchrun", "-m", "wrpo.train"],
        "args": ["--stage", "sft"],
        "env": [{"name": "WRPO_STAGE", "value": "sft"}],
        "resourcesPerNode": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": "1"}},
    }
    return runtime, [
        train_job("compat-min", "compat", 2, procs_per_node=2, queue=queue),
        train_job("compat-full", "compat", 2, procs_per_node=2, queue=queue, trainer=full),
    ]


def _dry_run(custom, namespace: str, plural: str, obj: dict) -> dict:
    group, version = TRAINER_API
    return custom.create_namespaced_custom_object(
        group, version, namespace, plural, obj, dry_run="All", field_validation="Strict"
    )


def test_the_same_trainjob_shape_is_accepted_by_the_oldest_trainer_crds(
    k8s_controllers, k8s_api_client, k8s_namespace, tmp_path
):
    """The TrainingRuntime + TrainJob shape works from Trainer v2.0 to the current release: a second,
    short-lived apiserver holds the oldest release's CRDs (the session's one has the current release's, under
    the same names) and accepts every object by server-side dry-run with strict field validation, nothing
    pruned; the session's apiserver (current CRDs and the Trainer's webhooks) accepts the same objects. Each
    side refuses the field the other one has alone: `spec.runtimePatches` (new in v2.2) on the old CRDs, the
    runtime's `mlPolicy.torch.numProcPerNode` (gone in v2.2, silently pruned without strict validation) on
    the current ones."""
    versions = controller_versions(k8s_controllers.bin_dir)
    assert versions["TRAINER_COMPAT_VERSION"] != versions["TRAINER_VERSION"], versions
    runtime, jobs = _trainer_shapes(KUEUE_LOCAL_QUEUE)

    old = start_api_server(tmp_path / "old-trainer", k8s_controllers.cluster.bin_dir)
    try:
        install_crds(old, trainer_compat_crds(k8s_controllers.bin_dir), 60)
        with contextlib.closing(old.api_client()) as api:
            custom = client.CustomObjectsApi(api)
            for plural, obj in [("trainingruntimes", runtime), *(("trainjobs", job) for job in jobs)]:
                got = _dry_run(custom, "default", plural, obj)
                lost = _contains(obj["spec"], got["spec"])
                assert not lost, f"{versions['TRAINER_COMPAT_VERSION']} CRDs dropped or changed {lost} of {plural}"
            patched = {**jobs[0], "spec": {**jobs[0]["spec"], "runtimePatches": [{"manager": "wrpo.test"}]}}
            _assert_unknown_field(lambda: _dry_run(custom, "default", "trainjobs", patched), "spec.runtimePatches")
    finally:
        old.stop()

    # The current release, with its webhooks (the TrainJob's validates the runtime it names, so it must exist).
    custom = client.CustomObjectsApi(k8s_api_client)
    group, version = TRAINER_API
    created = custom.create_namespaced_custom_object(
        group, version, k8s_namespace, "trainingruntimes", runtime, field_validation="Strict"
    )
    assert not _contains(runtime["spec"], created["spec"])
    for job in jobs:
        got = _dry_run(custom, k8s_namespace, "trainjobs", job)
        assert not _contains(job["spec"], got["spec"]), _contains(job["spec"], got["spec"])
    torch = runtime["spec"]["mlPolicy"]["torch"]
    old_style = {**runtime, "metadata": {"name": "old-style"}}
    old_style["spec"] = {
        **runtime["spec"],
        "mlPolicy": {**runtime["spec"]["mlPolicy"], "torch": {**torch, "numProcPerNode": 1}},
    }
    _assert_unknown_field(
        lambda: _dry_run(custom, k8s_namespace, "trainingruntimes", old_style), "spec.mlPolicy.torch.numProcPerNode"
    )


def _assert_unknown_field(call, field: str) -> None:
    with pytest.raises(ApiException) as refused:
        call()
    message = json.loads(refused.value.body)["message"]
    assert f'strict decoding error: unknown field "{field}"' in message, message

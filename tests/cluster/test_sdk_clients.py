"""A data scientist's Kubeflow client sees the training a run starts (issue 22): the Kubeflow SDK's TrainerClient
(PyPI `kubeflow`, Trainer v2) lists a TrainJob, reads its status and its logs, and the v1 SDK's TrainingClient
(PyPI `kubeflow-training`) does the same for a PyTorchJob, both against the harness through its admin
kubeconfig. Pod logs come through the apiserver from the kwok Nodes' kubelet log endpoint (k8s_logserver.py).

Each SDK runs in its own cached venv (scripts/setup-sdk-env.sh: their pins clash with wrpo's), as a subprocess
that prints JSON. Without that venv (no network and no cache) the tests skip, and fail instead in CI or with
WRPO_REQUIRE_SDK=1 (docs/cluster-harness.md, "Kubeflow SDK clients")."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import binaries
import pytest
from k8s_harness import TRAINER_API, wait_for
from kubernetes import client
from trainer_objects import condition, train_job, training_runtime

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
# What the training container prints: one line per "step", the loss a data scientist would look for.
TRAIN_LINES = ["step 1 loss 0.75", "step 2 loss 0.5"]
TRAIN_COMMAND = ["python", "-c", "; ".join(f"print({line!r})" for line in TRAIN_LINES)]


def sdk_python(name: str) -> Path:
    """The python of the SDK's venv (scripts/setup-sdk-env.sh NAME, cached); skips or fails without it."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts/setup-sdk-env.sh"), name], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        binaries.missing(f"scripts/setup-sdk-env.sh {name} failed:\n{result.stderr[-2000:]}", "WRPO_REQUIRE_SDK")
    return Path(result.stdout.strip().splitlines()[-1])


def run_sdk(python: Path, script: str, **arguments) -> dict:
    """Run `script` with the SDK's python, `arguments` as JSON on stdin; returns the JSON it prints last."""
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(script)],
        input=json.dumps(arguments),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"SDK script failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


TRAINER_CLIENT = """
    import json, sys
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    args = json.load(sys.stdin)
    trainer = TrainerClient(KubernetesBackendConfig(namespace=args["namespace"], config_file=args["kubeconfig"]))
    job = trainer.get_job(args["name"])
    print(json.dumps({
        "jobs": [j.name for j in trainer.list_jobs()],
        "status": job.status,
        "num_nodes": job.num_nodes,
        "runtime": job.runtime.name,
        "framework": job.runtime.trainer.framework,
        "steps": sorted([s.name, s.status] for s in job.steps),
        "logs": {s.name: list(trainer.get_job_logs(args["name"], step=s.name)) for s in job.steps},
    }))
"""


def test_trainer_client_lists_a_trainjob_and_reads_its_status_and_logs(
    k8s_controllers, k8s_cluster, k8s_api_client, local_namespace, pod_runner
):
    python = sdk_python("kubeflow")
    custom = client.CustomObjectsApi(k8s_api_client)
    group, version = TRAINER_API
    ns, name = local_namespace, "sft"
    pod_runner(ns)
    custom.create_namespaced_custom_object(
        group, version, ns, "trainingruntimes", training_runtime("sft-runtime", TRAIN_COMMAND)
    )
    custom.create_namespaced_custom_object(group, version, ns, "trainjobs", train_job(name, "sft-runtime", 2))

    def complete():
        job = custom.get_namespaced_custom_object(group, version, ns, "trainjobs", name)
        return (condition(job, "Complete") or {}).get("status") == "True"

    wait_for(f"TrainJob {name} Complete", complete, 120)
    seen = run_sdk(python, TRAINER_CLIENT, namespace=ns, kubeconfig=str(k8s_cluster.kubeconfig), name=name)
    assert seen["jobs"] == [name]
    assert seen["status"] == "Complete"
    assert (seen["num_nodes"], seen["runtime"], seen["framework"]) == (2, "sft-runtime", "torch")
    assert seen["steps"] == [["node-0", "Succeeded"], ["node-1", "Succeeded"]]
    assert seen["logs"] == {"node-0": TRAIN_LINES, "node-1": TRAIN_LINES}


TRAINING_CLIENT = """
    import json, sys
    from kubeflow.training import TrainingClient

    args = json.load(sys.stdin)
    training = TrainingClient(config_file=args["kubeconfig"], namespace=args["namespace"], job_kind="PyTorchJob")
    logs, _ = training.get_job_logs(args["name"], is_master=False)
    print(json.dumps({
        "jobs": [j.metadata.name for j in training.list_jobs()],
        "succeeded": training.is_job_succeeded(args["name"]),
        "conditions": [[c.type, c.status] for c in training.get_job_conditions(args["name"])],
        "logs": {pod: text.splitlines() for pod, text in logs.items()},
    }))
"""


def _pytorchjob(name: str, workers: int) -> dict:
    """A PyTorchJob with a Master and `workers` Workers, each container `pytorch` running TRAIN_COMMAND. It has a
    `runPolicy`, as the operator's PyTorchJobs have: TrainingClient cannot read a PyTorchJob without one."""

    def replica(count: int) -> dict:
        container = {"name": "pytorch", "image": "example.invalid/torch:1", "command": TRAIN_COMMAND}
        return {"replicas": count, "restartPolicy": "Never", "template": {"spec": {"containers": [container]}}}

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "runPolicy": {"backoffLimit": 0},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(workers)},
        },
    }


def test_training_client_lists_a_pytorchjob_and_reads_its_status_and_logs(
    k8s_cluster, k8s_api_client, local_namespace, pod_runner
):
    python = sdk_python("kubeflow-training")
    custom = client.CustomObjectsApi(k8s_api_client)
    ns, name = local_namespace, "sft"
    pod_runner(ns)
    custom.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", _pytorchjob(name, 1))

    def succeeded():
        job = custom.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", name)
        return (condition(job, "Succeeded") or {}).get("status") == "True"

    wait_for(f"PyTorchJob {name} Succeeded", succeeded, 120)
    seen = run_sdk(python, TRAINING_CLIENT, namespace=ns, kubeconfig=str(k8s_cluster.kubeconfig), name=name)
    assert seen["jobs"] == [name]
    assert seen["succeeded"] is True
    assert ["Succeeded", "True"] in seen["conditions"]
    assert seen["logs"] == {f"{name}-master-0": TRAIN_LINES, f"{name}-worker-0": TRAIN_LINES}

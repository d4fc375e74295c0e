"""The Kubeflow Trainer v2 objects the cluster tests create, in the shape the operator gives a training stage
(docs/operator.md): a namespaced TrainingRuntime that holds the whole pod template in a JobSet template with one
replicated Job `node` (the Trainer's ancestor step `trainer`, container `node`) and a torch policy, and a
TrainJob that only names it and sets `trainer.*`. Fields that a later Trainer release renamed (pod overrides,
`runtimePatches` since v2.2) are never used, so the same objects work from v2.0 to the current release
(test_harness_controllers.py checks both). The processes per node go in the TrainJob's
`trainer.numProcPerNode` (v2.0: int or string, v2.2: int): v2.2 dropped the runtime's
`mlPolicy.torch.numProcPerNode` from its CRD, so the apiserver prunes it there without a word and the torch
plugin falls back to `auto` (one process per GPU, or per CPU of `resourcesPerNode` without GPUs)."""

from __future__ import annotations

from k8s_harness import KUEUE_QUEUE_LABEL, TRAINER_API

#: The labels the Trainer's JobSet plugin looks for on the replicated Job that runs the trainer.
TRAINER_ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
#: The runtime's framework: the Kubeflow SDK's TrainerClient refuses a runtime without this label.
FRAMEWORK_LABEL = "trainer.kubeflow.org/framework"
NODE = "node"


def training_runtime(
    name: str,
    command: list[str],
    *,
    image: str = "example.invalid/torch:1",
    num_nodes: int = 1,
    labels: dict[str, str] | None = None,
) -> dict:
    """A TrainingRuntime whose `node` container runs `command` (torch policy: the Trainer's torch plugin gives
    it the PET_* rendezvous variables; processes per node come from the TrainJob, `train_job`)."""
    group, version = TRAINER_API
    container = {
        "name": NODE,
        "image": image,
        "command": command,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    job = {
        "backoffLimit": 0,
        "template": {
            "metadata": {"labels": dict(labels or {})},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [container],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        },
    }
    container["volumeMounts"] = [{"name": "scratch", "mountPath": "/scratch"}]
    return {
        "apiVersion": f"{group}/{version}",
        "kind": "TrainingRuntime",
        "metadata": {"name": name, "labels": {FRAMEWORK_LABEL: "torch", **(labels or {})}},
        "spec": {
            "mlPolicy": {"numNodes": num_nodes, "torch": {}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE,
                            "replicas": 1,
                            "template": {"metadata": {"labels": {TRAINER_ANCESTOR_LABEL: "trainer"}}, "spec": job},
                        }
                    ]
                }
            },
        },
    }


def train_job(
    name: str,
    runtime: str,
    num_nodes: int,
    *,
    procs_per_node: int = 1,
    queue: str | None = None,
    trainer: dict | None = None,
) -> dict:
    """A TrainJob naming the TrainingRuntime `runtime`, with `trainer.numNodes` and `trainer.numProcPerNode`
    (plus `trainer`'s other fields); with `queue`, labelled for that Kueue LocalQueue."""
    group, version = TRAINER_API
    labels = {KUEUE_QUEUE_LABEL: queue} if queue else {}
    return {
        "apiVersion": f"{group}/{version}",
        "kind": "TrainJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": group, "kind": "TrainingRuntime"},
            "trainer": {"numNodes": num_nodes, "numProcPerNode": procs_per_node, **(trainer or {})},
        },
    }


def condition(obj: dict, kind: str) -> dict | None:
    """The status condition `kind` of an object (as a dict), or None."""
    return next((c for c in obj.get("status", {}).get("conditions", []) or [] if c["type"] == kind), None)

"""Every object the builders make is accepted by the real apiserver (server-side dry-run, which also
runs the training-operator's PyTorchJob webhook), and so is every example FusionRun."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import builders as b
from wrpo_operator.kube import ApiError, Kube

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
URI = "s3://bucket/runs/demo"


def rich_spec():
    return parse_spec({
        "target": {"model": "s3://bucket/models/target", "tensorParallelSize": 2},
        "sources": [
            {"name": "llama", "model": "s3://bucket/models/llama", "tensorParallelSize": 4,
             "maxModelLen": 4096},
            {"name": "qwen", "model": "/models/qwen", "vllmArgs": ["--enforce-eager"]},
            {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "gpt",
                                         "apiKeyEnv": "API_KEY", "apiKeySecret": "api-key"}},
        ],
        "reward": {"type": "remote", "model": "/models/rm"},
        "dataset": {"uri": "s3://bucket/data/prompts.jsonl", "evalSize": 8},
        "eval": {"judge": {"model": "/models/judge"}},
        "storage": {"runUri": URI, "s3Endpoint": "http://s3.local:8333", "credentialsSecret": "s3-creds",
                    "s3Region": "us-east-1"},
        "cluster": {"modelsPvc": "models", "tolerations": [{"key": "gpu", "operator": "Exists"}],
                    "nodeSelector": {"pool": "gpu"}, "activeDeadlineSeconds": 3600,
                    "serviceAccount": "runner", "queueName": "team-gpus", "hfTokenSecret": "hf",
                    "imagePullSecrets": ["registry"],
                    "env": [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "key"}},
                            {"name": "LOG_LEVEL", "value": "info"}],
                    "schedulingPolicy": {"queue": "research", "priorityClass": "high", "scheduleTimeoutSeconds": 60},
                    "scratch": {"size": "20Gi", "storageClassName": "fast"},
                    "checkpoints": {"accessModes": ["ReadWriteMany"], "storageClassName": "shared"},
                    "vllm": {"startupProbe": {"periodSeconds": 20, "failureThreshold": 90}},
                    "pods": {
                        "vllm": {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                              "labelSelector": {"matchLabels": {"a": "b"}}}}]}},
                                 "priorityClassName": "serving", "labels": {"team": "fusion"},
                                 "volumes": [{"name": "cache", "emptyDir": {}}],
                                 "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
                        "training": {"schedulerName": "volcano", "annotations": {"a/b": "c"}}},
                    "training": {"gpus": 8, "nodes": 2, "procsPerNode": 8, "cpu": "32", "memory": "512Gi"}},
    })


def all_objects(ns: str) -> list[dict]:
    spec = rich_spec()
    objs = [b.build_spec_configmap("demo", ns, spec)]
    for stage in STAGE_NAMES:
        objs += b.stage_children("demo", ns, spec, stage, URI, "0123456789abcdef").all()
    return [b.with_owner(o, "demo", "00000000-0000-0000-0000-000000000000") for o in objs]


@pytest.fixture
def crd_installed(fusionrun_crd):
    """The session's FusionRun CRD (conftest.py)."""


def test_every_built_object_passes_server_side_dry_run(k8s_api_client, k8s_namespace):
    kube = Kube(k8s_api_client)
    seen = set()
    for obj in all_objects(k8s_namespace):
        key = (obj["kind"], obj["metadata"]["name"])
        if key in seen:
            continue
        seen.add(key)
        kube.create(obj, dry_run=True)  # raises ApiError with the apiserver's field errors
    kinds = {k for k, _ in seen}
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job", "PyTorchJob"}


EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_server_side_dry_run(k8s_api_client, k8s_namespace, crd_installed, path):
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = k8s_namespace
    created = Kube(k8s_api_client).create(doc, dry_run=True)
    # the apiserver's defaults equal pydantic's: the stored spec parses to the same FusionSpec
    assert parse_spec(created["spec"]) == parse_spec(doc["spec"])


def test_the_eval_stages_gpu_budget_rule_is_the_apiservers_too(k8s_api_client, k8s_namespace, crd_installed):
    """The CEL twin of `_eval_fits_the_gpu_budget` rejects what pydantic rejects and admits what it admits."""
    from wrpo.errors import SpecError

    def run(budget: int, judge_tp: int) -> dict:
        spec = {"target": {"model": "t", "tensorParallelSize": 2}, "sources": [{"name": "a", "model": "m"}],
                "dataset": {"uri": "/data/p.jsonl", "evalSize": 4}, "eval": {"judge": {"model": "j",
                                                                                "tensorParallelSize": judge_tp}},
                "storage": {"runUri": "s3://bucket/runs/budget"}, "cluster": {"gpuBudget": budget,
                                                                             "training": {"gpus": 4}}}
        return {"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
                "metadata": {"name": "budget", "namespace": k8s_namespace}, "spec": spec}

    kube = Kube(k8s_api_client)
    kube.create(run(9, 2), dry_run=True)  # 3 × 2 + judge 2 + scoring 1 = 9
    parse_spec(run(9, 2)["spec"])
    with pytest.raises(ApiError, match="GPUs the eval stage holds at once"):
        kube.create(run(8, 2), dry_run=True)
    with pytest.raises(SpecError, match="GPUs the eval stage holds at once"):
        parse_spec(run(8, 2)["spec"])


@pytest.mark.parametrize("over,budget", [
    ({"reward": {"type": "remote", "model": "r"}}, 2),  # score-*: reward server 1 + scoring Job 1
    ({"reward": {"type": "judge", "judge": {"model": "j", "tensorParallelSize": 2}}}, 3),  # judge 2 + scoring 1
    ({"reward": {"type": "judge", "judge": {"model": "j", "tensorParallelSize": 3}},
      "cluster": {"scoring": {"gpus": 0}}}, 3),  # a scoring Job without a GPU beside a judge of 3
    ({"tp": 2, "cluster": {"small": {"gpus": 1}}}, 3),  # sample-sources: source server 2 + its sampling Job 1
    ({"tp": 2, "cluster": {"vllm": {"gpus": 1}, "small": {"gpus": 1}}}, 2),  # servers of one GPU each
])
def test_the_stages_gpu_budget_rule_is_the_apiservers_too(k8s_api_client, k8s_namespace, crd_installed, over,
                                                          budget):
    """The CEL twin of `_stages_fit_the_gpu_budget` admits the smallest budget pydantic admits and refuses one
    GPU less, for each part it counts."""
    from wrpo.errors import SpecError

    def run(gpus: int) -> dict:
        cluster = {"training": {"gpus": 1}, **over.get("cluster", {}), "gpuBudget": gpus}
        tp = over.get("tp", 1)
        spec = {"target": {"model": "t", "tensorParallelSize": tp},
                "sources": [{"name": "a", "model": "m", "tensorParallelSize": tp}],
                "dataset": {"uri": "/data/p.jsonl"}, "storage": {"runUri": "s3://bucket/runs/budget"},
                **{k: v for k, v in over.items() if k not in ("cluster", "tp")}, "cluster": cluster}
        return {"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
                "metadata": {"name": "budget", "namespace": k8s_namespace}, "spec": spec}

    kube = Kube(k8s_api_client)
    parse_spec(run(budget)["spec"])
    kube.create(run(budget), dry_run=True)
    with pytest.raises(SpecError, match="GPUs at once"):
        parse_spec(run(budget - 1)["spec"])
    with pytest.raises(ApiError, match="need more GPUs at once than cluster.gpuBudget"):
        kube.create(run(budget - 1), dry_run=True)

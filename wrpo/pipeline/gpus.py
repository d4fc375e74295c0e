"""GPU accounting, the one place that counts GPUs (docs/operator.md, "GPU budget").

Pure and a leaf (it imports nothing of wrpo), so the spec's budget checks, the operator's window of units and
its count of live pods all use the same arithmetic:

- a vLLM server pod holds `cluster.vllm.gpus` GPUs, else its tensor-parallel size; a server holds that times
  its replicas;
- a Kubernetes pod (or pod template) holds its containers' `nvidia.com/gpu` requests (else limits); a
  Deployment, Job or PyTorchJob holds that times the pods it runs at once.
"""

from __future__ import annotations

from typing import Any

GPU = "nvidia.com/gpu"


def server_pod_gpus(tensor_parallel_size: int, vllm_gpus: int | None) -> int:
    """GPUs of one vLLM server pod: `cluster.vllm.gpus` when set (0: a CPU server), else its tensor-parallel
    size."""
    return tensor_parallel_size if vllm_gpus is None else vllm_gpus


def server_gpus(tensor_parallel_size: int, replicas: int, vllm_gpus: int | None) -> int:
    """GPUs of a vLLM server with all its replicas."""
    return server_pod_gpus(tensor_parallel_size, vllm_gpus) * replicas


def pod_gpus(pod: dict[str, Any]) -> int:
    """nvidia.com/gpu a pod (or a pod template) requests: its containers' requests, else their limits."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        total += int((res.get("requests") or {}).get(GPU) or (res.get("limits") or {}).get(GPU) or 0)
    return total


def object_gpus(obj: dict[str, Any]) -> int:
    """nvidia.com/gpu a Deployment, Job, PyTorchJob or TrainingRuntime (the pods of the TrainJob naming it)
    holds with all its pods running (0 for other kinds: a TrainJob's pods are its runtime's)."""
    spec = obj.get("spec") or {}
    kind = obj.get("kind")
    if kind == "TrainingRuntime":
        nodes = (spec.get("mlPolicy") or {}).get("numNodes", 1)
        jobs = spec["template"]["spec"]["replicatedJobs"]
        return sum(r.get("replicas", 1) * nodes * pod_gpus(r["template"]["spec"]["template"]) for r in jobs)
    if kind == "PyTorchJob":
        return sum(r.get("replicas", 1) * pod_gpus(r["template"]) for r in spec["pytorchReplicaSpecs"].values())
    if kind == "Deployment":
        return spec.get("replicas", 1) * pod_gpus(spec["template"])
    if kind == "Job":
        return spec.get("parallelism", 1) * pod_gpus(spec["template"])
    return 0

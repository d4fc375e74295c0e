"""Units under the GPU budget on the harness's control plane (docs/operator.md, "GPU budget and units"):
the operator as the chart's ServiceAccount, kwok nodes with 8 GPUs each completing the pods, the real
scheduler, Deployment and Job controllers. The paper's ten sources (39 GPUs of servers at once) run under
`gpuBudget: 8`; a sampler thread sums the GPU requests of the run's live pods and Deployments the whole
time. Scoring runs as an Indexed Job of 3 shards; one shard's pod is deleted while it runs and only that
index is run again: the scoring pods are held Running (kwok's `wrpo.test/hold` fault point) until the
deletion, so no shard can finish first however loaded the machine."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from operator_harness import HOLD, children, create_run, patch_run, tiny_spec, wait, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
INDEX = "batch.kubernetes.io/job-completion-index"


def paper_sources() -> list[dict]:
    doc = yaml.safe_load((ROOT / "manifests/examples/paper-llama3-8b.yaml").read_text())
    return [{"name": s["name"], "model": f"s3://wrpo/models/{s['name']}", "tensorParallelSize": s["tensorParallelSize"]}
            for s in doc["spec"]["sources"]]


def budget_spec() -> dict:
    spec = tiny_spec(gpuBudget=8, vllm={"cpu": "100m", "memory": "128Mi"},  # GPUs: each server's tensorParallelSize
                     small={"cpu": "100m", "memory": "128Mi"},
                     scoring={"gpus": 1, "parallelism": 3, "cpu": "100m", "memory": "128Mi"},
                     training={"gpus": 1, "procsPerNode": 1, "cpu": "100m", "memory": "128Mi"},
                     pods={"scoring": {"annotations": {HOLD: "true"}}})
    spec["sources"] = paper_sources()
    return spec


class GpuSampler(threading.Thread):
    """The largest GPU request seen at once: live pods of the run (Pending or Running, terminating included)
    and the Deployments' replicas × per-pod GPUs (what they are about to ask for)."""

    def __init__(self, core, apps, ns: str, run: str):
        super().__init__(daemon=True)
        self.core, self.apps, self.ns, self.run_name = core, apps, ns, run
        self.peak_pods = self.peak_deployments = self.samples = 0
        self.servers_seen: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:  # noqa: D102 - threading.Thread
        sel = f"fusion.wrpo.io/run={self.run_name}"
        while not self.stop.is_set():
            pods = self.core.list_namespaced_pod(self.ns, label_selector=sel).items
            live = sum(_gpus(c) for p in pods if p.status.phase in ("Pending", "Running") for c in p.spec.containers)
            deps = self.apps.list_namespaced_deployment(self.ns, label_selector=sel).items
            self.servers_seen |= {d.metadata.name for d in deps}
            held = sum(_gpus(d.spec.template.spec.containers[0]) * (d.spec.replicas or 0) for d in deps)
            self.peak_pods, self.peak_deployments = max(self.peak_pods, live), max(self.peak_deployments, held)
            self.samples += 1
            time.sleep(0.2)


def _gpus(container) -> int:
    return int(((container.resources and container.resources.requests) or {}).get("nvidia.com/gpu", 0))


def test_ten_sources_run_under_a_budget_of_8_and_an_added_source_runs_alone(operator, apis, run_namespace,
                                                                               releaser):
    custom, batch, apps, core = apis
    sampler = GpuSampler(core, apps, run_namespace, "budget")
    sampler.start()
    create_run(custom, run_namespace, "budget", budget_spec())
    killed, killed_at = _kill_one_shard(core, run_namespace, "budget", operator)
    releaser.start()  # the held shards (and every later scoring pod) may complete now
    status = wait_phase(custom, run_namespace, "budget", ["Succeeded", "Failed"], 420, operator)
    sampler.stop.set()
    sampler.join()
    assert status["phase"] == "Succeeded", status["message"]
    print(f"\nBUDGET RUN: peak GPUs requested by live pods {sampler.peak_pods}, by Deployments "
          f"{sampler.peak_deployments} (budget 8; all servers at once: 39) over {sampler.samples} samples")
    assert sampler.samples > 20 and 0 < sampler.peak_pods <= 8 and sampler.peak_deployments <= 8
    sources = {f"budget-src-{s['name']}" for s in paper_sources()}
    assert sources <= sampler.servers_seen  # every unit had its server, one window at a time
    kids = children(apis, run_namespace, "budget")
    assert kids["Deployment"] == []  # every unit's server is gone
    units = [j for j in kids["Job"] if j["metadata"]["labels"].get("fusion.wrpo.io/unit")]
    assert len(units) == 10 and all(j["status"]["succeeded"] == 1 for j in units)
    # the Indexed Job of score-sources: 3 shards, the deleted one run again alone
    shards = next(j for j in kids["Job"] if j["metadata"]["name"] == "budget-score-sources-shards")
    assert shards["spec"]["completion_mode"] == "Indexed" and shards["status"]["succeeded"] == 3
    pods = core.list_namespaced_pod(run_namespace, label_selector="job-name=budget-score-sources-shards").items
    by_index = {p.metadata.annotations[INDEX]: p for p in pods}
    assert sorted(by_index) == ["0", "1", "2"] and len(pods) == 3
    assert by_index["1"].metadata.name != killed and by_index["1"].metadata.creation_timestamp >= killed_at
    assert all(by_index[i].metadata.creation_timestamp <= killed_at for i in ("0", "2"))  # not run again

    # an 11th source: only its unit samples (one server), the ten stay done
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in units}
    sampler = GpuSampler(core, apps, run_namespace, "budget")
    sampler.start()
    new = patch_run(custom, run_namespace, "budget", {"spec": {"sources": [
        *paper_sources(), {"name": "olmo", "model": "s3://wrpo/models/olmo", "tensorParallelSize": 2}]}})
    status = wait_phase(custom, run_namespace, "budget", ["Succeeded", "Failed"], 600, operator,
                        generation=new["metadata"]["generation"])
    sampler.stop.set()
    sampler.join()
    assert status["phase"] == "Succeeded", status["message"]
    assert {s for s in sampler.servers_seen if "-src-" in s} == {"budget-src-olmo"}
    units = {j.metadata.name: j.metadata.uid for j in batch.list_namespaced_job(
        run_namespace, label_selector="fusion.wrpo.io/stage=sample-sources").items if "fusion.wrpo.io/unit" in
        (j.metadata.labels or {})}
    assert {k: units[k] for k in before} == before and "budget-sample-sources-olmo" in units


def _kill_one_shard(core, ns: str, run: str, operator):
    """Delete the running pod of shard 1 of score-sources' Indexed Job once all three run (held there by
    HOLD, so none can have finished); returns its name and when it was deleted."""
    def running_shard():
        pods = core.list_namespaced_pod(ns, label_selector=f"job-name={run}-score-sources-shards").items
        if sum(p.status.phase == "Running" for p in pods) < 3:
            return None
        return next(p for p in pods if p.metadata.annotations.get(INDEX) == "1")

    pod = wait(running_shard, 300, "the three shards of score-sources running", operator, interval=0.2)
    core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
    return pod.metadata.name, datetime.now(UTC).replace(microsecond=0)

"""A real Kueue decides between two FusionRuns (docs/operator.md, "Kueue"), on the harness: Kueue v0.17's
controller manager (tests/cluster/build-controllers.sh) with its batch Job, pod/Deployment, PyTorchJob and
TrainJob integrations (one run trains through PyTorchJobs, the other through TrainJobs), the ClusterQueue of
8 GPUs and a LocalQueue in a Kueue-managed namespace; the operator as the chart's ServiceAccount, kwok nodes
with 8 GPUs each completing the pods.

Each run's sources are served with 6 GPUs each (`tensorParallelSize: 6`), so each run alone needs 12 GPUs
at once in sample-sources and any one server takes most of the quota. Each run's `gpuBudget` (12) allows
all of it: the operator starts both units' servers at once and creates every Job suspended; Kueue gates the
server pods and admits one at a time. A sampler thread sums the GPU requests of the pods Kueue let through
(no scheduling gate, not finished) and of the Workloads it admitted, the whole time; it also keeps every
stage message it saw. Skipped without the controllers' build (WRPO_REQUIRE_CONTROLLERS=1 fails instead)."""

from __future__ import annotations

import threading
import time

import pytest
from k8s_harness import KUEUE_API, KUEUE_LOCAL_QUEUE, KUEUE_QUOTA, RESTRICTED_LABELS
from operator_harness import children, create_run, get_run, tiny_spec, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GPU = "nvidia.com/gpu"
QUOTA = int(KUEUE_QUOTA[GPU])
RUNS = ("kq-a", "kq-b")
TP = 6  # GPUs of one source's server: most of the quota
BUDGET = 2 * TP  # each run's own window allows both of its servers at once: the operator holds nothing back


@pytest.fixture
def run_namespace(kueue_namespace, apis):
    """The operator's namespace: managed by Kueue (with the LocalQueue) and `restricted`, as every run's."""
    apis[3].patch_namespace(kueue_namespace, {"metadata": {"labels": dict(RESTRICTED_LABELS)}})
    return kueue_namespace


#: each run trains through one backend: Kueue's PyTorchJob and TrainJob integrations both admit a run's stage
BACKENDS = dict(zip(RUNS, ("pytorchjob", "trainjob"), strict=True))


def spec(backend: str) -> dict:
    small = {"cpu": "100m", "memory": "128Mi"}
    out = tiny_spec(queueName=KUEUE_LOCAL_QUEUE, gpuBudget=BUDGET, vllm=small, small=small,
                    scoring={"gpus": 0, **small},
                    training={"gpus": 1, "procsPerNode": 1, "backend": backend, **small})
    for source in out["sources"]:
        source["tensorParallelSize"] = TP
    return out


def _gpus(containers) -> int:
    return sum(int(((c.resources and c.resources.requests) or {}).get(GPU, 0)) for c in containers or [])


class Sampler(threading.Thread):
    """The most GPUs at once: of the runs' pods past Kueue's gate (Pending or Running), and of the Workloads
    Kueue admitted (not finished); every pod seen gated; each run's stage (state, message) seen."""

    def __init__(self, apis, ns: str):
        super().__init__(daemon=True)
        self.custom, _, _, self.core = apis
        self.ns = ns
        self.peak_pods = self.peak_workloads = self.samples = 0
        self.gated: set[str] = set()
        self.seen: dict[str, list[tuple[str, str, str]]] = {run: [] for run in RUNS}
        self.stop = threading.Event()

    def run(self) -> None:  # noqa: D102 - threading.Thread
        group, version = KUEUE_API
        while not self.stop.is_set():
            pods = self.core.list_namespaced_pod(self.ns, label_selector="fusion.wrpo.io/run").items
            self.gated |= {p.metadata.name for p in pods if p.spec.scheduling_gates}
            live = sum(_gpus(p.spec.containers) for p in pods if not p.spec.scheduling_gates
                       and p.status.phase in ("Pending", "Running"))
            workloads = self.custom.list_namespaced_custom_object(group, version, self.ns, "workloads")["items"]
            admitted = sum(_admitted_gpus(w) for w in workloads)
            self.peak_pods, self.peak_workloads = max(self.peak_pods, live), max(self.peak_workloads, admitted)
            for run in RUNS:
                for s in (get_run(self.custom, self.ns, run).get("status") or {}).get("stages") or []:
                    entry = (s["name"], s.get("state", ""), s.get("message") or "")
                    if s.get("state") in ("Queued", "Waiting", "Running") and entry not in self.seen[run]:
                        self.seen[run].append(entry)
            self.samples += 1
            time.sleep(0.2)


def _admitted_gpus(wl: dict) -> int:
    conditions = {c["type"]: c["status"] for c in (wl.get("status") or {}).get("conditions") or []}
    if conditions.get("Admitted") != "True" or conditions.get("Finished") == "True":
        return 0
    assignments = ((wl.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []
    return sum(int((a.get("resourceUsage") or {}).get(GPU, 0)) for a in assignments)


@pytest.fixture
def sampler(apis, run_namespace):
    thread = Sampler(apis, run_namespace)
    yield thread
    thread.stop.set()
    if thread.is_alive():
        thread.join()


def test_kueue_not_the_operator_decides_which_run_holds_the_gpus(operator, apis, run_namespace, sampler):
    custom = apis[0]
    ns = run_namespace
    for run in RUNS:
        create_run(custom, ns, run, spec(BACKENDS[run]))
    sampler.start()
    for run in RUNS:
        status = wait_phase(custom, ns, run, ["Succeeded", "Failed"], 420, operator)
        assert status["phase"] == "Succeeded", (run, status["message"], sampler.seen[run])
    sampler.stop.set()
    sampler.join()
    print(f"\nKUEUE RUNS: peak GPUs of admitted pods {sampler.peak_pods}, of admitted Workloads "
          f"{sampler.peak_workloads} (quota {QUOTA}; both runs' servers at once: {2 * BUDGET}) over "
          f"{sampler.samples} samples; pods gated: {len(sampler.gated)}")
    assert sampler.samples > 20 and 0 < sampler.peak_pods <= QUOTA and 0 < sampler.peak_workloads <= QUOTA
    servers = {p for p in sampler.gated if "-src-" in p}
    assert len(servers) >= 2  # Kueue held servers back (4 servers of 6 GPUs, 8 in the quota)

    # Kueue, not the operator, held them: the operator's budget never made a stage wait, and a stage whose
    # servers waited at Kueue's gate was shown Queued with what Kueue said
    seen = [entry for run in RUNS for entry in sampler.seen[run]]
    assert not [m for _, _, m in seen if "GPU budget" in m], seen
    reason = f"insufficient unused quota for {GPU} in flavor"
    queued = [(stage, m) for stage, state, m in seen if state == "Queued" and reason in m]
    assert any(stage == "sample-sources" and f"held by Kueue (queue {KUEUE_LOCAL_QUEUE}): pod " in m
               for stage, m in queued), seen
    print(f"QUEUED ({len(queued)} messages), e.g. {queued[0][0]}: {queued[0][1]}")

    # every Job (units too), PyTorchJob and TrainJob ran through Kueue: each has a Workload Kueue admitted
    group, version = KUEUE_API
    workloads = custom.list_namespaced_custom_object(group, version, ns, "workloads")["items"]
    admitted = {o["uid"] for w in workloads for o in w["metadata"].get("ownerReferences") or []
                if any(c["type"] in ("Admitted", "Finished") and c["status"] == "True"
                       for c in (w.get("status") or {}).get("conditions") or [])}
    for run in RUNS:
        kids = children(apis, ns, run)
        training = kids["TrainJob" if BACKENDS[run] == "trainjob" else "PyTorchJob"]
        runners = [*kids["Job"], *training]
        units = [j for j in kids["Job"] if j["metadata"]["labels"].get("fusion.wrpo.io/unit")]
        assert len(units) == 2 and len(training) == 2, (run, BACKENDS[run])
        assert get_run(custom, ns, run)["status"]["training"] == {"backend": BACKENDS[run]}
        uid = lambda o: o["metadata"]["uid"]  # noqa: E731 - Jobs (to_dict) and PyTorchJobs (plain) alike
        assert all(uid(r) in admitted for r in runners), (run, [r["metadata"]["name"] for r in runners
                                                                 if uid(r) not in admitted])

"""The operator's Kubeflow Trainer v2 backend against the harness (docs/operator.md, "Training backends"): the
tiny FusionRun's SFT and WRPO stages run as TrainJobs through the real Trainer and JobSet controllers (kwok
completes the JobSet's pods), with the operator as the chart's ServiceAccount (RBAC enforced) in a namespace
enforcing the `restricted` Pod Security Standard."""

from __future__ import annotations

import pytest
from operator_harness import children, create_run, tiny_spec, wait_events, wait_phase

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import LABEL_RUN

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TRAINER = ("trainer.kubeflow.org", "v1alpha1")


def _trainer_kids(custom, ns: str, name: str) -> dict[str, list[dict]]:
    sel = f"{LABEL_RUN}={name}"
    return {plural: custom.list_namespaced_custom_object(*TRAINER, ns, plural, label_selector=sel)["items"]
            for plural in ("trainjobs", "trainingruntimes")}


def test_tiny_run_succeeds_with_trainjobs(k8s_controllers, operator, apis, run_namespace, kubectl):
    custom, batch, apps, core = apis
    training = {**tiny_spec()["cluster"]["training"], "backend": "trainjob"}
    create_run(custom, run_namespace, "tj", tiny_spec(training=training))
    status = wait_phase(custom, run_namespace, "tj", ["Succeeded", "Failed"], 400, operator)
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}"
    assert status["training"] == {"backend": "trainjob"}
    kids, trainer = children(apis, run_namespace, "tj"), _trainer_kids(custom, run_namespace, "tj")
    assert kids["PyTorchJob"] == []
    jobs = {j["metadata"]["name"]: j for j in trainer["trainjobs"]}
    assert sorted(jobs) == ["tj-sft", "tj-wrpo"]
    for job in jobs.values():
        assert {c["type"]: c["status"] for c in job["status"]["conditions"]}.get("Complete") == "True"
        assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                             "name": job["metadata"]["name"]}
        assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [status_uid(custom, run_namespace)]
    # the finished TrainJobs keep the runtimes they name; each holds the whole restricted pod template
    runtimes = {r["metadata"]["name"]: r for r in trainer["trainingruntimes"]}
    assert sorted(runtimes) == ["tj-sft", "tj-wrpo"]
    pod = runtimes["tj-sft"]["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    # the JobSet's pods ran (kwok) with the stage's labels and the rendezvous variables Trainer injected
    pods = core.list_namespaced_pod(run_namespace, label_selector="jobset.sigs.k8s.io/jobset-name=tj-sft").items
    assert pods and all(p.status.phase == "Succeeded" for p in pods)
    env = {e.name: e for e in pods[0].spec.containers[0].env}
    assert env["PET_NNODES"].value == "1" and env["PET_NPROC_PER_NODE"].value == "1"
    assert env["PET_MASTER_PORT"].value == "29500" and "PET_NODE_RANK" in env
    assert pods[0].metadata.labels["fusion.wrpo.io/stage"] == "sft"
    reasons = [r for _, r, _ in wait_events(core, run_namespace, "tj", {"RunSucceeded"}, 30, operator)]
    assert reasons.count("StageSucceeded") == len(STAGE_NAMES)
    # `kubectl get fr -o wide` shows the backend (a priority-1 column)
    wide = kubectl("get", "fr", "tj", "-n", run_namespace, "-o", "wide").stdout
    head, row = wide.splitlines()[:2]
    assert "BACKEND" in head.split() and "trainjob" in row.split()
    assert "BACKEND" not in kubectl("get", "fr", "tj", "-n", run_namespace).stdout


def status_uid(custom, ns: str) -> str:
    return custom.get_namespaced_custom_object("fusion.wrpo.io", "v1alpha1", ns, "fusionruns", "tj")["metadata"]["uid"]

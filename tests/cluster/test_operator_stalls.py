"""Stalls that show (docs/operator.md, "Stalls"), on the harness: every cause reaches the `Stalled` condition
with one Warning Event naming pod, container and cause, then fails its stage after
`cluster.stallTimeoutSeconds`; a fixed spec unsticks a stalled stage; an apiserver refusal of a child fails
the run before it starts (the admission dry run). The causes are real where the harness has the component
(the scheduler's Unschedulable, the ResourceQuota admission, the Deployment controller's progress deadline,
an invalid child) and kwok Stages where a kubelet would report them (image pulls, crash loops:
tests/cluster/kwok/stages.yaml)."""

from __future__ import annotations

import re
import time

import pytest
from operator_harness import children, create_run, events, get_run, patch_run, tiny_spec, wait, wait_events, wait_phase

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator.status import parse_time

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
QUOTA_CLASS = "wrpo-test-quota"
TIMEOUT = 8  # cluster.stallTimeoutSeconds of these runs


def stalled(custom, ns, name):
    status = get_run(custom, ns, name).get("status") or {}
    cond = {c["type"]: c for c in status.get("conditions") or []}.get("Stalled") or {}
    return cond if cond.get("status") == "True" else None


@pytest.fixture
def quota(apis, run_namespace, k8s_api_client):
    """A ResourceQuota allowing no pods of PriorityClass wrpo-test-quota in the namespace."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    sched = client.SchedulingV1Api(k8s_api_client)
    try:
        sched.create_priority_class({"metadata": {"name": QUOTA_CLASS}, "value": 0})
    except ApiException as e:
        if e.status != 409:
            raise
    apis[3].create_namespaced_resource_quota(run_namespace, {
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}, "scopeSelector": {"matchExpressions": [
            {"operator": "In", "scopeName": "PriorityClass", "values": [QUOTA_CLASS]}]}}})


CASES = {
    # name: (cluster settings, stage, reason, subject (pod, container; Deployment; Job), what Kubernetes said)
    "pull": ({"runtimeImage": "missing.wrpo.test/wrpo-runtime:0"}, "prepare", "ImagePullBackOff",
             r"pod pull-prepare-\w+ container stage", 'Back-off pulling image "missing.wrpo.test/wrpo-runtime:0"'),
    "crash": ({"pods": {"vllm": {"annotations": {"wrpo.test/crash": "OOMKilled"}}}}, "sample-sources",
              "CrashLoopBackOff", r"pod crash-src-\w+-\w+-\w+ container vllm",
              "last exit OOMKilled (exit code 137), 3 restarts"),
    "gpus": ({"small": {"gpus": 16, "cpu": "1", "memory": "2Gi"}}, "prepare", "Unschedulable",
             r"pod gpus-prepare-\w+", "Insufficient nvidia.com/gpu"),
    "deadline": ({"vllm": {"gpus": 0, "cpu": "2", "memory": "4Gi", "progressDeadlineSeconds": 10},
                  "pods": {"vllm": {"annotations": {"wrpo.test/never-ready": "true"}}}}, "sample-sources",
                 "ProgressDeadlineExceeded", r"Deployment deadline-src-\w+", "has timed out progressing"),
    "quota": ({"pods": {"small": {"priorityClassName": QUOTA_CLASS}}}, "prepare", "QuotaExceeded",
              r"Job quota-prepare", "exceeded quota: no-pods"),
}


def test_every_stall_cause_shows_once_and_then_fails_its_stage(operator, apis, run_namespace, quota):
    custom, _, _, core = apis
    ns = run_namespace
    for name, (cluster, *_) in CASES.items():
        create_run(custom, ns, name, tiny_spec(stallTimeoutSeconds=TIMEOUT, **cluster))
    for name, (_, stage, reason, subject, text) in CASES.items():
        # the runs stall and fail side by side: the Stalled condition (seen below in the next test) is gone
        # once a run failed, its Warning Event and the failure message stay
        status = wait_phase(custom, ns, name, "Failed", 180, operator)
        assert status["stage"] == stage, (name, status)
        expected = rf"stage {stage} failed: Stalled for more than {TIMEOUT}s: {subject}: {reason}: "
        assert re.match(expected, status["message"]) and text in status["message"], (name, status["message"])
        # the Events follow the status patch of the same reconcile
        wait(lambda n=name: {"StageFailed", "RunFailed"} <= {r for _, r, _ in events(core, ns, n)}, 30,
             f"{name}: StageFailed and RunFailed Events", operator)
        stalls = [(t, m) for t, r, m in events(core, ns, name) if r == "StageStalled"]
        assert len(stalls) == 1, (name, stalls)  # one Event per cause, however long it lasts
        assert stalls[0][0] == "Warning" and re.match(rf"stage {stage}: {subject}: {reason}: ", stalls[0][1])
        assert text in stalls[0][1], stalls
    # the stalled stages' children are gone: their pods no longer hold nodes (or GPUs)
    wait(lambda: not [p for p in core.list_namespaced_pod(ns).items
                      if (p.metadata.labels or {}).get("fusion.wrpo.io/run") in CASES
                      and p.status.phase not in ("Succeeded", "Failed")], 180, "stalled pods removed", operator)


def test_fixing_the_image_of_a_stalled_stage_replaces_its_children_and_the_run_goes_on(operator, apis,
                                                                                      run_namespace):
    custom, batch, _, core = apis
    ns = run_namespace
    create_run(custom, ns, "fix", tiny_spec(stallTimeoutSeconds=600, runtimeImage="missing.wrpo.test/runtime:0"))
    cond = wait(lambda: stalled(custom, ns, "fix"), 120, "Stalled", operator)
    assert cond["reason"] == "ImagePullBackOff"
    assert re.match(r'pod fix-prepare-\w+ container stage: Back-off pulling image "missing.wrpo.test/runtime:0"',
                    cond["message"]), cond
    status = get_run(custom, ns, "fix")["status"]
    assert status["phase"] == "Running" and status["stages"][0]["stall"]["reason"] == "ImagePullBackOff"
    old = batch.read_namespaced_job("fix-prepare", ns).metadata.uid
    patch_run(custom, ns, "fix", {"spec": {"cluster": {"runtimeImage": "ghcr.io/wrpo/wrpo-runtime:0.1.0-cpu"}}})
    wait(lambda: get_run(custom, ns, "fix")["status"]["stages"][0]["state"] == "Succeeded", 120,
         "prepare Succeeded with the fixed image", operator)
    status = get_run(custom, ns, "fix")["status"]
    assert status["phase"] == "Running" and status["stage"] == "sample-sources"
    reasons = [r for _, r, _ in wait_events(core, ns, "fix", {"StallCleared"}, 120, operator)]
    assert reasons.count("StageStalled") == 1
    assert batch.read_namespaced_job("fix-prepare", ns).metadata.uid != old  # replaced, not patched


def test_a_child_the_apiserver_refuses_fails_the_run_before_it_starts(operator, apis, run_namespace):
    """Caught by the admission dry run (docs/operator.md, "Admission") before the first stage; a fix runs it."""
    custom, _, _, core = apis
    ns = run_namespace
    # valid to the spec's rules and the FusionRun's schema (an affinity passes through), invalid to the Job's
    broken = {"pods": {"small": {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": ""}]}}}}}
    create_run(custom, ns, "refused", tiny_spec(**broken))
    status = wait_phase(custom, ns, "refused", "Failed", 180, operator)
    assert "cluster.pods.small.affinity: the apiserver refused Job refused-prepare" in status["message"], status
    assert "topologyKey" in status["message"] and not any(children(apis, ns, "refused").values())
    wait(lambda: [m for t, r, m in events(core, ns, "refused") if r == "SpecInvalid"], 120, "SpecInvalid", operator)
    # the user fixes the spec: the run starts
    fixed = patch_run(custom, ns, "refused", {"spec": {"cluster": {"pods": {"small": {"affinity": None}}}}})
    generation = fixed["metadata"]["generation"]
    wait(lambda: (get_run(custom, ns, "refused")["status"]["observedGeneration"] == generation
                  and get_run(custom, ns, "refused")["status"]["stages"][0]["state"] == "Succeeded"), 120,
         "prepare Succeeded once fixed", operator)


def test_a_trainjob_whose_pods_exceed_a_quota_is_stalled_until_the_quota_is_lifted(k8s_controllers, operator, apis,
                                                                                   run_namespace, quota):
    """The TrainJob path of the "quota" case above, through the real Trainer v2 and JobSet controllers: the
    apiserver refuses the pod that the Job controller makes for JobSet's Job (TrainJob → JobSet → Job → pod),
    which says so only on that Job; the stage shows the same `Stalled` condition and Event as a PyTorchJob's,
    and runs once the quota is gone (docs/operator.md, "Stalls")."""
    custom, batch, _, core = apis
    ns, name = run_namespace, "tjq"
    training = {**tiny_spec()["cluster"]["training"], "backend": "trainjob"}
    create_run(custom, ns, name, tiny_spec(stallTimeoutSeconds=600, training=training,
                                           pods={"training": {"priorityClassName": QUOTA_CLASS}}))
    cond = wait(lambda: stalled(custom, ns, name), 300, "Stalled", operator)
    status = get_run(custom, ns, name)["status"]
    assert status["phase"] == "Running" and status["stage"] == "sft", status
    assert cond["reason"] == "QuotaExceeded", cond
    assert re.match(rf"Job {name}-sft-node-0: Error creating: .*exceeded quota: no-pods", cond["message"]), cond
    # JobSet copied the run's labels from the runtime to its Job (that is how the operator's watch sees it)
    job = batch.read_namespaced_job(f"{name}-sft-node-0", ns)
    assert job.metadata.labels["fusion.wrpo.io/run"] == name
    assert [r.kind for r in job.metadata.owner_references] == ["JobSet"]
    stalls = [m for _, r, m in wait_events(core, ns, name, {"StageStalled"}, 30, operator) if r == "StageStalled"]
    assert len(stalls) == 1 and stalls[0].startswith(f"stage sft: Job {name}-sft-node-0: QuotaExceeded: "), stalls
    created = custom.get_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs",
                                                  f"{name}-sft")["metadata"]["creationTimestamp"]
    shown = parse_time(status["stages"][STAGE_NAMES.index("sft")]["stall"]["since"]) - parse_time(created)
    # the quota is lifted: the Job controller's next try makes the pod, and the run goes on to the end
    core.delete_namespaced_resource_quota("no-pods", ns)
    lifted = time.monotonic()
    wait(lambda: get_run(custom, ns, name)["status"]["stages"][STAGE_NAMES.index("sft")]["state"] == "Succeeded",
         300, "sft Succeeded", operator)
    print(f"\nTRAINJOB QUOTA: Stalled {shown.total_seconds():.0f}s after the TrainJob was created; sft Succeeded "
          f"{time.monotonic() - lifted:.1f}s after the quota was deleted")
    status = wait_phase(custom, ns, name, ["Succeeded", "Failed"], 300, operator)
    assert status["phase"] == "Succeeded", status
    reasons = [r for _, r, _ in wait_events(core, ns, name, {"StallCleared", "RunSucceeded"}, 30, operator)]
    assert reasons.count("StageStalled") == 1

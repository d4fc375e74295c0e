"""The run's lifecycle on the harness (docs/operator.md, "Spec changes", "Deletion", "Scheduling"): no
finalizer (a run deleted while no operator runs is gone at once, its children garbage-collected),
immutable fields refused by the apiserver, a `cluster.*` change replacing the unfinished stage's children,
a restarted operator creating nothing for a finished run, Kueue-held children shown as Queued, and
per-component pod settings, gang scheduling and the checkpoint PVC reaching the cluster."""

from __future__ import annotations

import contextlib
import signal

import pytest
from operator_harness import (
    children,
    create_run,
    events,
    get_run,
    patch_run,
    tiny_spec,
    wait,
    wait_events,
    wait_phase,
)

from wrpo_operator import GROUP, LABEL_RUN, PLURAL, QUEUE_LABEL, VERSION

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
#: The sampling Job's pods stay Running for two minutes (kwok): the run waits in sample-sources.
SLOW_SAMPLING = {"sampling": {"annotations": {"wrpo.test/run-duration": "120s"}}}


def test_a_run_deleted_while_no_operator_runs_is_gone_with_its_children(operator, apis, run_namespace):
    custom, _, _, core = apis
    ns = run_namespace
    create_run(custom, ns, "orphan", tiny_spec(pods=SLOW_SAMPLING))
    wait(lambda: children(apis, ns, "orphan")["Deployment"], 120, "vLLM Deployments", operator)
    run = get_run(custom, ns, "orphan")
    assert not run["metadata"].get("finalizers")  # kopf adds none: only watch handlers are registered
    assert not [k for k in run["metadata"].get("annotations") or {} if "kopf" in k or k.startswith(GROUP)]
    operator.kill(signal.SIGKILL)
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "orphan",
                                           body={"propagationPolicy": "Background"})
    with pytest.raises(Exception) as e:  # gone at once: nothing holds it
        get_run(custom, ns, "orphan")
    assert getattr(e.value, "status", None) == 404

    def all_gone():
        kids = children(apis, ns, "orphan")
        pods = core.list_namespaced_pod(ns, label_selector=f"{LABEL_RUN}=orphan").items
        return not any(kids.values()) and not pods

    wait(all_gone, 120, "the garbage collector removing every child")


def test_immutable_fields_are_refused_by_the_apiserver_naming_the_field(operator, apis, run_namespace):
    from kubernetes.client.rest import ApiException

    custom = apis[0]
    ns = run_namespace
    create_run(custom, ns, "fixed", tiny_spec(pods=SLOW_SAMPLING))
    for patch, text in (
        ({"spec": {"storage": {"runUri": "s3://wrpo/runs/elsewhere"}}}, "spec.storage.runUri"),
        ({"spec": {"storage": {"runUri": None}}}, "spec.storage.runUri"),
        ({"spec": {"sources": [{"name": "llama2", "model": "s3://wrpo/models/source-llama"},
                               {"name": "qwen", "model": "s3://wrpo/models/source-qwen"}]}}, "spec.sources"),
        ({"spec": {"sources": [{"name": "qwen", "model": "s3://wrpo/models/source-qwen"}]}}, "spec.sources"),
    ):
        with pytest.raises(ApiException) as e:
            patch_run(custom, ns, "fixed", patch)
        assert e.value.status == 422 and text in e.value.body and "immutable" in e.value.body, e.value.body
    # what may change still does: a source's settings, and a source added (a unit of its own)
    patched = patch_run(custom, ns, "fixed", {"spec": {"sources": [
        {"name": "llama", "model": "s3://wrpo/models/source-llama", "maxModelLen": 512},
        {"name": "qwen", "model": "s3://wrpo/models/source-qwen"},
        {"name": "phi", "model": "s3://wrpo/models/source-qwen"}]}})
    assert patched["spec"]["sources"][0]["maxModelLen"] == 512 and len(patched["spec"]["sources"]) == 3


def test_a_cluster_change_replaces_the_unfinished_stages_children(operator, apis, run_namespace):
    custom, batch, apps, _ = apis
    ns = run_namespace
    create_run(custom, ns, "move", tiny_spec(pods=SLOW_SAMPLING))
    wait(lambda: (get_run(custom, ns, "move").get("status") or {}).get("stage") == "sample-sources", 180,
         "stage sample-sources", operator)
    wait(lambda: len(children(apis, ns, "move")["Deployment"]) == 2, 180, "the vLLM Deployments", operator)
    prepare = batch.read_namespaced_job("move-prepare", ns).metadata.uid
    old = {d["metadata"]["name"]: d["metadata"]["uid"] for d in children(apis, ns, "move")["Deployment"]}
    svc = {s["metadata"]["name"]: s["metadata"]["uid"] for s in children(apis, ns, "move")["Service"]}
    patch_run(custom, ns, "move", {"spec": {"cluster": {"vllm": {"memory": "5Gi"}}}})

    def replaced():
        deps = children(apis, ns, "move")["Deployment"]
        new = {d["metadata"]["name"]: d for d in deps}
        return (len(new) == 2 and all(new[n]["metadata"]["uid"] != old[n] for n in old if n in new)
                and set(new) == set(old)) and new

    new = wait(replaced, 120, "Deployments replaced", operator)
    for dep in new.values():
        assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "5Gi"
    assert batch.read_namespaced_job("move-prepare", ns).metadata.uid == prepare  # a finished stage: untouched
    assert {s["metadata"]["name"]: s["metadata"]["uid"] for s in children(apis, ns, "move")["Service"]} == svc


def test_a_restarted_operator_creates_nothing_for_a_finished_run(operator, apis, run_namespace):
    custom, _, _, core = apis
    ns = run_namespace
    create_run(custom, ns, "done", tiny_spec())
    before = wait_phase(custom, ns, "done", ["Succeeded", "Failed"], 600, operator)
    assert before["phase"] == "Succeeded"
    kids = {k: sorted(o["metadata"]["uid"] for o in v) for k, v in children(apis, ns, "done").items()}
    n_events = len(wait_events(core, ns, "done", {"RunSucceeded"}, 120, operator))
    operator.kill(signal.SIGTERM)
    operator.start()
    # it has listed everything and reconciled the run: waited for, not slept for (a loaded machine is slow)
    wait(lambda: operator.metrics().get('wrpo_reconciles_total{result="ok"}', 0) >= 1, 300,
         "the restarted operator's first reconcile of the finished run", operator,
         seen=lambda: f"metrics {operator.metrics()}")
    calls = {k: v for k, v in operator.metrics().items() if k.startswith("wrpo_apiserver_requests_total")}
    assert sum(calls.values()) == 0, calls  # not one write
    after = get_run(custom, ns, "done")["status"]
    assert after == before
    assert {k: sorted(o["metadata"]["uid"] for o in v) for k, v in children(apis, ns, "done").items()} == kids
    assert len(events(core, ns, "done")) == n_events


def test_kueue_held_children_show_as_queued(operator, apis, run_namespace):
    """Kueue itself is not in the harness: the test admits a held Job as Kueue does, by resuming it."""
    custom, batch, _, core = apis
    ns = run_namespace
    create_run(custom, ns, "queued", tiny_spec(queueName="team-gpus"))
    wait(lambda: (get_run(custom, ns, "queued").get("status") or {}).get("stages", [{}])[0].get("state")
         == "Queued", 60, "prepare Queued", operator)
    status = get_run(custom, ns, "queued")["status"]
    assert status["phase"] == "Running" and "held by Kueue (queue team-gpus)" in status["message"]
    job = batch.read_namespaced_job("queued-prepare", ns)
    assert job.spec.suspend is True and job.metadata.labels[QUEUE_LABEL] == "team-gpus"
    assert not core.list_namespaced_pod(ns, label_selector="job-name=queued-prepare").items
    batch.patch_namespaced_job("queued-prepare", ns, {"spec": {"suspend": False}})  # admitted
    wait(lambda: get_run(custom, ns, "queued")["status"]["stages"][0]["state"] == "Succeeded", 180,
         "prepare Succeeded", operator)
    # the sampling servers carry the queue label (Kueue's pod integration gates them)
    deps = wait(lambda: children(apis, ns, "queued")["Deployment"], 180, "vLLM Deployments", operator)
    assert all(d["spec"]["template"]["metadata"]["labels"][QUEUE_LABEL] == "team-gpus" for d in deps)
    reasons = [r for _, r, _ in wait_events(core, ns, "queued", {"StageQueued", "StageStarted"}, 120, operator)]
    assert "StageQueued" in reasons and "StageStarted" in reasons


def test_component_settings_gang_scheduling_and_the_checkpoint_pvc_reach_the_cluster(
        operator, apis, run_namespace, k8s_api_client):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom, batch, _, core = apis
    ns = run_namespace
    sched = client.SchedulingV1Api(k8s_api_client)
    with contextlib.suppress(ApiException):
        sched.create_priority_class({"metadata": {"name": "wrpo-training"}, "value": 1000})
    spec = tiny_spec(
        pods={"small": {"nodeSelector": {"kubernetes.io/hostname": "kwok-node-2"}, "labels": {"team": "fusion"}},
              "training": {"priorityClassName": "wrpo-training", "annotations": {"wrpo.test/run-duration": "6s"}}},
        schedulingPolicy={"minAvailable": 1, "queue": "research"},
        checkpoints={"size": "3Gi"})
    create_run(custom, ns, "placed", spec)
    pod = wait(lambda: core.list_namespaced_pod(ns, label_selector="job-name=placed-prepare").items, 60,
               "the prepare pod", operator)[0]
    assert pod.metadata.labels["team"] == "fusion"
    wait(lambda: core.read_namespaced_pod(pod.metadata.name, ns).spec.node_name == "kwok-node-2", 60,
         "scheduled onto kwok-node-2")
    master = wait(lambda: core.list_namespaced_pod(
        ns, label_selector="training.kubeflow.org/job-name=placed-sft").items, 180, "the SFT pod", operator)[0]
    assert master.spec.priority_class_name == "wrpo-training" and master.spec.priority == 1000
    pj = custom.get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", "placed-sft")
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 1, "queue": "research"}
    claim = core.read_namespaced_persistent_volume_claim("placed-checkpoints", ns)
    assert claim.spec.resources.requests["storage"] == "3Gi"
    wait(lambda: core.read_namespaced_persistent_volume_claim("placed-checkpoints", ns).status.phase == "Bound",
         60, "the checkpoint PVC bound")
    mounts = {m.name: m.mount_path for m in master.spec.containers[0].volume_mounts}
    assert mounts["checkpoints"].startswith("/work/") and mounts["checkpoints"].endswith("/scratch")
    # scratch is a generic ephemeral volume: its claim exists while the pod does
    scratch = core.read_namespaced_persistent_volume_claim(f"{master.metadata.name}-scratch", ns)
    assert scratch.metadata.owner_references[0].name == master.metadata.name
    assert wait_phase(custom, ns, "placed", ["Succeeded", "Failed"], 600, operator)["phase"] == "Succeeded"
    wait(lambda: not [c for c in core.list_namespaced_persistent_volume_claim(ns).items
                      if c.metadata.name == "placed-checkpoints" and c.metadata.deletion_timestamp is None],
         60, "the checkpoint PVC deleted once the run succeeded")

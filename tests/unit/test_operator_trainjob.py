"""`cluster.training.backend` (docs/operator.md, "Training backends"): the Kubeflow Trainer v2 objects the
builders make, how `auto` is resolved and recorded, the refusal of a backend the cluster does not serve, and a
run walked to the end through TrainJobs. No cluster here: FakeKube (test_operator_reconcile.py) stands in for
the apiserver; tests/cluster/test_operator_trainjob_run.py runs the same against the real Trainer and JobSet."""

from __future__ import annotations

import copy
import json

import pytest
from test_operator_reconcile import NAME, UID, FakeKube, _warning, status_of, step, tiny_spec

from wrpo.errors import SpecError
from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import LABEL_RUN, LABEL_RUN_UID, LABEL_STAGE, QUEUE_LABEL
from wrpo_operator import builders as b
from wrpo_operator.admission import run_children, spec_field, template_jobs
from wrpo_operator.cache import Cache
from wrpo_operator.decide import training_backend
from wrpo_operator.stalls import job_pods
from wrpo_operator.status import job_state

NS, URI = "team-a", "s3://bkt/runs/demo"


def spec_with(**cluster):
    data = tiny_spec()
    data["cluster"] = {"training": {"gpus": 8, "procsPerNode": 8, "nodes": 2, "backend": "trainjob"},
                       "activeDeadlineSeconds": 600, "checkpoints": {"accessModes": ["ReadWriteMany"]}, **cluster}
    return parse_spec(data)


def node_template(runtime):
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]


# -- builders ----------------------------------------------------------------------------------------

def test_the_trainjob_only_names_its_runtime_and_sets_trainer_fields_every_trainer_v2_has():
    job = b.build_stage_runner(NAME, NS, spec_with(), "sft", URI, "h", backend="trainjob")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"] == {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                          "name": "demo-sft"}, "trainer": {"numNodes": 2, "numProcPerNode": 8}}
    # neither v2.0's podSpecOverrides nor v2.2's runtimePatches: the runtime holds the pod
    assert "podSpecOverrides" not in json.dumps(job) and "runtimePatches" not in json.dumps(job)


def test_the_runtime_holds_the_pytorchjobs_pod_template_under_trainers_names():
    spec = spec_with()
    runtime = b.build_training_runtime(NAME, NS, spec, "sft", URI, "h")
    assert runtime["kind"] == "TrainingRuntime" and runtime["metadata"]["name"] == "demo-sft"
    # v2.2's CRD has no numProcPerNode in the runtime's torch policy (pruned there): the TrainJob sets it
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 2, "torch": {}}
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"  # the SDK lists it
    jobset = runtime["spec"]["template"]["spec"]
    (rjob,) = jobset["replicatedJobs"]
    assert rjob["name"] == "node" and rjob["replicas"] == 1
    # Trainer's marker, and the run's labels, which JobSet copies to its Job: the operator's Job watch sees it
    assert rjob["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
                                                      LABEL_RUN: NAME, LABEL_STAGE: "sft"}
    assert rjob["template"]["spec"]["completionMode"] == "Indexed"  # PET_NODE_RANK is the completion index
    assert rjob["template"]["spec"]["activeDeadlineSeconds"] == 600
    assert jobset["failurePolicy"]["maxRestarts"] == spec.cluster.backoff_limit
    template = node_template(runtime)
    master = b.build_pytorchjob(NAME, NS, spec, "sft", URI, "h")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert template["metadata"] == master["metadata"]
    (c,), (pc,) = template["spec"]["containers"], master["spec"]["containers"]
    assert c["name"] == "node" and c["ports"] == [{"name": "trainjob-port", "containerPort": 29500}]
    assert {k: v for k, v in c.items() if k not in ("name", "ports")} == \
        {k: v for k, v in pc.items() if k not in ("name", "ports")}
    assert "--master-addr=$(PET_MASTER_ADDR)" in c["command"] and "--node-rank=$(PET_NODE_RANK)" in c["command"]
    pod, ppod = template["spec"], master["spec"]
    assert pod["restartPolicy"] == "Never"  # a failure restarts the JobSet (torchrun's whole group)
    assert {k: v for k, v in pod.items() if k not in ("containers", "restartPolicy")} == \
        {k: v for k, v in ppod.items() if k not in ("containers", "restartPolicy")}
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "demo-checkpoints" for v in pod["volumes"])


def test_the_gpu_budget_counts_a_trainjobs_pods_by_its_runtime():
    from wrpo.pipeline.gpus import object_gpus

    kids = b.stage_children(NAME, NS, spec_with(), "sft", URI, "h", backend="trainjob")
    assert object_gpus(kids.templates[0]) == 16 and object_gpus(kids.runners[0]) == 0  # 2 nodes × 8 GPUs
    pj = b.stage_children(NAME, NS, spec_with(), "sft", URI, "h").runners[0]
    assert object_gpus(pj) == 16


def test_with_a_queue_the_trainjob_is_suspended_and_labelled_and_volcano_reads_the_pods():
    spec = spec_with(queueName="team-q", schedulingPolicy={"queue": "vq", "priorityClass": "high"})
    job = b.build_trainjob(NAME, NS, spec, "wrpo", URI, "h")
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][QUEUE_LABEL] == "team-q"
    template = node_template(b.build_training_runtime(NAME, NS, spec, "wrpo", URI, "h"))
    assert template["metadata"]["labels"][QUEUE_LABEL] == "team-q"
    assert template["metadata"]["annotations"][b.VOLCANO_QUEUE_ANNOTATION] == "vq"
    assert template["spec"]["priorityClassName"] == "high"
    assert job_state(job) == ("Queued", None, 0)


def test_stage_children_make_the_runtime_with_the_trainjob_and_owner_labels_reach_its_pods():
    kids = b.stage_children(NAME, NS, spec_with(), "sft", URI, "h", backend="trainjob")
    assert [o["kind"] for o in kids.templates] == ["TrainingRuntime"]
    assert [o["kind"] for o in kids.runners] == ["TrainJob"]
    runtime = b.with_owner(kids.templates[0], NAME, "uid-1")
    assert node_template(runtime)["metadata"]["labels"][LABEL_RUN_UID] == "uid-1"
    (job_template,) = b.job_templates(runtime)
    assert job_template["metadata"]["labels"][LABEL_RUN_UID] == "uid-1"
    assert b.job_templates(kids.runners[0]) == []
    assert b.pod_templates(kids.runners[0]) == []
    assert b.configmaps_used(runtime) == {b.spec_configmap_name(NAME, spec_with())}
    assert [o["kind"] for o in b.stage_children(NAME, NS, spec_with(), "sft", URI, "h").all()] == \
        ["PersistentVolumeClaim", "PyTorchJob"]


def test_admission_dry_runs_the_runtimes_pod_template_and_maps_its_fields_to_the_spec():
    spec = spec_with(tolerations=[{"key": "gpu", "operator": "Exists"}])
    kids = run_children(NAME, NS, spec, "uid-1", backend="trainjob")
    kinds = [k["kind"] for k in kids]
    assert kinds.count("TrainJob") == kinds.count("TrainingRuntime") == 2 and "PyTorchJob" not in kinds
    runtime = next(k for k in kids if k["kind"] == "TrainingRuntime")
    (job,) = template_jobs(runtime)
    assert job["kind"] == "Job" and job["spec"]["template"] == node_template(runtime)
    path = "spec.template.spec.replicatedJobs[0].template.spec.template.spec.tolerations[0]"
    assert spec_field(runtime, [path], spec) == "cluster.tolerations[0]"
    assert spec_field(job, ["spec.template.spec.tolerations[0]"], spec) == "cluster.tolerations[0]"
    assert spec_field(runtime, ["spec.mlPolicy.numNodes"], spec) == "cluster.training"


def test_trainjob_state_and_its_pods_by_the_jobset_label():
    job = b.build_trainjob(NAME, NS, spec_with(), "sft", URI, "h")
    assert job_state(job) == ("Running", None, 0)
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                                     "message": "jobset failed"}], "jobsStatus": [{"name": "node", "failed": 3}]}
    assert job_state(job) == ("Failed", "FailedJobs: jobset failed", 3)
    job["status"]["conditions"] = [{"type": "Complete", "status": "True"}]
    assert job_state(job)[0] == "Succeeded"
    # JobSet's pods also carry their Job's name (demo-sft-node-0): the JobSet's, the TrainJob's, wins
    mine = {"metadata": {"name": "p", "labels": {"jobset.sigs.k8s.io/jobset-name": "demo-sft",
                                                 "batch.kubernetes.io/job-name": "demo-sft-node-0"}}}
    other = {"metadata": {"name": "q", "labels": {"jobset.sigs.k8s.io/jobset-name": "demo-wrpo"}}}
    assert job_pods(job, [mine, other]) == [mine]


# -- auto, recorded once, refused when not served ------------------------------------------------------

@pytest.mark.parametrize("serves,picked", [
    ({"PyTorchJob"}, "pytorchjob"), ({"TrainJob"}, "trainjob"), ({"PyTorchJob", "TrainJob"}, "trainjob"),
])
def test_auto_picks_what_the_apiserver_serves_once_per_run(serves, picked):
    kube = FakeKube()
    kube.serves = set(serves)
    kube.add_run(tiny_spec())
    step(kube)
    assert kube.run["status"]["training"] == {"backend": picked}
    asked = sum(n for (verb, _), n in kube.calls.items() if verb == "discover")
    assert asked == 2  # both kinds, once
    kube.serves = {"PyTorchJob", "TrainJob"} - {b.BACKEND_KINDS[picked]}  # the cluster changes under the run
    kube.finish("Job", "demo-prepare")
    step(kube)
    assert kube.run["status"]["training"] == {"backend": picked}  # recorded: not asked again
    assert sum(n for (verb, _), n in kube.calls.items() if verb == "discover") == asked


def test_training_backend_prefers_the_spec_then_the_record():
    spec = parse_spec(tiny_spec())
    never = lambda: pytest.fail("discovery asked")  # noqa: E731
    assert training_backend({}, spec_with(), never) == "trainjob"
    assert training_backend({"status": {"training": {"backend": "pytorchjob"}}}, spec, never) == "pytorchjob"
    assert training_backend({}, spec, lambda: set()) is None


@pytest.mark.parametrize("backend,serves,says", [
    ("trainjob", {"PyTorchJob"}, "cluster.training.backend: the apiserver refused TrainJob demo-sft: trainjob: "
                                 "the apiserver does not serve it; install Kubeflow Trainer v2"),
    ("pytorchjob", {"TrainJob"}, "cluster.training.backend: the apiserver refused PyTorchJob demo-sft: pytorchjob: "
                                 "the apiserver does not serve it; install the Kubeflow training-operator v1"),
    ("auto", set(), "cluster.training.backend: the apiserver refused PyTorchJob or TrainJob demo-sft: auto: the "
                    "apiserver serves neither"),
])
def test_a_backend_the_cluster_does_not_serve_is_refused_naming_the_field(backend, serves, says):
    kube = FakeKube()
    kube.serves = serves
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1, "backend": backend}}))
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and status["message"].startswith(says), status["message"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["SpecInvalid"] == "True"
    assert [k for k in kube.objects if k[0] != "FusionRun"] == []  # nothing created, nothing dry-run
    assert not [c for c in kube.calls if c[0] == "dry-run"]
    assert ("Warning", "SpecInvalid") in [(t, r) for t, r, _ in kube.events]


def test_trainers_webhook_lagging_behind_the_runtime_is_retried_not_a_failure():
    from wrpo_operator.kube import ApiError, retryable

    lag = ApiError(400, "Bad Request", json.dumps({"message": 'admission webhook "validate.trainjob" denied the '
                   "request: spec.runtimeRef: Invalid value: ...: TrainingRuntime.trainer.kubeflow.org \"demo-sft\" "
                   "not found: specified trainingRuntime must be created before the TrainJob is created"}))
    assert retryable(lag)
    # Kueue's own TrainJob webhook (a namespace Kueue manages) says it its way, from its own informer
    kueue = ApiError(400, "Bad Request", json.dumps({"message": 'admission webhook "vtrainjob.kb.io" denied the '
                     "request: runtime 'demo-sft' not found"}))
    assert retryable(kueue)
    assert not retryable(ApiError(400, "Bad Request", json.dumps({"message": "spec.trainer: Invalid value"})))


def test_admission_passes_a_trainjob_whose_runtime_trainers_webhook_cannot_find_yet():
    from wrpo_operator.admission import dry_run
    from wrpo_operator.kube import ApiError

    kube = FakeKube()
    job = b.build_trainjob(NAME, NS, spec_with(), "sft", URI, "h")
    kube.refuse_dry[("TrainJob", "demo-sft")] = ApiError(400, "Bad Request", json.dumps({"message": (
        "admission webhook denied the request: specified trainingRuntime must be created before the TrainJob "
        "is created")}))
    assert dry_run(kube, [job]) == []
    kube.refuse_dry[("TrainJob", "demo-sft")] = ApiError(400, "Bad Request", json.dumps({"message": (
        "admission webhook \"vtrainjob.kb.io\" denied the request: runtime 'demo-sft' not found")}))
    assert dry_run(kube, [job]) == []  # Kueue's webhook, in a namespace it manages
    invalid = {"message": "spec.trainer.numNodes: Invalid value: 0"}
    kube.refuse_dry[("TrainJob", "demo-sft")] = ApiError(422, "Invalid", json.dumps(invalid))
    (refusal,) = dry_run(kube, [job], spec_with())
    assert refusal.field == "cluster.training"


def test_an_unknown_backend_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match=r"cluster\.training\.backend"):
        parse_spec(tiny_spec(cluster={"training": {"backend": "mpijob"}}), "run.yaml")


# -- a run through TrainJobs -------------------------------------------------------------------------

def finish_trainjob(kube, name):
    obj = kube.objects[("TrainJob", name)]
    obj["status"] = {"conditions": [{"type": "Complete", "status": "True", "reason": "JobSetCompleted"}]}
    kube._stamp(obj)


def walk(kube, until: str | None = None) -> None:
    """Step the run through its stages, finishing each one's Jobs and TrainJobs, up to the creation of the
    TrainJob of training stage `until` (to the end without it)."""
    for stage in STAGE_NAMES:
        step(kube)
        if stage in ("sft", "wrpo"):
            if ("PyTorchJob", f"{NAME}-{stage}") in kube.objects:  # the other backend: made at once
                if stage == until:
                    return
                kube.finish("PyTorchJob", f"{NAME}-{stage}")
                continue
            # the runtime first; the TrainJob once the watch shows it (Trainer's webhook refuses it before)
            assert ("TrainingRuntime", f"{NAME}-{stage}") in kube.objects
            assert ("TrainJob", f"{NAME}-{stage}") not in kube.objects
            assert "TrainingRuntime" in status_of(kube, stage)["message"]
            step(kube)
            if stage == until:
                return
            finish_trainjob(kube, f"{NAME}-{stage}")
            continue
        runner = ("Job", f"{NAME}-{stage}")
        for _ in range(4):  # servers, units: make everything the stage waits for ready, finish its Jobs
            kube.make_available()
            for key in [k for k in kube.objects if k[0] == "Job" and k[1].startswith(runner[1])]:
                kube.finish(*key)
            if runner in kube.objects and job_state(kube.objects[runner])[0] == "Succeeded":
                break
            step(kube)


def test_a_run_walks_its_training_stages_through_trainjobs():
    kube = FakeKube()
    kube.serves = {"PyTorchJob", "TrainJob"}
    kube.add_run(tiny_spec())
    walk(kube)
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Succeeded", status["message"]
    assert status["training"] == {"backend": "trainjob"}
    assert kube.kinds("TrainJob") == ["demo-sft", "demo-wrpo"] and kube.kinds("PyTorchJob") == []
    # the finished TrainJobs keep the runtimes they name
    assert kube.kinds("TrainingRuntime") == ["demo-sft", "demo-wrpo"]
    assert set(kube.created.values()) == {1}


# -- stalls of a TrainJob: its JobSet's Jobs (docs/operator.md, "Stalls") --------------------------------

QUOTA = 'Error creating: pods "demo-sft-node-0-0-x" is forbidden: exceeded quota: no-pods, requested: pods=1'


def training_kube(backend: str) -> FakeKube:
    """A run with `backend` walked to its sft stage, whose runner (PyTorchJob or TrainJob) was just created."""
    kube = FakeKube()
    kube.serves = {"PyTorchJob", "TrainJob"}
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1, "backend": backend}, "stallTimeoutSeconds": 600}))
    walk(kube, until="sft")
    assert status_of(kube, "sft")["state"] == "Running"
    return kube


def jobset_job(kube, parallelism: int = 1) -> dict:
    """The Job JobSet makes of the sft TrainJob's runtime: its replicatedJob template's labels (the run's, from
    the operator), JobSet's, controlled by the JobSet (not by the run)."""
    (template,) = kube.objects[("TrainingRuntime", f"{NAME}-sft")]["spec"]["template"]["spec"]["replicatedJobs"]
    job = {"kind": "Job", "apiVersion": "batch/v1",
           "metadata": {"name": f"{NAME}-sft-node-0", "namespace": NS, "uid": "jobset-job-1",
                        "labels": {**template["template"]["metadata"]["labels"],
                                   "jobset.sigs.k8s.io/jobset-name": f"{NAME}-sft"},
                        "ownerReferences": [{"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
                                             "name": f"{NAME}-sft", "uid": "jobset-1", "controller": True}]},
           "spec": {"parallelism": parallelism, "completions": parallelism}}
    kube._stamp(job)
    kube.objects[("Job", job["metadata"]["name"])] = job
    return job


def jobset_pod(kube, index: int) -> dict:
    """A running pod of that Job (the runtime's pod template, JobSet's and the Job controller's labels)."""
    template = node_template(kube.objects[("TrainingRuntime", f"{NAME}-sft")])
    name = f"{NAME}-sft-node-0-{index}"
    pod = {"kind": "Pod", "metadata": {"name": name, "namespace": NS, "uid": f"pod-{name}", "labels": {
        **template["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": f"{NAME}-sft",
        "batch.kubernetes.io/job-name": f"{NAME}-sft-node-0"}},
        "spec": {}, "status": {"phase": "Running"}}
    kube._stamp(pod)
    kube.objects[("Pod", name)] = pod
    return pod


@pytest.mark.parametrize("backend,subject", [("pytorchjob", "PyTorchJob demo-sft"),
                                             ("trainjob", "Job demo-sft-node-0")])
def test_a_refused_training_pod_stalls_the_stage_alike_on_both_backends(backend, subject):
    """The training-operator reports a refused pod on the PyTorchJob; for a TrainJob it is the Job controller,
    on the Job JobSet made: the same condition, Event and deadline either way."""
    kube = training_kube(backend)
    refused_on = kube.objects[("PyTorchJob", f"{NAME}-sft")] if backend == "pytorchjob" else jobset_job(kube)
    _warning(kube, "refused.1", refused_on, "FailedCreate", QUOTA, "2025-01-01T00:00:00Z")
    step(kube)
    stall = status_of(kube, "sft")["stall"]
    assert (stall["reason"], stall["subject"]) == ("QuotaExceeded", subject), stall
    cond = {c["type"]: c for c in kube.run["status"]["conditions"]}["Stalled"]
    assert (cond["status"], cond["reason"], cond["message"]) == ("True", "QuotaExceeded", f"{subject}: {QUOTA}")
    step(kube)
    assert [m for _, r, m in kube.events if r == "StageStalled"] == [f"stage sft: {subject}: QuotaExceeded: {QUOTA}"]
    step(kube, minutes=10)
    status = kube.run["status"]
    assert status["phase"] == "Failed"
    assert status["message"] == f"stage sft failed: Stalled for more than 600s: {subject}: QuotaExceeded: {QUOTA}"
    runner = "PyTorchJob" if backend == "pytorchjob" else "TrainJob"
    assert (runner, f"{NAME}-sft") not in kube.objects  # nothing of the stalled stage is kept
    assert ("Job", f"{NAME}-sft-node-0") in kube.objects or backend == "pytorchjob"  # JobSet's: not ours to delete


def test_a_trainjob_stall_clears_once_every_node_of_its_jobsets_job_has_a_pod():
    """Two nodes, one pod created and one refused: the group cannot start (torchrun waits for every node),
    so the Job short of a pod is stalled although a pod of the TrainJob runs."""
    kube = training_kube("trainjob")
    job = jobset_job(kube, parallelism=2)
    _warning(kube, "refused.1", job, "FailedCreate", QUOTA, "2025-01-01T00:00:00Z")
    jobset_pod(kube, 0)
    step(kube)
    assert status_of(kube, "sft")["stall"]["reason"] == "QuotaExceeded"
    jobset_pod(kube, 1)  # the quota was raised: the Job controller's retry made the second pod
    step(kube)
    assert "stall" not in status_of(kube, "sft") and status_of(kube, "sft")["state"] == "Running"
    assert ("Normal", "StallCleared") in [(t, r) for t, r, _ in kube.events]
    # a node failed: the Job failed and its pods with it (JobSet restarts the group); its old Events say nothing
    job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    for index in (0, 1):
        kube.objects[("Pod", f"{NAME}-sft-node-0-{index}")]["status"] = {"phase": "Failed"}
    step(kube)
    assert "stall" not in status_of(kube, "sft")


JOBSET = {"kind": "JobSet", "metadata": {"name": f"{NAME}-sft", "uid": "jobset-1"}}


@pytest.mark.parametrize("on,reason,message,cause", [
    # Trainer v2 when the apiserver refuses the JobSet
    ("TrainJob", "TrainJobResourcesCreationFailed", 'TrainJob resources reconciliation failed: admission webhook '
     '"vjobset.kb.io" denied the request: spec.replicatedJobs: Invalid value', "FailedCreate"),
    # JobSet when the apiserver refuses its Job (not watched: known by its name, the TrainJob's)
    ("JobSet", "JobCreationFailed", 'jobs.batch "demo-sft-node-0" is forbidden: exceeded quota: jobs, requested: '
     "count/jobs.batch=1, used: count/jobs.batch=9, limited: count/jobs.batch=9", "QuotaExceeded"),
])
def test_a_jobset_or_job_the_apiserver_refuses_is_a_stall_of_the_trainjob(on, reason, message, cause):
    kube = training_kube("trainjob")
    involved = kube.objects[("TrainJob", f"{NAME}-sft")] if on == "TrainJob" else JOBSET
    _warning(kube, "refused.1", involved, reason, message, "2025-01-01T00:00:00Z")
    step(kube)
    stall = status_of(kube, "sft")["stall"]
    assert (stall["reason"], stall["subject"], stall["message"]) == (cause, f"{on} demo-sft", message)


def test_an_earlier_jobsets_events_of_the_same_name_are_not_this_trainjobs():
    kube = training_kube("trainjob")
    kube.objects[("TrainJob", f"{NAME}-sft")]["metadata"]["creationTimestamp"] = "2025-01-01T00:10:00Z"
    _warning(kube, "refused.1", JOBSET, "JobCreationFailed", "exceeded quota: jobs", "2025-01-01T00:09:59Z")
    step(kube)
    assert "stall" not in status_of(kube, "sft")
    _warning(kube, "refused.2", JOBSET, "JobCreationFailed", "exceeded quota: jobs", "2025-01-01T00:10:00Z")
    step(kube)
    assert status_of(kube, "sft")["stall"]["subject"] == "JobSet demo-sft"


def test_jobsets_jobs_are_the_runs_descendants_in_the_cache_not_its_children():
    """Found by the run-UID label JobSet copied from the runtime, their Events wake the run; never adopted,
    deleted or counted as a runner."""
    kube = training_kube("trainjob")
    job = jobset_job(kube)
    assert job["metadata"]["labels"][LABEL_RUN_UID] == UID
    cache = Cache()
    cache.put_run(kube.run)
    assert cache.put(job) == [(NS, NAME)]
    event = {"kind": "Event", "metadata": {"name": "e", "namespace": NS, "uid": "e"}, "reason": "FailedCreate",
             "involvedObject": {"kind": "Job", "name": job["metadata"]["name"], "uid": "jobset-job-1"},
             "message": QUOTA}
    assert cache.put(event) == [(NS, NAME)]
    observed = cache.observed(kube.run)
    assert [d["metadata"]["name"] for d in observed.descendants] == ["demo-sft-node-0"]
    assert observed.children == [] and [e["reason"] for e in observed.events] == ["FailedCreate"]
    # an Event on the JobSet (not watched) wakes the run of the TrainJob of its name
    cache.put({**kube.objects[("TrainJob", f"{NAME}-sft")], "kind": "TrainJob"})
    assert cache.put({**event, "metadata": {"name": "f", "namespace": NS, "uid": "f"}, "reason": "JobCreationFailed",
                      "involvedObject": {"kind": "JobSet", "name": f"{NAME}-sft", "uid": "jobset-1"}}) == [(NS, NAME)]
    assert [e["reason"] for e in cache.observed(kube.run).events] == ["FailedCreate", "JobCreationFailed"]
    other = copy.deepcopy(job)  # an earlier run's, with its own UID: not ours
    other["metadata"].update(name="x", uid="y", labels={**job["metadata"]["labels"], LABEL_RUN_UID: "old"})
    assert cache.put(other) == [] and len(cache.observed(kube.run).descendants) == 1
    patches = kube.calls[("patch", "Job")]
    step(kube)
    assert kube.calls[("patch", "Job")] == patches and kube.calls[("delete", "Job")] == 0  # not adopted, kept

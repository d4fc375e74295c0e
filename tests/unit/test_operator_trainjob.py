"""`cluster.training.backend` (docs/operator.md, "Training backends"): the Kubeflow Trainer v2 objects the
builders make, how `auto` is resolved and recorded, the refusal of a backend the cluster does not serve, and a
run walked to the end through TrainJobs. No cluster here: FakeKube (test_operator_reconcile.py) stands in for
the apiserver; tests/cluster/test_operator_trainjob_run.py runs the same against the real Trainer and JobSet."""

from __future__ import annotations

import json

import pytest
from test_operator_reconcile import NAME, FakeKube, status_of, step, tiny_spec

from wrpo.errors import SpecError
from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import LABEL_RUN_UID, QUEUE_LABEL
from wrpo_operator import builders as b
from wrpo_operator.admission import run_children, spec_field, template_jobs
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
    assert rjob["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
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


def test_a_run_walks_its_training_stages_through_trainjobs():
    kube = FakeKube()
    kube.serves = {"PyTorchJob", "TrainJob"}
    kube.add_run(tiny_spec())
    for stage in STAGE_NAMES:
        step(kube)
        if stage in ("sft", "wrpo"):
            # the runtime first; the TrainJob once the watch shows it (Trainer's webhook refuses it before)
            assert ("TrainingRuntime", f"{NAME}-{stage}") in kube.objects
            assert ("TrainJob", f"{NAME}-{stage}") not in kube.objects
            assert "TrainingRuntime" in status_of(kube, stage)["message"]
            step(kube)
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
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Succeeded", status["message"]
    assert status["training"] == {"backend": "trainjob"}
    assert kube.kinds("TrainJob") == ["demo-sft", "demo-wrpo"] and kube.kinds("PyTorchJob") == []
    # the finished TrainJobs keep the runtimes they name
    assert kube.kinds("TrainingRuntime") == ["demo-sft", "demo-wrpo"]
    assert set(kube.created.values()) == {1}

"""Admission by the cluster itself (operator/wrpo_operator/admission.py, docs/operator.md "Admission"): the
one renderer of a run's children, the map from a refused child's field to the spec's, and what reconcile does
with a refusal. The apiserver is the in-memory stand-in of test_operator_reconcile.py (a mock); the cluster
test tests/cluster/test_operator_admission.py asks the real one."""

from __future__ import annotations

import copy
import json

import pytest
from test_operator_reconcile import NAME, NS, UID, FakeKube, step, tiny_spec, walk

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import LABEL_STAGE
from wrpo_operator.admission import run_children, spec_field, template_jobs
from wrpo_operator.kube import ApiError


def refusal(kind: str, name: str, field: str, message: str) -> ApiError:
    """An apiserver 422 as it sends it: the Status with its causes."""
    body = {"kind": "Status", "status": "Failure", "reason": "Invalid", "code": 422,
            "message": f'{kind} "{name}" is invalid: {field}: {message}',
            "details": {"name": name, "kind": kind.lower() + "s", "causes": [
                {"reason": "FieldValueInvalid", "message": message, "field": field}]}}
    return ApiError(422, "Unprocessable Entity", json.dumps(body))


def pods_spec() -> dict:
    return tiny_spec(cluster={"training": {"gpus": 1},
                              "tolerations": [{"key": "gpu", "operator": "Exists"}],
                              "pods": {"training": {"tolerations": [{"key": "train", "operator": "Exists"}],
                                                    "volumes": [{"name": "cache", "emptyDir": {}}],
                                                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
                                       "scoring": {"tolerations": [{"key": "a", "operator": "Exists"},
                                                                   {"key": "b", "operator": "Exists"}]}}})


def children_by_key(spec: dict) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in run_children(NAME, NS, parse_spec(spec), UID)}


def test_the_operator_creates_exactly_what_admission_renders():
    """One renderer: every child the operator creates over a whole run is, byte for byte, one that
    `run_children` (what the operator and `wrpo spec validate --server` dry-run) rendered, and the other way
    round."""
    kube, made = FakeKube(), {}
    create = kube.create

    def recording(obj, dry_run=False):
        if not dry_run:
            made[(obj["kind"], obj["metadata"]["name"])] = copy.deepcopy(obj)
        return create(obj, dry_run)

    kube.create = recording
    kube.add_run(tiny_spec())
    walk(kube)
    rendered = children_by_key(tiny_spec())
    assert made.keys() == rendered.keys()
    for key, obj in made.items():
        assert obj == rendered[key], key


def test_every_stage_and_kind_is_rendered_once_with_its_owner():
    kids = run_children(NAME, NS, parse_spec(pods_spec()), UID)
    keys = [(o["kind"], o["metadata"]["name"]) for o in kids]
    assert len(keys) == len(set(keys))
    assert {k for k, _ in keys} == {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "Job",
                                    "PyTorchJob"}
    stages = {o["metadata"]["labels"].get(LABEL_STAGE) for o in kids} - {None}
    assert stages == set(STAGE_NAMES)
    assert all(o["metadata"]["ownerReferences"][0]["uid"] == UID for o in kids)


def test_a_pytorchjobs_templates_are_asked_as_jobs():
    sft = children_by_key(pods_spec())[("PyTorchJob", f"{NAME}-sft")]
    jobs = template_jobs(sft)
    assert [j["metadata"]["name"] for j in jobs] == [f"{NAME}-sft-master"]
    assert jobs[0]["spec"]["template"] == sft["spec"]["pytorchReplicaSpecs"]["Master"]["template"]


@pytest.mark.parametrize(("key", "field", "as_kind", "want"), [
    # a merged list: the cluster-wide entries, then the class's
    (("Job", "demo-score-sources"), "spec.template.spec.tolerations[0].key", None, "cluster.tolerations[0]"),
    (("Job", "demo-score-sources"), "spec.template.spec.tolerations[2].effect", None,
     "cluster.pods.scoring.tolerations[1]"),
    (("PyTorchJob", "demo-sft"), "spec.template.spec.tolerations[1].key", "Job",
     "cluster.pods.training.tolerations[0]"),
    (("PyTorchJob", "demo-sft"), "spec.pytorchReplicaSpecs[Master].template.spec.affinity.nodeAffinity", None,
     "cluster.pods.training.affinity"),
    # the operator's own volumes and mounts come first
    (("PyTorchJob", "demo-sft"), "spec.template.spec.volumes[4].name", "Job", "cluster.pods.training.volumes[0]"),
    (("PyTorchJob", "demo-sft"), "spec.template.spec.containers[0].volumeMounts[4].mountPath", "Job",
     "cluster.pods.training.volumeMounts[0]"),
    (("Deployment", "demo-src-llama"), "spec.template.spec.containers[0].image", None, "cluster.vllmImage"),
    (("Job", "demo-prepare"), "spec.template.spec.containers[0].image", None, "cluster.runtimeImage"),
    (("Job", "demo-prepare"), "spec.template.metadata.annotations", None,
     "cluster.podAnnotations or cluster.pods.small.annotations"),
    (("Job", "demo-prepare"), "spec.template.spec.nodeSelector", None,
     "cluster.nodeSelector or cluster.pods.small.nodeSelector"),
    (("Job", "demo-prepare"), "spec.template.spec.serviceAccountName", None, "cluster.serviceAccount"),
    (("PersistentVolumeClaim", "demo-checkpoints"), "spec.storageClassName", None,
     "cluster.checkpoints.storageClassName"),
    (("Job", "demo-prepare"), "spec.template.spec.restartPolicy", None, None),  # the operator's own
])
def test_a_refused_field_maps_to_the_spec_field(key, field, as_kind, want):
    spec = parse_spec(pods_spec())
    kids = children_by_key(pods_spec())
    child = kids.get(key) or next(o for k, o in kids.items() if k[0] == key[0] and k[1].startswith(key[1]))
    assert spec_field(child, [field], spec, as_kind) == want


def test_a_refused_child_fails_the_run_before_anything_is_created():
    kube = FakeKube()
    kube.add_run(pods_spec())
    kube.refuse_dry[("Job", f"{NAME}-sft-master")] = refusal(
        "Job", f"{NAME}-sft-master", "spec.template.spec.tolerations[1].key", "name part must consist of ...")
    d = step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and d.status["phase"] == "Failed"
    assert "cluster.pods.training.tolerations[0]: the apiserver refused PyTorchJob demo-sft" in status["message"]
    invalid = [c for c in status["conditions"] if c["type"] == "SpecInvalid"]
    assert invalid and invalid[0]["status"] == "True"
    assert "cluster.pods.training.tolerations[0]" in invalid[0]["message"]
    assert [(t, r) for t, r, _ in kube.events] == [("Warning", "SpecInvalid")]
    assert not kube.created and set(kube.objects) == {("FusionRun", NAME)}
    # once per spec hash: the next reconcile asks nothing and says nothing
    kube.calls.clear()
    step(kube)
    assert not kube.calls and len(kube.events) == 1
    # a fixed spec is asked again and runs
    kube.refuse_dry.clear()
    kube.objects[("FusionRun", NAME)]["spec"] = tiny_spec()
    kube.objects[("FusionRun", NAME)]["metadata"]["generation"] = 2
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Running" and "refusedHash" not in status and status["admittedHash"]
    assert ("Job", f"{NAME}-prepare") in kube.created
    # the condition stays, False: `kubectl wait --for=condition=SpecInvalid=false` sees the fix
    invalid = [c for c in status["conditions"] if c["type"] == "SpecInvalid"]
    assert [(c["status"], c["reason"], c["observedGeneration"]) for c in invalid] == [("False", "Admitted", 2)]
    since = invalid[0]["lastTransitionTime"]
    step(kube)
    assert [c["lastTransitionTime"] for c in kube.run["status"]["conditions"] if c["type"] == "SpecInvalid"] == [since]


def test_a_refused_run_is_deleted_by_its_ttl_as_any_finished_run():
    spec = pods_spec()
    spec["cluster"]["ttlSecondsAfterFinished"] = 600
    kube = FakeKube()
    kube.add_run(spec)
    kube.refuse_dry[("Job", f"{NAME}-sft-master")] = refusal(
        "Job", f"{NAME}-sft-master", "spec.template.spec.tolerations[1].key", "name part must consist of ...")
    step(kube)
    assert kube.run["status"]["phase"] == "Failed" and ("FusionRun", NAME) in kube.objects
    d = step(kube, minutes=5)  # refused 5 minutes ago: still there, looked at again when the TTL ends
    assert ("FusionRun", NAME) in kube.objects and d.requeue is not None and 290 <= d.requeue <= 300
    step(kube, minutes=6)
    assert ("FusionRun", NAME) not in kube.objects


def test_admission_runs_once_per_spec_hash():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    step(kube)
    asked = sum(n for (verb, _), n in kube.calls.items() if verb == "dry-run")
    assert asked == len(run_children(NAME, NS, parse_spec(tiny_spec()), UID)) + 2  # + a Job per PyTorchJob
    kube.calls.clear()
    kube.finish("Job", f"{NAME}-prepare")
    step(kube)
    assert not [c for c in kube.calls if c[0] == "dry-run"]


def test_a_retryable_refusal_is_retried_not_recorded():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    kube.refuse_dry[("Job", f"{NAME}-prepare")] = ApiError(503, "Service Unavailable", "etcd")
    with pytest.raises(ApiError):
        step(kube)
    assert "status" not in kube.run and not kube.created


def test_a_quota_refusal_is_not_the_specs():
    """A ResourceQuota's refusal passes admission: the real creation waits for the quota (a stall)."""
    kube = FakeKube()
    kube.add_run(tiny_spec())
    kube.refuse_dry[("Job", f"{NAME}-prepare")] = ApiError(403, "Forbidden", json.dumps(
        {"message": 'jobs.batch "demo-prepare" is forbidden: exceeded quota: q, requested: count/jobs.batch=1'}))
    step(kube)
    assert kube.run["status"]["phase"] != "Failed" and ("Job", f"{NAME}-prepare") in kube.created


def test_without_causes_the_field_is_read_from_the_message():
    kube = FakeKube()
    kube.add_run(pods_spec())
    body = {"message": 'Job.batch "demo-score-sources" is invalid: spec.template.spec.tolerations[1].key: '
                       "Invalid value: \"a b\""}
    kube.refuse_dry[("Job", f"{NAME}-score-sources")] = ApiError(422, "Unprocessable Entity", json.dumps(body))
    step(kube)
    assert kube.run["status"]["message"].startswith("cluster.pods.scoring.tolerations[0]: the apiserver refused")


def test_validate_server_without_an_apiserver_says_so_in_one_line(tmp_path, capsys):
    """`wrpo spec validate --server` with a kubeconfig whose apiserver does not answer: one error line and
    exit code 2, never a traceback (the cluster test asks a real one)."""
    from wrpo.cli.main import main

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    spec = tmp_path / "run.yaml"
    spec.write_text(json.dumps({"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
                                "metadata": {"name": "run"}, "spec": tiny_spec()}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["spec", "validate", str(spec), "--server", "--kubeconfig", str(kubeconfig), "-n", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if "--server: the apiserver could not answer" in line)]


def test_a_cluster_wide_mistake_is_told_in_a_few_lines():
    kube = FakeKube()
    kube.add_run(pods_spec())
    for key in children_by_key(pods_spec()):
        kube.refuse_dry[key] = refusal(key[0], key[1], "spec.template.spec.tolerations[0].key", "bad")
    step(kube)
    lines = kube.run["status"]["message"].splitlines()
    assert len(lines) == 6 and lines[-1].startswith("... and ") and lines[-1].endswith(" more children refused")

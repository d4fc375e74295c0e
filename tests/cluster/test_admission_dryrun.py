"""Admission by the cluster itself (docs/operator.md, "Admission"), against the real apiserver: a FusionRun
whose later-stage child the apiserver would refuse never starts its first stage, and `wrpo spec validate
--cluster --server` (the same renderer and dry run, from outside) agrees with the operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import children, create_run, events, tiny_spec, wait, wait_phase

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from corpus import as_fusionrun, spec_cases  # noqa: E402

from wrpo.errors import SpecError  # noqa: E402
from wrpo.pipeline import spec as spec_module  # noqa: E402
from wrpo.pipeline.spec import load_spec, parse_spec  # noqa: E402
from wrpo_operator.admission import dry_run, run_children  # noqa: E402
from wrpo_operator.kube import Kube  # noqa: E402

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
VALIDATE_ONLY = [c for c in spec_cases() if c.validate_only]
#: Only the training pods' affinity is wrong (`In` needs values): the CRD and `wrpo spec validate` without
#: --server admit it (an affinity is a Kubernetes object the spec passes through), and so do the PyTorchJob
#: CRD and webhook: the pods the training-operator would make for the sft stage, four stages after the
#: first, would be refused (asked as a Job of the same template, admission.template_jobs).
BAD_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "pool", "operator": "In"}]}]}}}


def validate(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")])}
    return subprocess.run([sys.executable, "-m", "wrpo.cli", "spec", "validate", str(path), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def manifest(tmp_path: Path, name: str, spec: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",  # JSON is YAML
                                "metadata": {"name": name}, "spec": spec}, indent=1))
    return path


def test_a_run_whose_training_pods_would_be_refused_never_starts(operator, apis, run_namespace, k8s_kubeconfig,
                                                                 tmp_path):
    custom, _, _, core = apis
    spec = tiny_spec(pods={"training": {"affinity": BAD_AFFINITY}})
    parse_spec(spec, cluster=True)  # admitted by the spec's own rules: only the cluster can tell
    create_run(custom, run_namespace, "refused", spec)  # and by the CRD
    status = wait_phase(custom, run_namespace, "refused", "Failed", 180, operator)
    invalid = [c for c in status["conditions"] if c["type"] == "SpecInvalid"]
    assert invalid and invalid[0]["status"] == "True", status
    assert "cluster.pods.training.affinity: the apiserver refused PyTorchJob refused-sft" in status["message"]
    assert "Required value" in status["message"] and status.get("refusedHash")
    assert not any(children(apis, run_namespace, "refused").values())
    assert not [s for s in status.get("stages") or [] if s.get("state") != "Pending"]
    warned = wait(lambda: [e for e in events(core, run_namespace, "refused") if e[1] == "SpecInvalid"] or None,
                  30, "the SpecInvalid Event", operator)
    assert len(warned) == 1 and warned[0][0] == "Warning"
    assert [e for e in events(core, run_namespace, "refused") if e[0] == "Warning"] == warned

    # `validate --server` asks the same apiserver the same question and gets the same answer
    path = manifest(tmp_path, "refused", spec)
    offline = validate(path, "--cluster")
    assert offline.returncode == 0, offline.stderr
    online = validate(path, "--server", "--kubeconfig", str(k8s_kubeconfig), "--namespace", run_namespace)
    assert online.returncode == 2, online.stderr
    assert "cluster.pods.training.affinity: the apiserver refused PyTorchJob refused-sft" in online.stderr
    # and admits what the operator runs
    fine = validate(manifest(tmp_path, "fine", tiny_spec()), "--server", "--kubeconfig", str(k8s_kubeconfig),
                    "--namespace", run_namespace)
    assert fine.returncode == 0 and "admitted by the apiserver" in fine.stderr, fine.stderr


@pytest.mark.parametrize("case", VALIDATE_ONLY, ids=lambda c: c.name)
def test_validate_only_cases_are_refused_by_the_apiserver_at_the_same_field(k8s_api_client, k8s_namespace,
                                                                           monkeypatch, case):
    """The corpus cases the CRD admits and `validate` refuses (a pod-level rule): with that rule switched off
    here, the operator's dry run of the children is refused by the apiserver, at the field validate names.
    So the two agree, and the local rule only says early what the cluster would say."""
    field = case.expect[0].split(": ")[1].rsplit(".", 1)[0]  # e.g. cluster.pods.training.volumes[0]
    with pytest.raises(SpecError):
        load_spec(case.path, cluster=True)
    monkeypatch.setattr(spec_module, "_volume_problems", lambda pods, component: [])
    spec = load_spec(case.path, cluster=True)
    refusals = dry_run(Kube(k8s_api_client), run_children("corpus", k8s_namespace, spec, "0" * 8), spec)
    assert refusals, f"{case.name}: the apiserver admitted every child"
    assert {r.field for r in refusals} == {field}, [str(r) for r in refusals]


@pytest.mark.parametrize("case", VALIDATE_ONLY, ids=lambda c: c.name)
def test_validate_server_refuses_the_validate_only_cases(k8s_kubeconfig, k8s_namespace, case):
    out = validate(case.path, "--cluster", "--server", "--kubeconfig", str(k8s_kubeconfig),
                   "--namespace", k8s_namespace)
    assert out.returncode == 2 and "cluster.pods.training.volume" in out.stderr, out.stderr


def test_the_operator_refuses_the_validate_only_cases_too(operator, apis, run_namespace, k8s_api_client):
    """Each case applied as written (the CRD admits it): the operator fails it before any child exists, naming
    the field `validate` names (its own spec rules see it first; were they gone, the admission dry run would,
    as test_validate_only_cases_are_refused_by_the_apiserver_at_the_same_field shows)."""
    custom = apis[0]
    kube = Kube(k8s_api_client)
    names = {}
    for i, case in enumerate(VALIDATE_ONLY):
        name = f"only-{i}"
        kube.request("create", "FusionRun", "POST",
                     f"/apis/fusion.wrpo.io/v1alpha1/namespaces/{run_namespace}/fusionruns",
                     body=as_fusionrun(case.path.read_text(), name, run_namespace), content_type="application/yaml")
        names[name] = case
    for name, case in names.items():
        status = wait_phase(custom, run_namespace, name, "Failed", 180, operator)
        field = case.expect[0].split(": ")[1]
        assert field in status["message"], f"{case.name}: {status['message']}"
        assert not any(children(apis, run_namespace, name).values()), case.name


def test_a_child_that_exists_is_checked_with_its_new_content(k8s_api_client, k8s_namespace):
    """A spec change of a running run: the apiserver validates a dry-run create (schema, rules, admission
    webhooks) before its storage answers 409 for a name that exists, so an existing child's new content is
    refused at its spec field, and content it admits passes (409 is not a refusal)."""
    kube = Kube(k8s_api_client)
    spec = parse_spec(tiny_spec())
    prepare = next(o for o in run_children("exists", k8s_namespace, spec, "0" * 8)
                   if o["kind"] == "Job" and o["metadata"]["name"] == "exists-prepare")
    prepare["metadata"].pop("ownerReferences", None)  # no such owner here; the Job itself must exist
    assert kube.create(prepare) is not None
    assert dry_run(kube, [prepare], spec) == []
    bad = json.loads(json.dumps(prepare))
    bad["spec"]["template"]["spec"]["affinity"] = BAD_AFFINITY
    refusals = dry_run(kube, [bad], spec)
    assert [(r.kind, r.name) for r in refusals] == [("Job", "exists-prepare")], refusals
    assert refusals[0].field == "cluster.pods.small.affinity" and "Required value" in refusals[0].message
    jobs = kube.request("list", "Job", "GET", kube._path("Job", k8s_namespace))["items"]
    assert [j["metadata"]["name"] for j in jobs] == ["exists-prepare"]  # the dry runs stored nothing

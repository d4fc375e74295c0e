"""The Helm chart, plain manifests, examples and Argo CD health check (helm checks skip without helm, and fail
without it in CI: tests/binaries.py)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from binaries import require_binary

from wrpo.pipeline.spec import parse_spec
from wrpo_operator.kube import RESOURCES
from wrpo_operator.reconcile import check_cluster_spec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wrpo-operator"
MANIFESTS = ROOT / "manifests"
EXAMPLES = sorted((MANIFESTS / "examples").glob("*.yaml"))


_CACHE = Path(os.environ.get("WRPO_CACHE") or Path.home() / ".cache" / "wrpo")
HELM_CANDIDATES = [os.environ.get("WRPO_K8S_BIN", "") + "/helm", *glob.glob(str(_CACHE / "k8s-bin/*/helm"))]


# helm comes from tests/cluster/build-binaries.sh: scripts/test.sh runs these in its cluster tier, after the build
uses_k8s_bin = pytest.mark.cluster


def helm(*args: str) -> str:
    """`helm ARGS`. Every helm test goes through here: it skips without helm (fails in CI: tests/binaries.py),
    so no test can forget a skip marker."""
    binary = require_binary("helm", HELM_CANDIDATES, "tests/cluster/build-binaries.sh builds it")
    return subprocess.run([binary, *args], capture_output=True, text=True, check=True).stdout



def render(*sets: str) -> list[dict]:
    args = ["template", "wrpo-operator", str(CHART), "-n", "wrpo-system"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args)) if d]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_fusionruns(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "fusion.wrpo.io/v1alpha1" and doc["kind"] == "FusionRun"
    spec = parse_spec(doc["spec"], str(path))
    check_cluster_spec(spec, str(path))
    name = doc["metadata"]["name"]
    assert len(name) <= 40 and name[0].isalpha()


def test_paper_example_has_table_11():
    spec = parse_spec(yaml.safe_load((MANIFESTS / "examples" / "paper-llama3-8b.yaml").read_text())["spec"])
    assert spec.target.model.endswith("Meta-Llama-3-8B-Instruct")
    assert len(spec.sources) == 10 and spec.reward.model.endswith("ArmoRM-Llama3-8B-v0.1")
    assert {s.group for s in spec.sources} == {"a", "b"}
    paper = (spec.sampling.n, spec.wrpo.beta, spec.wrpo.alpha, spec.training.deepspeed_stage)
    assert paper == (5, 0.01, 0.1, 3)


def test_external_endpoint_example_keeps_its_key_in_a_secret():
    text = (MANIFESTS / "examples" / "external-endpoint.yaml").read_text()
    spec = parse_spec(yaml.safe_load(text)["spec"])
    (api,) = [s for s in spec.sources if s.endpoint]
    assert api.endpoint.api_key_secret and api.endpoint.api_key_env
    body = text[text.index("apiVersion"):]
    assert "sk-" not in body and "apiKey:" not in body


def test_argocd_configmap_carries_the_lua_script():
    lua = (MANIFESTS / "argocd" / "health-fusionrun.lua").read_text()
    cm = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm-patch.yaml").read_text())
    assert cm["data"]["resource.customizations.health.fusion.wrpo.io_FusionRun"] == lua
    for status in ("Healthy", "Degraded", "Suspended", "Progressing"):
        assert f'"{status}"' in lua


def test_values_schema_is_json_and_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) == set(schema["properties"])


@uses_k8s_bin
def test_helm_lint_is_clean():
    out = helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out


@uses_k8s_bin
def test_values_schema_rejects_bad_values():
    with pytest.raises(subprocess.CalledProcessError) as e:
        render("scope=everywhere")
    assert "scope" in e.value.stderr


@uses_k8s_bin
def test_replicas_need_leader_election():
    (dep,) = [d for d in render("replicaCount=2") if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 2
    with pytest.raises(subprocess.CalledProcessError) as e:
        render("replicaCount=2", "leaderElection.enabled=false")
    assert "needs leaderElection.enabled" in e.value.stderr
    (dep,) = [d for d in render("leaderElection.enabled=false") if d["kind"] == "Deployment"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert not [d for d in render("leaderElection.enabled=false") if d["kind"] == "Role"]


@uses_k8s_bin
def test_operator_deployment():
    (dep,) = [d for d in render() if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "RollingUpdate"}
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WRPO_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "wrpo_operator"]
    assert c["args"][:2] == ["--standalone", "--all-namespaces"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["serviceAccountName"] == "wrpo-operator" and pod["securityContext"]["runAsNonRoot"]


@uses_k8s_bin
@pytest.mark.parametrize("scope,kinds", [
    ("cluster", ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]),
    ("namespace", ["Role", "Role", "Role", "RoleBinding", "RoleBinding", "RoleBinding"]),  # + the Lease's
])
def test_rbac_modes(scope, kinds):
    docs = render(f"scope={scope}", "watchNamespaces={team-a,team-b}")
    assert [d["kind"] for d in docs if "Role" in d["kind"]] == kinds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    # kopf's Namespace/CRD scanning needs cluster-wide reads that only the cluster scope grants
    assert env.get("WRPO_OPERATOR_SCANNING") == (None if scope == "cluster" else "false")
    if scope == "namespace":
        assert "--namespace=team-a" in args and "--namespace=team-b" in args
        assert {d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"} == {"team-a", "team-b",
                                                                                    "wrpo-system"}


@uses_k8s_bin
def test_rbac_is_least_privilege_and_covers_what_the_operator_calls():
    (role,) = [d for d in render() if d["kind"] == "ClusterRole"]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    needed = set()
    for prefix, plural in RESOURCES.values():
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        needed.add((group, plural))
    needed.discard(("coordination.k8s.io", "leases"))  # in the release namespace only (a Role), below
    extra = granted - needed - {("fusion.wrpo.io", "fusionruns/status"), ("fusion.wrpo.io", "fusionruns/finalizers"),
                                ("events.k8s.io", "events"), ("apiextensions.k8s.io", "customresourcedefinitions"),
                                ("", "namespaces"), ("kueue.x-k8s.io", "workloads")}
    assert needed <= granted and not extra
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]  # Secrets reach pods by reference only
        if "pods" in rule["resources"] or "workloads" in rule["resources"]:
            assert rule["verbs"] == ["get", "list", "watch"]  # pods (stalls) and Kueue's Workloads are only read
        if "fusionruns/finalizers" in rule["resources"]:
            assert rule["verbs"] == ["update"]  # blockOwnerDeletion under OwnerReferencesPermissionEnforcement
    (lease,) = [d for d in render() if d["kind"] == "Role"]
    assert lease["metadata"]["namespace"] == "wrpo-system"
    assert lease["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "create", "update", "patch"]}]


@uses_k8s_bin
def test_plain_rbac_matches_the_chart():
    def strip(d):
        labels = d["metadata"].get("labels", {})
        for k in ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/version"):
            labels.pop(k, None)
        return d

    kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    chart = [strip(d) for d in render() if d["kind"] in kinds]
    plain = [d for d in yaml.safe_load_all((MANIFESTS / "rbac" / "operator-rbac.yaml").read_text()) if d]
    assert plain == chart


def test_chart_crd_is_the_generated_one():
    assert (CHART / "crds" / "fusionruns.fusion.wrpo.io.yaml").read_text() == (
        MANIFESTS / "crd" / "fusionruns.fusion.wrpo.io.yaml").read_text()


@uses_k8s_bin
def test_the_run_state_read_uses_the_operators_own_credentials():
    """runState: on by default without credentials (a pod role); a Secret of the release namespace as
    references only; off on request."""
    def env(*sets):
        (dep,) = [d for d in render(*sets) if d["kind"] == "Deployment"]
        return {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}

    default = env()
    assert default["WRPO_OPERATOR_READ_RUN_STATE"]["value"] == "true" and "AWS_ACCESS_KEY_ID" not in default
    with_secret = env("runState.credentialsSecret=s3-read")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert with_secret[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-read", "key": key}
    assert env("runState.enabled=false")["WRPO_OPERATOR_READ_RUN_STATE"]["value"] == "false"


@uses_k8s_bin
@pytest.mark.parametrize("backends,granted", [
    ("{pytorchjob,trainjob}", {("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs"),
                               ("trainer.kubeflow.org", "trainingruntimes")}),
    ("{pytorchjob}", {("kubeflow.org", "pytorchjobs")}),
    ("{trainjob}", {("trainer.kubeflow.org", "trainjobs"), ("trainer.kubeflow.org", "trainingruntimes")}),
])
def test_rbac_grants_exactly_the_training_backends_asked(backends, granted):
    """rbac.trainingBackends (cluster.training.backend, docs/operator.md "Training backends"): each backend's
    kinds with the verbs of every other child, nothing of a backend left out; JobSets are Trainer's, not ours."""
    (role,) = [d for d in render(f"rbac.trainingBackends={backends}") if d["kind"] == "ClusterRole"]
    training = {(g, r): rule["verbs"] for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                if g in ("kubeflow.org", "trainer.kubeflow.org", "jobset.x-k8s.io")}
    assert set(training) == granted
    assert all(v == ["get", "list", "watch", "create", "patch", "delete"] for v in training.values())


@uses_k8s_bin
def test_rbac_training_backends_are_checked_by_the_values_schema():
    with pytest.raises(subprocess.CalledProcessError) as e:
        render("rbac.trainingBackends={mpijob}")
    assert "trainingBackends" in e.value.stderr

"""`helm install` of the chart on the harness, and the CRD's validation as the apiserver applies it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from wrpo_operator import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wrpo-operator"
TINY = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())


def test_helm_install_and_the_operator_becomes_ready(helm_install, k8s_namespace, k8s_api_client):
    from kubernetes import client

    release = helm_install(CHART, "wrpo-operator", k8s_namespace, wait=True, timeout="120s",
                           values={"scope": "namespace"})
    assert release.status["info"]["status"] == "deployed"
    apps = client.AppsV1Api(k8s_api_client)
    dep = apps.read_namespaced_deployment("wrpo-operator", k8s_namespace)
    assert dep.status.available_replicas == 1 and dep.spec.strategy.type == "RollingUpdate"  # leader election
    rbac = client.RbacAuthorizationV1Api(k8s_api_client)
    assert rbac.read_namespaced_role("wrpo-operator", k8s_namespace).rules
    ext = client.ApiextensionsV1Api(k8s_api_client)
    crd = ext.read_custom_resource_definition("fusionruns.fusion.wrpo.io")
    assert crd.spec.names.short_names == ["fr"]


def _with(path: str, value):
    doc = copy.deepcopy(TINY)
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


INVALID = [
    ("duplicate-sources", _with("spec.sources.1", {"name": "llama", "model": "s3://x/y"}),
     ["spec.sources", "source names must be unique"]),
    ("model-and-endpoint", _with("spec.sources.0.endpoint", {"url": "http://h/v1", "model": "m"}),
     ["spec.sources[0]", "exactly one of 'model' and 'endpoint'"]),
    ("neither", _with("spec.sources.0", {"name": "llama"}), ["spec.sources[0]", "exactly one"]),
    ("alpha", _with("spec.wrpo.alpha", 1.5), ["spec.wrpo.alpha"]),
    ("prompt-length", _with("spec.wrpo.maxPromptLength", 256), ["spec.wrpo.maxPromptLength"]),
    ("served-name", _with("spec.target.servedName", "llama"), ["spec.target.servedName", "collides"]),
    ("reward", _with("spec.reward", {"type": "armorm", "model": None}), ["spec.reward.model", "needs 'model'"]),
    ("bad-enum", _with("spec.training.deepspeedStage", 1), ["spec.training.deepspeedStage"]),
    ("source-name", _with("spec.sources.0.name", "Not_A_Label"), ["spec.sources[0].name"]),
    ("run-name", _with("metadata.name", "9-starts-with-digit"), ["DNS-1035"]),
    ("shared-checkpoints", _with("spec.cluster.training.nodes", 2),
     ["spec.cluster.checkpoints.accessModes", "needs ReadWriteMany"]),
    ("env-source", _with("spec.cluster.env", [{"name": "A"}]), ["spec.cluster.env[0]", "exactly one of"]),
]


@pytest.fixture
def crd(fusionrun_crd):
    """The chart's CRD: the session installs it once (conftest.py; the chart's crds/ file is
    `wrpo_operator.crd.build_crd`'s output: tests/unit/test_operator_crd.py checks it)."""


@pytest.mark.parametrize("case,doc,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_specs_are_rejected_by_the_apiserver_naming_the_field(k8s_api_client, k8s_namespace, crd,
                                                                       case, doc, expected):
    from kubernetes import client

    custom = client.CustomObjectsApi(k8s_api_client)
    with pytest.raises(client.ApiException) as e:
        custom.create_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, doc)
    assert e.value.status == 422, e.value.body
    for text in expected:
        assert text in e.value.body, e.value.body


def test_the_valid_tiny_run_is_accepted_and_defaulted(k8s_api_client, k8s_namespace, crd):
    from kubernetes import client

    custom = client.CustomObjectsApi(k8s_api_client)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, TINY)  # served: `crd`
    assert created["spec"]["sampling"]["temperature"] == 0.8  # the paper default, filled in by the apiserver

"""The FusionRun CRD is generated from the pydantic models; the checked-in copies must not drift."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from wrpo.pipeline.spec import CLUSTER_RULES, FusionSpec
from wrpo_operator import crd

ROOT = crd.ROOT


def _schema() -> dict:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", crd.CRD_PATHS, ids=lambda p: str(p.relative_to(ROOT)))
def test_checked_in_crd_matches_the_models(path):
    assert path.exists(), "run: python -m wrpo_operator.crd --write"
    assert path.read_text() == crd.render(), (
        f"{path.relative_to(ROOT)} drifted from wrpo/pipeline/spec.py; "
        "regenerate with python -m wrpo_operator.crd --write"
    )


def test_check_command_reports_drift(tmp_path, monkeypatch):
    stale = tmp_path / "crd.yaml"
    stale.write_text("old\n")
    monkeypatch.setattr(crd, "CRD_PATHS", (stale,))
    assert crd.main(["--check"]) == 1
    assert crd.main(["--write"]) == 0 and crd.main(["--check"]) == 0


def test_identity_and_printer_columns():
    doc = crd.build_crd()
    assert doc["metadata"]["name"] == "fusionruns.fusion.wrpo.io"
    s = doc["spec"]
    assert s["scope"] == "Namespaced" and s["names"]["shortNames"] == ["fr"]
    (v,) = s["versions"]
    assert v["name"] == "v1alpha1" and v["subresources"] == {"status": {}}
    cols = [c["name"] for c in v["additionalPrinterColumns"]]
    assert cols[:6] == ["Phase", "Stage", "Progress", "Units", "Fused-vs-Target", "Age"]


def _walk(node, path="$"):
    yield path, node
    for key in ("properties",):
        for name, sub in (node.get(key) or {}).items():
            yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    """Every node has a type (or preserves unknown fields); no $ref, anyOf, titles or JSON-schema-only
    keys; `additionalProperties` never beside `properties`."""
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"}
    for path, node in _walk(_schema()):
        assert not forbidden & node.keys(), (path, forbidden & node.keys())
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert not {"exclusiveMinimum", "exclusiveMaximum"} & node.keys(), path  # CEL rules instead
        assert node.get("default", 0) is not None, path


def test_optional_fields_are_nullable_and_free_form_only_where_the_model_is():
    spec = _schema()["properties"]["spec"]["properties"]
    src = spec["sources"]["items"]["properties"]
    assert src["model"]["nullable"] and src["endpoint"]["nullable"] and src["endpoint"]["type"] == "object"
    toleration = spec["cluster"]["properties"]["tolerations"]["items"]  # typed, with Kubernetes' rules as CEL
    assert toleration["properties"]["operator"]["enum"] == ["Exists", "Equal", ""]
    assert toleration["x-kubernetes-validations"]
    preserved = [p for p, n in _walk(_schema()) if n.get("x-kubernetes-preserve-unknown-fields")]
    # Kubernetes' own types passed through to pods (metadata is typed `object` by convention)
    per_component = [f"$.spec.cluster.pods.{c}.{f}" for c in ("vllm", "sampling", "scoring", "training", "small")
                     for f in ("affinity", "volumes[]", "volumeMounts[]")]
    assert sorted(preserved) == sorted(per_component)


def test_paper_defaults_and_bounds_reach_the_schema():
    spec = _schema()["properties"]["spec"]["properties"]
    wrpo = spec["wrpo"]["properties"]
    assert wrpo["alpha"]["minimum"] == 0 and wrpo["alpha"]["maximum"] == 1 and wrpo["alpha"]["default"] == 0.1
    assert wrpo["beta"]["default"] == 0.01
    beta_rules = wrpo["beta"]["x-kubernetes-validations"]
    assert beta_rules == [{"rule": "self > 0.0", "message": "must be greater than 0"}]
    assert wrpo["labelSmoothing"]["x-kubernetes-validations"][0]["rule"] == "self < 0.5"
    assert spec["sampling"]["properties"]["n"]["default"] == 5
    assert spec["training"]["properties"]["deepspeedStage"]["enum"] == [0, 2, 3]
    assert spec["sources"]["maxItems"] == 64 and spec["sources"]["minItems"] == 1


def test_every_pydantic_cross_field_rule_has_a_cel_twin():
    """A new model_validator in wrpo/pipeline/spec.py needs a CEL rule in wrpo_operator.crd.CEL_RULES, and a
    new cluster rule (spec.CLUSTER_RULES) one in crd.CLUSTER_CEL. (tests/cluster/test_spec_corpus.py checks
    that the twins refuse the same specs.)"""
    assert crd.pydantic_validators(FusionSpec) == set(crd.CEL_RULES)
    assert set(CLUSTER_RULES) == set(crd.CLUSTER_CEL)


def _rules(node) -> list[dict]:
    return node.get("x-kubernetes-validations", [])


def test_cel_rules_sit_on_their_models():
    s = _schema()
    spec = s["properties"]["spec"]
    assert "exists_one" in _rules(spec["properties"]["sources"])[0]["rule"]
    paths = [r.get("fieldPath") for r in _rules(spec)]
    assert {".target.servedName", ".selection.sourceRank", ".storage.runUri", ".sft.batchSize",
            ".cluster.gpuBudget"} <= set(paths)
    assert _rules(spec["properties"]["sources"]["items"])[0]["message"].startswith("a source needs exactly one")
    assert {r.get("fieldPath") for r in _rules(spec["properties"]["wrpo"])} == {".maxPromptLength", ".batchSize"}
    assert "metadata.name" in _rules(s)[0]["rule"]
    assert all(r["reason"] == "FieldValueInvalid" for r in _rules(spec))


def test_field_checks_reach_the_crd():
    spec = _schema()["properties"]["spec"]["properties"]
    memory = spec["cluster"]["properties"]["vllm"]["properties"]["memory"]
    assert "isQuantity(self)" in _rules(memory)[0]["rule"] and memory["maxLength"] == 64
    run_uri = spec["storage"]["properties"]["runUri"]
    assert run_uri["nullable"] and run_uri["maxLength"] == 1024 and len(_rules(run_uri)) == 3  # + the bucket's name
    assert "must not contain credentials" in _rules(run_uri)[0]["message"]


def test_cel_reads_pydantic_defaults_where_the_apiserver_has_none():
    """An absent section keeps its default_factory's values (cluster.training: 8 processes); a present one
    gets leaf defaults from the schema (a cluster.training that omits procsPerNode: 1)."""
    expr = crd.get(FusionSpec, "cluster.training.procsPerNode")
    assert expr == ("(has(self.cluster) ? (has(self.cluster.training) ? (has(self.cluster.training.procsPerNode) "
                    "? self.cluster.training.procsPerNode : 1) : 8) : 8)")
    assert crd.get(FusionSpec, "target.servedName") == (
        "(has(self.target.servedName) ? self.target.servedName : 'target')")  # target is required
    assert crd.get(FusionSpec, "wrpo.rejectedSource") == (
        "(has(self.wrpo) ? (has(self.wrpo.rejectedSource) ? self.wrpo.rejectedSource : false) : false)")


def test_status_schema_comes_from_the_status_model():
    status = _schema()["properties"]["status"]["properties"]
    assert {"phase", "stage", "progress", "conditions", "stages", "observedGeneration"} <= status.keys()
    assert status["phase"]["enum"] == ["Pending", "Running", "Suspended", "Succeeded", "Failed"]
    cond = status["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "lastTransitionTime", "observedGeneration"} <= cond.keys()


def test_generator_cli_prints_yaml():
    out = subprocess.run([sys.executable, "-m", "wrpo_operator.crd"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert yaml.safe_load(out.stdout)["kind"] == "CustomResourceDefinition"


def test_yaml_11_boolean_words_are_quoted():
    """helm/kubectl read YAML 1.1, where a bare `n:` key is the boolean false."""
    text = crd.render()
    assert "\n                  'n':\n" in text
    assert not re.search(r"^\s+(n|y|no|yes|on|off):", text, re.M)

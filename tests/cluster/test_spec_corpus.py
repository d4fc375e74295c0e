"""One spec, one meaning: every wrong spec of tests/corpus/specs, refused by `wrpo spec validate`
(tests/unit/test_corpus.py), is refused by the real apiserver with the generated CRD too, with the field
named; the cases the apiserver accepts are the documented YAML 1.1 readings (`# apiserver: accepted`).

Each case is created as a FusionRun with a server-side dry run and strict field validation, its text sent
as YAML (read by the apiserver's YAML 1.1 library, as kubectl and helm read it) so that YAML-level
mistakes arrive as written. The valid specs the cases start from are admitted and read back unchanged."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from corpus import ROOT, as_fusionrun, spec_cases  # noqa: E402

from wrpo.errors import SpecError  # noqa: E402
from wrpo.pipeline.spec import load_spec, parse_spec  # noqa: E402
from wrpo_operator.kube import ApiError, Kube  # noqa: E402

pytestmark = pytest.mark.cluster
SPEC_CASES = spec_cases()


@pytest.fixture(scope="module")
def kube(k8s_api_client, fusionrun_crd) -> Kube:
    """The cluster with this checkout's CRD (the session's, conftest.py)."""
    return Kube(k8s_api_client)


@pytest.fixture(scope="module")
def namespace(kube) -> str:
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    kube.request("create", "Namespace", "POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
    yield name
    kube.request("delete", "Namespace", "DELETE", f"/api/v1/namespaces/{name}")


def dry_run_create(kube: Kube, namespace: str, text: str) -> tuple[bool, str, dict]:
    """(admitted, the apiserver's message, the object it would store); `text` is YAML (JSON is YAML too)."""
    try:
        obj = kube.request("create", "FusionRun", "POST",
                           f"/apis/fusion.wrpo.io/v1alpha1/namespaces/{namespace}/fusionruns", body=text,
                           query=[("dryRun", "All"), ("fieldValidation", "Strict")],
                           content_type="application/yaml")
        return True, "", obj
    except ApiError as e:
        try:
            return False, json.loads(e.body)["message"], {}
        except (ValueError, KeyError):
            return False, e.body or str(e), {}


@pytest.mark.parametrize("path", [ROOT / "valid-spec.yaml", ROOT / "valid-run.yaml"], ids=lambda p: p.name)
def test_the_starting_points_are_admitted_and_mean_the_same(kube, namespace, path):
    admitted, message, obj = dry_run_create(kube, namespace, as_fusionrun(path.read_text(), "corpus", namespace))
    assert admitted, message
    # the apiserver's defaults are pydantic's: the stored spec is the spec validate read
    assert parse_spec(obj["spec"], cluster=True) == load_spec(path, cluster=True)


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: c.name)
def test_the_apiserver_refuses_what_validate_refuses(kube, namespace, case):
    with pytest.raises(SpecError):
        load_spec(case.path, cluster=True)  # refused here (the unit test checks the exact lines)
    admitted, message, _ = dry_run_create(kube, namespace, as_fusionrun(case.path.read_text(), "corpus", namespace))
    accepted = [a for a in case.apiserver if a.startswith("accepted: ")]
    if accepted:  # a YAML 1.1 reading shared by kubectl, helm and the apiserver (validate refuses the ambiguity)
        assert admitted, f"{case.name}: expected the documented acceptance ({accepted[0]}), got: {message}"
        return
    assert not admitted, f"{case.name}: the apiserver admitted a spec that validate refuses"
    for part in case.apiserver:
        field, sep, text = part.partition(" ~ ")
        if sep:
            assert f"{field}: " in message and text in message, f"{case.name}: {part!r} not in {message!r}"
        else:
            assert part in message, f"{case.name}: {part!r} not in {message!r}"


#: Values on both sides of each field check (accepted ones too): local validation and the CRD's CEL twin
#: must give the same answer for every one.
FIELD_VALUES = {
    "cluster.vllm.memory": ["8Gi", "500M", "1e3", "0.5", "1.5Gi", "+1", "100m", "0", "-1", "8GB", "lots", "1.5.1"],
    "cluster.training.cpu": ["2", "500m", "0.25", "0m", "2 cores"],
    "cluster.serviceAccount": ["a", "my-sa", "a.b-c", "a" * 253, "A", "a_b", "-a", "a.", "a" * 254],
    "cluster.modelsPvc": ["hf-models", "x.y", "hf models"],
    "storage.runUri": ["s3://bucket", "s3://my.bucket-1/a/b", "s3://", "s3:///x", "S3://b/x", "gs://b/x",
                       "s3://k:s@b/x", "./runs/x", "/runs/x"],
    "target.model": ["org/name", "/models/m", "s3://b/m", "hf://org/name", "https://x/m", "./m", "s3://u@b/m"],
    "dataset.uri": ["s3://b/p.jsonl", "/data/p.jsonl", "https://x/p.jsonl", "../p.jsonl"],
    "storage.s3Endpoint": ["http://h", "https://h.example.com:443/v1/", "http://10.0.0.1:8000", "http://[::1]:80/v1",
                           "http://my_host:1/", "https://", "h:80", "https://h/v1?k=1", "https://h#f",
                           "https://u:p@h", "https://h:0", "https://h:65536", "https://h/a b"],
    "cluster.vllm.env": [{"A": "1"}, {"_x": "1", "B2": ""}, {"1A": "1"}, {"A-B": "1"}, {"A B": "1"}],
    "cluster.podAnnotations": [{"a": "x"}, {"example.com/a": "x"}, {"a.b/c_d.e-f": ""}, {"a" * 63: "x"},
                               {"a/b/c": "x"}, {"Example.com/a": "x"}, {"-a": "x"}, {"a" * 64: "x"}, {"": "x"}],
    "cluster.nodeSelector": [{"pool": "gpu"}, {"pool": ""}, {"k8s.io/pool": "a.b_c-d"}, {"pool": "gpu a"},
                             {"pool": "a" * 64}, {"pool": "-a"}],
    "sources.0.name": ["a", "a-b-1", "a" * 40, "a" * 41, "A", "a_b", "-a"],
    "sft.batchSize": [4, 6, 7, 8, 12],  # perDeviceBatchSize 2 on 2 processes: multiples of 4
    "selection.sourceRank": [1, 2, 3],
}


def _valid_spec() -> dict:
    spec = json.loads(json.dumps(load_spec(ROOT / "valid-spec.yaml").model_dump(mode="json", by_alias=True,
                                                                             exclude_defaults=True)))
    spec.setdefault("cluster", {})["training"] = {"gpus": 2, "procsPerNode": 2}
    spec["sft"] = {"perDeviceBatchSize": 2, "batchSize": 8}
    return spec


def _set(spec: dict, path: str, value) -> dict:
    spec = json.loads(json.dumps(spec))
    *parents, last = path.split(".")
    node = spec
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[last] = value
    return spec


@pytest.mark.parametrize("path", list(FIELD_VALUES))
def test_field_checks_and_their_cel_twins_give_the_same_answer(kube, namespace, path):
    disagree, answers = [], set()
    for value in FIELD_VALUES[path]:
        spec = _set(_valid_spec(), path, value)
        try:
            parse_spec(spec, cluster=True)
            local = True
        except SpecError:
            local = False
        answers.add(local)
        obj = {"apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
               "metadata": {"name": "values", "namespace": namespace}, "spec": spec}
        admitted, message, _ = dry_run_create(kube, namespace, json.dumps(obj))
        if admitted != local:
            disagree.append(f"{value!r}: validate {'accepts' if local else 'refuses'}, apiserver "
                            f"{'admits' if admitted else 'refuses: ' + message}")
    assert not disagree, "\n".join(disagree)
    assert answers == {True, False}, "each field needs values on both sides of its check"

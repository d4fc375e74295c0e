"""The valid side of the corpus (tests/corpus/README.md, `valid/`): every spec that `wrpo spec validate
--cluster` must accept (tests/unit/test_corpus.py) is admitted by the real apiserver with the generated CRD
too, and read back it means what validate read. Wrong specs are in tests/cluster/test_spec_corpus.py, whose
fixtures and dry-run create this file shares."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from corpus import as_fusionrun, valid_cases  # noqa: E402
from test_spec_corpus import _set, _valid_spec, dry_run_create, kube, namespace  # noqa: E402, F401  (fixtures)

from wrpo.errors import SpecError  # noqa: E402
from wrpo.pipeline.spec import load_spec, parse_spec  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("case", valid_cases(), ids=lambda c: c.name)
def test_the_apiserver_admits_what_validate_admits(kube, namespace, case):  # noqa: F811
    spec = load_spec(case.path, cluster=True)
    admitted, message, obj = dry_run_create(kube, namespace, as_fusionrun(case.path.read_text(), "corpus", namespace))
    assert admitted, f"{case.name}: {message}"
    assert parse_spec(obj["spec"], cluster=True) == spec


#: Values on both sides of the checks this side of the corpus added (S3 bucket names, image references, Secret
#: keys and names, vLLM flags, tolerations, seeds, int32 bounds): validate and the CRD's CEL twin (or bound) give
#: the same answer for every one, as tests/cluster/test_spec_corpus.py checks for the older field checks.
NEW_FIELD_VALUES = {
    "storage.runUri": [
        "s3://abc/x",
        "s3://a.b-c/x",
        "s3://ab/x",
        "s3://" + "a" * 63 + "/x",
        "s3://" + "a" * 64 + "/x",
        "s3://10.0.0.1/x",
        "s3://a..b/x",
        "s3://xn--ab/x",
        "s3://sthree-a/x",
        "s3://ab-s3alias/x",
        "s3://ab--ol-s3/x",
        "s3://a_b/x",
        "s3://abc-/x",
    ],
    "cluster.vllmImage": [
        "ghcr.io/wrpo/wrpo-vllm:0.1.0",
        "localhost:5000/a/b",
        "a@sha256:" + "f" * 64,
        "a:b_c.d-e",
        "ghcr.io/WRPO/x",
        "x:1 ",
        "x:tag/cpu",
        "x@sha256:1",
    ],
    "cluster.env": [
        [{"name": "A", "secretKeyRef": {"name": n, "key": k}}]
        for n, k in (
            ("a.b", "k"),
            ("a", ".k"),
            ("a", "a.b-c_D"),
            ("a", ".."),
            ("a", "..k"),
            ("a", "."),
            ("A", "k"),
            ("a", "k/x"),
        )
    ],
    "target.vllmArgs": [
        ["--enable-prefix-caching"],
        ["--hostname"],
        ["--seed-x"],
        ["--port"],
        ["--port=1"],
        ["-tp", "2"],
        ["--served_model_name", "x"],
        ["--seed=8"],
    ],
    "cluster.tolerations": [
        [t]
        for t in (
            {"operator": "Exists"},
            {"key": "k", "value": "v"},
            {"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5},
            {},
            {"key": "k", "operator": "Exists", "value": "v"},
            {"key": "k", "operator": "Exists", "tolerationSeconds": 5},
            {"value": "v"},
            {"key": "k k", "operator": "Exists"},
        )
    ],
    "training.seed": [0, 4294967295, -1, 4294967296],
    "cluster.backoffLimit": [0, 2147483647, 2147483648],
    "cluster.schedulingPolicy": [{"minAvailable": 1}, {"minAvailable": 2}],
    "cluster.training.procsPerNode": [1, 2, 3],  # gpus 2 (the valid spec of test_spec_corpus)
}


@pytest.mark.parametrize("path", list(NEW_FIELD_VALUES))
def test_new_checks_and_their_cel_twins_give_the_same_answer(kube, namespace, path):  # noqa: F811
    disagree, answers = [], set()
    for value in NEW_FIELD_VALUES[path]:
        spec = _set(_valid_spec(), path, value)
        try:
            parse_spec(spec, cluster=True)
            local = True
        except SpecError:
            local = False
        answers.add(local)
        obj = {
            "apiVersion": "fusion.wrpo.io/v1alpha1",
            "kind": "FusionRun",
            "metadata": {"name": "values", "namespace": namespace},
            "spec": spec,
        }
        admitted, message, _ = dry_run_create(kube, namespace, json.dumps(obj))
        if admitted != local:
            disagree.append(
                f"{value!r}: validate {'accepts' if local else 'refuses'}, apiserver "
                f"{'admits' if admitted else 'refuses: ' + message}"
            )
    assert not disagree, "\n".join(disagree)
    assert answers == {True, False}, "each field needs values on both sides of its check"

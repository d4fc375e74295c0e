"""The valid side of the corpus (tests/corpus/README.md, `valid/`): every spec that `wrpo spec validate
--cluster` must accept (tests/unit/test_corpus.py) is admitted by the real apiserver with the generated CRD
too, and read back it means what validate read. Wrong specs are in tests/cluster/test_spec_corpus.py, whose
fixtures and dry-run create this file shares."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from corpus import as_fusionrun, valid_cases  # noqa: E402
from test_spec_corpus import dry_run_create, kube, namespace  # noqa: E402, F401  (module fixtures)

from wrpo.pipeline.spec import load_spec, parse_spec  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("case", valid_cases(), ids=lambda c: c.name)
def test_the_apiserver_admits_what_validate_admits(kube, namespace, case):  # noqa: F811
    spec = load_spec(case.path, cluster=True)
    admitted, message, obj = dry_run_create(kube, namespace, as_fusionrun(case.path.read_text(), "corpus", namespace))
    assert admitted, f"{case.name}: {message}"
    assert parse_spec(obj["spec"], cluster=True) == spec

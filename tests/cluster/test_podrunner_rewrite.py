"""The pod runner's address rewriting, without a cluster."""

from __future__ import annotations

import pytest
from k8s_podrunner import PodRunner


@pytest.fixture
def runner(tmp_path):
    from kubernetes import client

    r = PodRunner(client.ApiClient(), "ns1", tmp_path)
    r._targets = {"model": "127.0.0.12:8000", "judge.other": "127.0.0.1:9000", "s3": "127.0.0.1"}
    return r


@pytest.mark.parametrize(("value", "expected"), [
    ("http://model/v1", "http://127.0.0.12:8000/v1"),
    ("http://model:80/v1", "http://127.0.0.12:8000/v1"),
    ("http://model.ns1.svc.cluster.local:80", "http://127.0.0.12:8000"),
    ("http://model.ns1.svc:80/v1/completions", "http://127.0.0.12:8000/v1/completions"),
    ("http://model.elsewhere:80/v1", "http://model.elsewhere:80/v1"),  # another namespace's
    ("http://models:80", "http://models:80"),  # another name
    ("http://judge.other.svc.cluster.local:8080/x", "http://127.0.0.1:9000/x"),
    ("http://judge:8080", "http://judge:8080"),  # judge is mapped in namespace other only
    ("http://s3:8333", "http://127.0.0.1:8333"),  # host-only target keeps the port
    ("--host=0.0.0.0", "--host=127.0.0.7"),
    ("model", "127.0.0.12"),  # MASTER_ADDR-style bare host names
    ("model.ns1.svc.cluster.local", "127.0.0.12"),
    ("model-x", "model-x"),
    ("a model", "a model"),
    ("a=http://model:80,b=http://s3:1", "a=http://127.0.0.12:8000,b=http://127.0.0.1:1"),
])
def test_rewrite(runner, value, expected):
    assert runner._rewrite(value, "127.0.0.7") == expected

"""The kopf layer only translates: waiting → TemporaryError(delay), bad spec → status + PermanentError."""

from __future__ import annotations

import kopf
import pytest
from test_operator_reconcile import NAME, FakeKube, tiny_spec

from wrpo_operator import handlers
from wrpo_operator.reconcile import Settings


@pytest.fixture
def kube(monkeypatch):
    fake = FakeKube()
    monkeypatch.setitem(handlers.STATE, "kube", fake)
    monkeypatch.setitem(handlers.STATE, "settings", Settings(poll=7, training_poll=7, server_poll=7, short=1))
    return fake


def test_a_running_stage_is_a_temporary_error_with_the_poll_delay(kube):
    kube.add_run(tiny_spec())
    with pytest.raises(kopf.TemporaryError) as e:
        handlers.run_once(kube.run)
    assert e.value.delay == 7 and "prepare" in str(e.value)
    handlers.run_once(kube.run, raise_waiting=False)  # the drift timer never raises for waiting


def test_a_spec_the_cluster_cannot_run_is_permanent_and_visible(kube):
    kube.add_run(tiny_spec(storage={}))
    with pytest.raises(kopf.PermanentError, match="storage.runUri"):
        handlers.run_once(kube.run)
    status = kube.objects[("FusionRun", NAME)]["status"]
    assert status["phase"] == "Failed" and "storage.runUri" in status["message"]
    assert kube.events[-1][:2] == ("Warning", "InvalidSpec")
    with pytest.raises(kopf.PermanentError):
        handlers.run_once(kube.run)
    assert len(kube.events) == 1  # no repeated Event for the same problem

"""Two operator replicas act once (docs/operator.md, "Replicas"): both watch, only the holder of the Lease
writes; when the leader dies the other takes over and the run finishes without a stage run twice. The
leader is killed while the run is at a known point: the score-sources pod is held Running (kwok's
`wrpo.test/hold` fault point) until the kill happened, so the run can neither pass that stage nor finish
first however loaded the machine."""

from __future__ import annotations

import signal

import pytest
from operator_harness import (
    CHART,
    HOLD,
    RELEASE,
    Operator,
    create_run,
    get_run,
    tiny_spec,
    wait,
    wait_events,
    wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def writes(op: Operator) -> float:
    return sum(v for k, v in op.metrics().items() if k.startswith("wrpo_apiserver_requests_total"))


@pytest.fixture
def replicas(run_namespace, helm_install, service_account, tmp_path):
    """The chart (leader election on, as by default) and two operators as its ServiceAccount, with the
    chart's election settings shortened so that a takeover fits a test."""
    helm_install(CHART, RELEASE, run_namespace, wait=True,
                 values={"scope": "namespace", "metrics": {"enabled": False}, "replicaCount": 2})
    identity = service_account(run_namespace, RELEASE, create=False)
    env = {"WRPO_OPERATOR_LEADER_ELECTION": "true", "WRPO_OPERATOR_LEASE_NAMESPACE": run_namespace,
           "WRPO_OPERATOR_LEASE_NAME": RELEASE, "WRPO_OPERATOR_LEASE_SECONDS": "4",
           "WRPO_OPERATOR_RENEW_SECONDS": "3", "WRPO_OPERATOR_RETRY_PERIOD_SECONDS": "1"}
    ops = [Operator(identity, run_namespace, tmp_path / f"operator-{i}.log", {**env, "POD_NAME": f"op-{i}"}).start()
           for i in range(2)]
    yield ops
    for op in ops:
        op.kill(signal.SIGTERM)
        print(f"\noperator log: {op.log}")


def leader(ops: list[Operator]) -> Operator | None:
    leading = [op for op in ops if op.process.poll() is None and op.metrics().get("wrpo_operator_leader") == 1]
    return leading[0] if len(leading) == 1 else None


def held_pod(core, ns: str, stage: str) -> str | None:
    """The name of the run's pod of `stage` that kwok keeps Running under the hold annotation, if there is one."""
    pods = core.list_namespaced_pod(ns, label_selector=f"fusion.wrpo.io/run=ha,fusion.wrpo.io/stage={stage}").items
    held = [p.metadata.name for p in pods if p.status.phase == "Running" and HOLD in (p.metadata.annotations or {})]
    return held[0] if held else None


def stage(custom, ns: str) -> str | None:
    return (get_run(custom, ns, "ha").get("status") or {}).get("stage")


def test_two_replicas_act_once_and_the_follower_takes_over(replicas, apis, run_namespace, k8s_api_client, releaser):
    from kubernetes import client

    custom, _, _, core = apis
    ns = run_namespace
    first = wait(lambda: leader(replicas), 60, "one leader")
    follower = next(op for op in replicas if op is not first)
    # the scoring pods (score-sources first) stay Running until the releaser starts, after the kill
    create_run(custom, ns, "ha", tiny_spec(podAnnotations={"wrpo.test/run-duration": "3s"},
                                           pods={"scoring": {"annotations": {HOLD: "true"}}}))
    wait(lambda: held_pod(core, ns, "score-sources") and stage(custom, ns) == "score-sources", 300,
         "the score-sources pod held Running, status.stage score-sources", first,
         seen=lambda: f"status {get_run(custom, ns, 'ha').get('status')}")
    assert writes(first) > 0 and writes(follower) == 0  # the follower watched, and wrote nothing
    assert follower.metrics().get("wrpo_operator_leader") == 0
    lease = client.CoordinationV1Api(k8s_api_client).read_namespaced_lease(RELEASE, ns)
    assert lease.spec.holder_identity.startswith("op-" + first.log.stem.split("-")[-1])
    first.kill(signal.SIGKILL)  # no release: the follower waits for the Lease to expire
    wait(lambda: follower.metrics().get("wrpo_operator_leader") == 1, 60, "the follower leading", follower)
    assert stage(custom, ns) == "score-sources"  # still held there
    releaser.start()  # the held pods (and every later scoring pod) complete now
    status = wait_phase(custom, ns, "ha", ["Succeeded", "Failed"], 300, follower)
    assert status["phase"] == "Succeeded"
    assert writes(follower) > 0
    for job in custom.list_namespaced_custom_object("batch", "v1", ns, "jobs",
                                                    label_selector="fusion.wrpo.io/run=ha")["items"]:
        pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job['metadata']['name']}").items
        assert len(pods) == 1, job["metadata"]["name"]  # no stage ran twice
    started = [m for _, r, m in wait_events(core, ns, "ha", {"RunSucceeded"}, 30, follower) if r == "StageStarted"]
    assert len(started) == len(set(started))


def test_a_leader_that_stops_cleanly_hands_over_the_lease(replicas, k8s_api_client, run_namespace):
    from kubernetes import client

    first = wait(lambda: leader(replicas), 60, "one leader")
    follower = next(op for op in replicas if op is not first)
    first.kill(signal.SIGTERM)  # releases the Lease on the way out
    wait(lambda: follower.metrics().get("wrpo_operator_leader") == 1, 60, "the follower leading", follower)
    assert "released Lease" in first.log.read_text()
    lease = client.CoordinationV1Api(k8s_api_client).read_namespaced_lease(RELEASE, run_namespace)
    assert lease.spec.holder_identity.startswith("op-" + follower.log.stem.split("-")[-1])

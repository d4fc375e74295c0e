"""The operator against the harness's control plane: the chart's ServiceAccount (RBAC enforced), a
real kopf process, kwok completing stage pods, in a namespace that enforces the `restricted` Pod Security
Standard with OwnerReferencesPermissionEnforcement on. Reports reconciles and API calls of a tiny run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest
from operator_harness import children, create_run, get_run, patch_run, tiny_spec, wait, wait_events, wait_phase

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import GROUP, LABEL_RUN, PLURAL, VERSION

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_tiny_run_walks_the_stages_in_order_and_succeeds(operator, apis, run_namespace):
    custom, batch, apps, core = apis
    create_run(custom, run_namespace, "tiny", tiny_spec())
    t0 = time.monotonic()
    status = wait_phase(custom, run_namespace, "tiny", ["Succeeded", "Failed"], 600, operator)
    elapsed = time.monotonic() - t0
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}" and status["outputUri"] == "s3://wrpo/runs/tiny/wrpo/model/"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Ready"] == "True" and conds["Succeeded"] == "True" and conds["Progressing"] == "False"
    kids = children(apis, run_namespace, "tiny")
    # a Job per stage but the two training stages (PyTorchJobs), and one per source unit of sample-sources
    units = len(tiny_spec()["sources"])
    assert len(kids["Job"]) == len(STAGE_NAMES) - 2 + units and len(kids["PyTorchJob"]) == 2
    assert len(kids["ConfigMap"]) == 1
    assert kids["Deployment"] == [] and kids["Service"] == []  # GPUs freed after each sampling stage
    # in order: each runner was created after the previous stage completed
    stages = status["stages"]
    created = {j["metadata"]["name"]: j["metadata"]["creation_timestamp"] for j in kids["Job"]}
    created.update({p["metadata"]["name"]: p["metadata"]["creationTimestamp"] for p in kids["PyTorchJob"]})
    for prev, cur in zip(stages, stages[1:], strict=False):
        assert str(created[f"tiny-{cur['name']}"]).replace(" ", "T")[:19] >= prev["completionTime"][:19]
    reasons = [r for _, r, _ in wait_events(core, run_namespace, "tiny", {"RunSucceeded"}, 120, operator)]
    assert reasons.count("StageStarted") == reasons.count("StageSucceeded") == len(STAGE_NAMES)
    assert "RunSucceeded" in reasons
    m = operator.metrics()
    calls = {k: v for k, v in m.items() if k.startswith("wrpo_apiserver_requests_total")}
    report = {
        "seconds": round(elapsed, 1),
        "reconciles": m.get('wrpo_reconciles_total{result="ok"}'),
        "reconciler_api_calls": sum(calls.values()),
        "by_verb": {re.sub(r'.*kind="(\w+)",verb="([\w/]+)".*', r"\2 \1", k): v for k, v in calls.items()},
        "kopf_patches": operator.kopf_patches(),
    }
    print("\nTINY RUN:", json.dumps(report, sort_keys=True))
    (Path(os.environ.get("WRPO_REPORT_DIR", operator.log.parent)) / "tiny-run-calls.json").write_text(
        json.dumps(report, indent=1))


def test_failed_stage_is_retried_then_fails_the_run(operator, apis, run_namespace):
    custom, batch, apps, core = apis
    create_run(custom, run_namespace, "bad",
               tiny_spec(backoffLimit=1, podAnnotations={"wrpo.test/fail": "true"}))
    status = wait_phase(custom, run_namespace, "bad", "Failed", 180, operator)
    assert status["stage"] == "prepare" and "BackoffLimitExceeded" in status["message"]
    assert status["stages"][0]["retries"] == 2  # the first pod and one retry
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "Failed"
    evs = wait_events(core, run_namespace, "bad", {"StageFailed", "RunFailed"}, 120, operator)
    assert ("Warning", "StageFailed") in [(t, r) for t, r, _ in evs]
    assert ("Warning", "RunFailed") in [(t, r) for t, r, _ in evs]
    pods = core.list_namespaced_pod(run_namespace, label_selector="fusion.wrpo.io/stage=prepare").items
    assert len(pods) == 2 and all(p.status.phase == "Failed" for p in pods)


def test_operator_restart_mid_run_finishes_without_duplicates(operator, apis, run_namespace):
    custom, batch, apps, core = apis
    create_run(custom, run_namespace, "restart", tiny_spec(podAnnotations={"wrpo.test/run-duration": "3s"}))
    def at_scoring():
        return (get_run(custom, run_namespace, "restart").get("status") or {}).get("stage") == "score-sources"

    wait(at_scoring, 180, "stage score-sources", operator)
    operator.kill()  # SIGKILL, mid-stage

    def unfinished_jobs() -> list[str]:
        jobs = batch.list_namespaced_job(run_namespace, label_selector=f"{LABEL_RUN}=restart").items
        return [j.metadata.name for j in jobs
                if not any(c.type in ("Complete", "Failed") and c.status == "True" for c in j.status.conditions or [])]

    # the running Jobs finish while nobody watches (waited for, not slept on: a loaded machine may take longer)
    wait(lambda: not unfinished_jobs(), 300, "the run's Jobs finished with the operator down",
         seen=lambda: f"unfinished Jobs {unfinished_jobs()}")
    operator.start()
    status = wait_phase(custom, run_namespace, "restart", ["Succeeded", "Failed"], 600, operator)
    assert status["phase"] == "Succeeded"
    kids = children(apis, run_namespace, "restart")
    assert len(kids["Job"]) == len(STAGE_NAMES) - 2 + len(tiny_spec()["sources"]) and len(kids["PyTorchJob"]) == 2
    for job in kids["Job"]:
        pods = core.list_namespaced_pod(run_namespace, label_selector=f"job-name={job['metadata']['name']}")
        assert len(pods.items) == 1, job["metadata"]["name"]  # no stage ran twice
    assert [st["state"] for st in status["stages"]] == ["Succeeded"] * len(STAGE_NAMES)
    # Events are best effort: those of the reconcile in flight at the SIGKILL may be lost, but no stage
    # may be reported started twice.
    started = [m for _, r, m in wait_events(core, run_namespace, "restart", {"RunSucceeded"}, 120, operator)
               if r == "StageStarted"]
    assert len(started) == len(set(started)) and len(started) >= 8, started


def test_suspend_removes_active_children_and_resume_continues(operator, apis, run_namespace):
    custom, batch, apps, core = apis
    create_run(custom, run_namespace, "pause", tiny_spec(podAnnotations={"wrpo.test/run-duration": "2s"}))
    wait(lambda: children(apis, run_namespace, "pause")["Deployment"], 120, "vLLM Deployments", operator)
    prepare_uid = batch.read_namespaced_job("pause-prepare", run_namespace).metadata.uid
    patch_run(custom, run_namespace, "pause", {"spec": {"suspend": True}})
    status = wait_phase(custom, run_namespace, "pause", "Suspended", 180, operator)
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Suspended"] == "True"

    def quiet():
        kids = children(apis, run_namespace, "pause")
        jobs = [j["metadata"]["name"] for j in kids["Job"]]
        return not kids["Deployment"] and not kids["Service"] and jobs == ["pause-prepare"]

    wait(quiet, 180, "active children removed", operator)
    resumed = patch_run(custom, run_namespace, "pause", {"spec": {"suspend": False}})
    status = wait_phase(custom, run_namespace, "pause", ["Succeeded", "Failed"], 600, operator,
                        resumed["metadata"]["generation"])
    assert status["phase"] == "Succeeded"
    assert batch.read_namespaced_job("pause-prepare", run_namespace).metadata.uid == prepare_uid  # not re-run
    reasons = [r for _, r, _ in wait_events(core, run_namespace, "pause", {"Suspended", "Resumed", "RunSucceeded"},
                                            30, operator)]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_deleting_the_run_removes_every_child(operator, apis, run_namespace):
    custom, batch, apps, core = apis
    create_run(custom, run_namespace, "gone", tiny_spec(podAnnotations={"wrpo.test/run-duration": "3s"}))
    wait(lambda: children(apis, run_namespace, "gone")["Deployment"], 120, "vLLM Deployments", operator)
    custom.delete_namespaced_custom_object(GROUP, VERSION, run_namespace, PLURAL, "gone",
                                           body={"propagationPolicy": "Background"})

    def all_gone():
        with contextlib.suppress(Exception):
            get_run(custom, run_namespace, "gone")
            return False
        kids = children(apis, run_namespace, "gone")
        pods = core.list_namespaced_pod(run_namespace, label_selector=f"{LABEL_RUN}=gone").items
        return not any(kids.values()) and not pods

    wait(all_gone, 120, "FusionRun and all its children gone", operator)


def test_stage_names_cover_the_plan():
    assert len(STAGE_NAMES) == 11

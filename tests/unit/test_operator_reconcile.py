"""reconcile() against an in-memory stand-in for the apiserver: the stage walk, idempotency, restart,
failure, retry, suspend/resume, spec changes, adoption and TTL."""

from __future__ import annotations

import copy
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from wrpo.errors import SpecError
from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import LABEL_RUN
from wrpo_operator.reconcile import Settings, reconcile

NS, NAME, UID = "team-a", "demo", "uid-1"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def tiny_spec(**over):
    spec = {
        "target": {"model": "s3://b/models/target"},
        "sources": [{"name": "llama", "model": "s3://b/models/llama"},
                    {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "m"}}],
        "dataset": {"uri": "s3://b/prompts.jsonl"},
        "storage": {"runUri": "s3://b/runs/demo"},
        "cluster": {"training": {"gpus": 1}},
    }
    spec.update(over)
    return spec


class FakeKube:
    """Just enough apiserver: objects by (kind, name), label-selector lists, merge patches, counts."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: Counter = Counter()
        self.events: list[tuple[str, str, str]] = []
        self.created: Counter = Counter()  # (kind, name) → successful creations

    def add_run(self, spec, **meta):
        self.objects[("FusionRun", NAME)] = {
            "apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
            "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 1, **meta}, "spec": spec}

    @property
    def run(self):
        return copy.deepcopy(self.objects[("FusionRun", NAME)])

    def list(self, kind, namespace, selector):
        self.calls[("list", kind)] += 1
        wanted = dict(term.split("=") for term in selector.split(","))
        return [copy.deepcopy(o) for (kk, _), o in sorted(self.objects.items())
                if kk == kind and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]

    def get(self, kind, namespace, name):
        self.calls[("get", kind)] += 1
        return copy.deepcopy(self.objects.get((kind, name)))

    def create(self, obj, dry_run=False):
        self.calls[("create", obj["kind"])] += 1
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return None
        self.objects[key] = copy.deepcopy(obj)
        self.created[key] += 1
        return obj

    def merge_patch(self, kind, namespace, name, patch, sub=None):
        self.calls[("patch" + (f"/{sub}" if sub else ""), kind)] += 1
        target = self.objects[(kind, name)]

        def merge(dst, src):
            for k, v in src.items():
                if v is None:
                    dst.pop(k, None)
                elif isinstance(v, dict) and isinstance(dst.get(k), dict):
                    merge(dst[k], v)
                else:
                    dst[k] = copy.deepcopy(v)

        merge(target, patch)
        return target

    def delete(self, kind, namespace, name):
        self.calls[("delete", kind)] += 1
        return self.objects.pop((kind, name), None) is not None

    def event(self, involved, etype, reason, message, now):
        self.calls[("create", "Event")] += 1
        self.events.append((etype, reason, message))

    # -- what the Job/Deployment controllers would do ------------------------------------------
    def kinds(self, kind):
        return sorted(n for k, n in self.objects if k == kind)

    def finish(self, kind, name, ok=True, failed=0):
        obj = self.objects[(kind, name)]
        ctype = ("Complete" if kind == "Job" else "Succeeded") if ok else "Failed"
        obj["status"] = {"conditions": [{"type": ctype, "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}
        if kind == "Job":
            obj["status"]["failed"] = failed

    def make_available(self):
        for name in self.kinds("Deployment"):
            self.objects[("Deployment", name)]["status"] = {"availableReplicas": 1}


FAST = Settings(poll=1, training_poll=1, server_poll=1, short=1)


def step(kube, minutes=1, _clock=[T0]):  # noqa: B006 - a shared test clock
    _clock[0] += timedelta(minutes=minutes)
    return reconcile(kube.run, kube, now=_clock[0], settings=FAST)

def kube_in_sampling() -> FakeKube:
    """A tiny run advanced past prepare, with its vLLM servers available and the sampling Job created."""
    kube = FakeKube()
    kube.add_run(tiny_spec())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.make_available()
    step(kube)
    return kube



def runner_of(kube, stage):
    for kind in ("Job", "PyTorchJob"):
        if (kind, f"{NAME}-{stage}") in kube.objects:
            return kind, f"{NAME}-{stage}"
    raise AssertionError(f"no runner for {stage}: {sorted(kube.objects)}")


def walk(kube):
    """Drive the run to the end, completing each runner; returns the reconciles it took."""
    reconciles = 0
    for stage in STAGE_NAMES:
        d = step(kube)
        reconciles += 1
        if kube.kinds("Deployment") and ("Job", f"{NAME}-{stage}") not in kube.objects:
            assert kube.run["status"]["stages"][STAGE_NAMES.index(stage)]["state"] == "Waiting"
            kube.make_available()
            d = step(kube)
            reconciles += 1
        assert d.requeue is not None
        kube.finish(*runner_of(kube, stage))
    step(kube)
    return reconciles + 1


def test_a_run_walks_every_stage_in_order_and_succeeds():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    reconciles = walk(kube)
    status = kube.run["status"]
    all_stages = f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}"
    assert status["phase"] == "Succeeded" and status["progress"] == all_stages and status.get("stage") is None
    assert status["outputUri"] == "s3://b/runs/demo/wrpo/model/"
    assert [s["state"] for s in status["stages"]] == ["Succeeded"] * len(STAGE_NAMES)
    assert all(s["outputUri"] == f"s3://b/runs/demo/{s['name']}/" for s in status["stages"])
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {"Ready": "True", "Progressing": "False", "Succeeded": "True", "Failed": "False",
                     "Suspended": "False"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    # GPUs are freed as soon as a sampling stage commits; finished Jobs stay for their logs.
    assert kube.kinds("Deployment") == [] and kube.kinds("Service") == []
    assert len(kube.kinds("Job")) == 9 and kube.kinds("PyTorchJob") == ["demo-sft", "demo-wrpo"]
    for obj in kube.objects.values():
        if obj["kind"] != "FusionRun":
            assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
            assert obj["metadata"]["labels"][LABEL_RUN] == NAME
    reasons = [r for _, r, _ in kube.events]
    assert reasons.count("StageSucceeded") == len(STAGE_NAMES) and reasons[-1] == "RunSucceeded"
    assert reconciles == 14  # one per stage, one more for each of the two vLLM waits, one to finish
    # every creation happened exactly once
    # CM, Deployment + Service for llama and for the SFT target, a runner per stage (no eval prompts: no
    # eval servers)
    assert set(kube.created.values()) == {1} and len(kube.created) == 1 + 2 + 2 + len(STAGE_NAMES)


def test_reconcile_is_idempotent_and_quiet_when_nothing_changed():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    step(kube)
    before = dict(kube.objects)
    kube.calls.clear()
    step(kube, minutes=0)
    assert kube.objects.keys() == before.keys()
    assert {verb for verb, _ in kube.calls} == {"list"}  # five lists, no writes


def test_operator_restart_continues_without_rerunning_or_duplicating():
    kube = kube_in_sampling()
    # "restart": a fresh reconcile sees only what the apiserver holds (status + children)
    created = sum(n for (verb, kind), n in kube.calls.items() if verb == "create" and kind != "Event")
    kube.calls.clear()
    step(kube)
    assert not [k for k in kube.calls if k[0] == "create" and k[1] != "Event"]
    assert kube.run["status"]["stages"][0]["state"] == "Succeeded"
    assert created == 5  # ConfigMap, prepare Job, Deployment + Service of llama, sampling Job


def test_a_failed_stage_fails_the_run_with_reason_event_and_frees_gpus():
    kube = kube_in_sampling()
    kube.finish("Job", "demo-sample-sources", ok=False, failed=3)
    d = step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and status["stage"] == "sample-sources"
    assert "BackoffLimitExceeded" in status["message"] and d.requeue is None
    st = status["stages"][1]
    assert st["state"] == "Failed" and st["retries"] == 3
    assert ("Warning", "StageFailed") in [(t, r) for t, r, _ in kube.events]
    assert ("Warning", "RunFailed") in [(t, r) for t, r, _ in kube.events]
    assert kube.kinds("Deployment") == []  # GPUs freed
    assert "demo-sample-sources" in kube.kinds("Job")  # kept for its logs
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Ready"]["status"] == "False"
    # a spec edit retries the failed stage
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["sampling"] = {"concurrency": 4}
    run["metadata"]["generation"] = 2
    step(kube)
    assert "demo-sample-sources" not in kube.kinds("Job")
    step(kube)
    assert kube.run["status"]["phase"] == "Running" and kube.kinds("Deployment") == ["demo-src-llama"]


def test_suspend_removes_active_children_and_resume_continues():
    kube = kube_in_sampling()
    assert "demo-sample-sources" in kube.kinds("Job")
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["suspend"] = True
    run["metadata"]["generation"] = 2
    d = step(kube)
    assert kube.run["status"]["phase"] == "Suspended" and d.requeue is None
    assert kube.kinds("Deployment") == [] and kube.kinds("Job") == ["demo-prepare"]
    conds = {c["type"]: c["status"] for c in kube.run["status"]["conditions"]}
    assert conds["Suspended"] == "True" and conds["Progressing"] == "False"
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["suspend"] = False
    run["metadata"]["generation"] = 3
    step(kube)
    assert kube.run["status"]["phase"] == "Running"
    assert kube.run["status"]["stages"][0]["state"] == "Succeeded"  # prepare is not re-run
    assert kube.kinds("Deployment") == ["demo-src-llama"]
    assert ("Normal", "Resumed") in [(t, r) for t, r, _ in kube.events]


def test_a_spec_change_reruns_only_the_stages_that_depend_on_it():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    walk(kube)
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["wrpo"] = {"beta": 0.05}
    run["metadata"]["generation"] = 2
    step(kube)
    states = {s["name"]: s["state"] for s in kube.run["status"]["stages"]}
    assert [n for n, s in states.items() if s != "Succeeded"] == ["ref-logps", "wrpo", "eval"]
    assert kube.run["status"]["phase"] == "Running" and kube.run["status"]["stage"] == "ref-logps"
    # the old ref-logps Job (older hash) is replaced, not reused
    assert "demo-ref-logps" not in kube.kinds("Job")
    step(kube)
    assert "demo-ref-logps" in kube.kinds("Job")


def test_children_that_lost_their_owner_reference_are_adopted():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    step(kube)
    kube.objects[("Job", "demo-prepare")]["metadata"]["ownerReferences"] = []
    step(kube, minutes=0)
    assert kube.objects[("Job", "demo-prepare")]["metadata"]["ownerReferences"][0]["uid"] == UID


def test_ttl_after_finish_deletes_the_run():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"ttlSecondsAfterFinished": 600}))
    walk(kube)
    d = step(kube, minutes=5)
    assert not d.delete_run and 0 < d.requeue <= 600
    step(kube, minutes=6)
    assert ("FusionRun", NAME) not in kube.objects


def test_stage_deadline_fails_the_run():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"activeDeadlineSeconds": 600}))
    step(kube)
    step(kube, minutes=11)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and "DeadlineExceeded" in status["message"]


@pytest.mark.parametrize("storage,match", [({}, "storage.runUri")])
def test_specs_the_cluster_cannot_run_are_rejected(storage, match):
    kube = FakeKube()
    kube.add_run(tiny_spec(storage=storage))
    with pytest.raises(SpecError, match=match):
        step(kube)


def test_invalid_specs_name_the_field():
    kube = FakeKube()
    kube.add_run(tiny_spec(wrpo={"alpha": 2}))
    with pytest.raises(SpecError, match="wrpo.alpha"):
        step(kube)


def test_pod_annotations_reach_every_stage_pod_and_bad_ones_are_rejected():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"podAnnotations": {"sidecar.istio.io/inject": "false"}}))
    step(kube)
    job = kube.objects[("Job", "demo-prepare")]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    kube.objects[("FusionRun", NAME)]["spec"]["cluster"]["podAnnotations"] = {"a": 1}
    with pytest.raises(SpecError, match="cluster.podAnnotations"):
        step(kube)


def test_a_stage_that_finished_unwatched_still_gets_its_started_event():
    from wrpo_operator.status import transitions

    old = {"phase": "Running", "stages": [{"name": "prepare", "state": "Waiting"}]}
    new = {"phase": "Running", "stages": [{"name": "prepare", "state": "Succeeded", "outputUri": "s3://b/r/prepare/"}]}
    reasons = [r for _, r, _ in transitions(old, new)]
    assert reasons == ["StageStarted", "StageSucceeded"]
    again = transitions(new, new)
    assert again == []


def _eval_pod(message: str, code: int = 0, stage_hash: str = "") -> dict:
    labels = {LABEL_RUN: NAME, "fusion.wrpo.io/stage": "eval", "fusion.wrpo.io/stage-hash": stage_hash}
    return {"kind": "Pod", "metadata": {"name": f"{NAME}-eval-x{code}", "namespace": NS, "labels": labels},
            "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": code, "message": message}}}]}}


def test_the_eval_summary_comes_from_the_eval_pods_termination_message():
    import json

    from wrpo_operator.status import eval_summary

    kube = FakeKube()
    kube.add_run(tiny_spec())
    for stage in STAGE_NAMES[:-1]:  # every stage before eval
        step(kube)
        if kube.kinds("Deployment") and ("Job", f"{NAME}-{stage}") not in kube.objects:
            kube.make_available()
            step(kube)
        kube.finish(*runner_of(kube, stage))
    step(kube)
    eval_hash = next(s["hash"] for s in kube.run["status"]["stages"] if s["name"] == "eval")
    line = json.dumps({"stage": "eval", "status": "done",
                       "summary": {"prompts": 8, "fused_vs_target": 62.5, "fused_vs_sft": 55.0,
                                   "lc_fused_vs_target": 58.1, "sft_vs_target": 51.0}})
    kube.objects[("Pod", "a-old")] = _eval_pod(line.replace("62.5", "10.0"), 0, "0" * 16)  # an older hash
    kube.objects[("Pod", "failed")] = _eval_pod("Traceback ...", 1, eval_hash)
    kube.objects[("Pod", "ok")] = _eval_pod(line, 0, eval_hash)
    kube.finish(*runner_of(kube, "eval"))
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Succeeded"
    assert status["eval"] == {"prompts": 8, "fusedVsTarget": 62.5, "fusedVsSft": 55.0, "lcFusedVsTarget": 58.1,
                              "hash": eval_hash}
    kube.calls.clear()
    step(kube, minutes=0)  # known for this hash: not read again, status unchanged
    assert ("list", "Pod") not in kube.calls and ("patch/status", "FusionRun") not in kube.calls
    # messages that are not a summary give no summary (never a guess)
    assert eval_summary([_eval_pod("not json", 0), _eval_pod(line, 137)], "h") is None

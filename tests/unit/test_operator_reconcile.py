"""reconcile() against an in-memory stand-in for the apiserver (a mock: the cluster tests run the same paths
against the real one): the stage walk, idempotency, restart, failure, retry, suspend/resume, spec changes,
stalls, refused creations, adoption, owner UIDs, Kueue, checkpoints and TTL."""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from wrpo.errors import SpecError
from wrpo.pipeline.plan import STAGE_NAMES
from wrpo_operator import LABEL_RUN, LABEL_RUN_UID, LABEL_STAGE, LABEL_STAGE_HASH, LABEL_TEMPLATE_HASH, QUEUE_LABEL
from wrpo_operator.cache import Cache
from wrpo_operator.decide import Settings
from wrpo_operator.kube import ApiError
from wrpo_operator.reconcile import reconcile

NS, NAME, UID = "team-a", "demo", "uid-1"
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def tiny_spec(**over):
    spec = {
        "target": {"model": "s3://bkt/models/target"},
        "sources": [{"name": "llama", "model": "s3://bkt/models/llama"},
                    {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "m"}}],
        "dataset": {"uri": "s3://bkt/prompts.jsonl"},
        "storage": {"runUri": "s3://bkt/runs/demo"},
        "cluster": {"training": {"gpus": 1}},
    }
    spec.update(over)
    return spec


class FakeKube:
    """Just enough apiserver: objects by (kind, name) with UIDs and resourceVersions, merge patches, counted
    calls; `observed()` is what the operator's watch cache would hold."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: Counter = Counter()
        self.events: list[tuple[str, str, str]] = []
        self.created: Counter = Counter()  # (kind, name) → successful creations
        self.refuse: dict[tuple[str, str], ApiError] = {}  # creations the "apiserver" rejects
        self.refuse_dry: dict[tuple[str, str], ApiError] = {}  # dry-run creations it rejects (admission.py)
        self.serves: set[str] = {"PyTorchJob"}  # the training kinds its discovery lists (Kube.served)
        self._rv = itertools.count(1)
        self._uid = itertools.count(1)

    def add_run(self, spec, uid=UID, **meta):
        self.objects[("FusionRun", NAME)] = {
            "apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun",
            "metadata": {"name": NAME, "namespace": NS, "uid": uid, "generation": 1, **meta}, "spec": spec}

    def served(self, kind):
        self.calls[("discover", kind)] += 1
        return kind in self.serves

    @property
    def run(self):
        return copy.deepcopy(self.objects[("FusionRun", NAME)])

    def observed(self):
        cache = Cache()
        for (kind, _), obj in sorted(self.objects.items()):
            if kind != "FusionRun":
                cache.put(copy.deepcopy(obj))
        cache.put_run(self.run)
        return cache.observed(self.run)

    def _stamp(self, obj):
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def get(self, kind, namespace, name):
        self.calls[("get", kind)] += 1
        return copy.deepcopy(self.objects.get((kind, name)))

    def create(self, obj, dry_run=False):
        key = (obj["kind"], obj["metadata"]["name"])
        if dry_run:
            self.calls[("dry-run", obj["kind"])] += 1
            if key in self.refuse_dry:
                raise self.refuse_dry[key]
            return copy.deepcopy(obj)
        self.calls[("create", obj["kind"])] += 1
        if key in self.refuse:
            raise self.refuse[key]
        if key in self.objects:
            return None
        obj = copy.deepcopy(obj)
        obj["metadata"]["uid"] = f"child-{next(self._uid)}"
        self._stamp(obj)
        self.objects[key] = obj
        self.created[key] += 1
        return copy.deepcopy(obj)

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
        self._stamp(target)
        return copy.deepcopy(target)

    def delete(self, kind, namespace, name):
        self.calls[("delete", kind)] += 1
        return self.objects.pop((kind, name), None) is not None

    def event(self, involved, etype, reason, message, now):
        self.calls[("create", "Event")] += 1
        self.events.append((etype, reason, message))

    # -- what the controllers and kubelets would do ------------------------------------------------
    def kinds(self, kind):
        return sorted(n for k, n in self.objects if k == kind)

    def finish(self, kind, name, ok=True, failed=0):
        obj = self.objects[(kind, name)]
        ctype = ("Complete" if kind == "Job" else "Succeeded") if ok else "Failed"
        obj["status"] = {"conditions": [{"type": ctype, "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}
        if kind == "Job":
            obj["status"]["failed"] = failed
        self._stamp(obj)

    def make_available(self):
        for name in self.kinds("Deployment"):
            self.objects[("Deployment", name)]["status"] = {"availableReplicas": 1}

    def add_pod(self, owner_name, name, status, uid=UID):
        """A pod of child `owner_name` (its template's labels), with the given status."""
        owner = next(o for (k, n), o in self.objects.items() if n == owner_name and k != "Service")
        template = (owner["spec"]["pytorchReplicaSpecs"]["Master"]["template"] if owner["kind"] == "PyTorchJob"
                    else owner["spec"]["template"])
        pod = {"kind": "Pod", "metadata": {"name": name, "namespace": NS, "uid": f"pod-{name}",
                                           "labels": {**template["metadata"]["labels"], LABEL_RUN_UID: uid}},
               "spec": {}, "status": status}
        self._stamp(pod)
        self.objects[("Pod", name)] = pod
        return pod


def step(kube, minutes=1, _clock=[T0], settings=None):  # noqa: B006 - a shared test clock
    _clock[0] += timedelta(minutes=minutes)
    return reconcile(kube.run, kube.observed(), kube, now=_clock[0], settings=settings or Settings())


def now():
    return step.__defaults__[1][0]


def kube_in_sampling() -> FakeKube:
    """A tiny run advanced past prepare, with its vLLM servers available and the sampling Jobs of both units
    (the endpoint source `api` and the served `llama`) created."""
    kube = FakeKube()
    kube.add_run(tiny_spec())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.make_available()
    step(kube)
    return kube


def runner_of(kube, stage):
    """The stage's runner; for a stage made of units, after every unit's Job succeeded (its commit Job)."""
    if ("Job", f"{NAME}-{stage}") not in kube.objects and unit_jobs(kube, stage):
        kube.make_available()
        step(kube, minutes=0)
        for name in unit_jobs(kube, stage):
            kube.finish("Job", name)
        step(kube, minutes=0)
    for kind in ("Job", "PyTorchJob"):
        if (kind, f"{NAME}-{stage}") in kube.objects:
            return kind, f"{NAME}-{stage}"
    raise AssertionError(f"no runner for {stage}: {sorted(kube.objects)}")


def unit_jobs(kube, stage):
    return [n for k, n in kube.objects if k == "Job" and n.startswith(f"{NAME}-{stage}-")
            and kube.objects[(k, n)]["metadata"]["labels"].get("fusion.wrpo.io/unit")]


def finish_units(kube, stage):
    """A stage made of units: its servers become Available, then every unit's Job succeeds; True if it had
    units (two more reconciles)."""
    if not unit_jobs(kube, stage) and not kube.kinds("Deployment"):
        return False
    if stage != "sample-sources":
        return False
    kube.make_available()
    step(kube)
    for name in unit_jobs(kube, stage):
        kube.finish("Job", name)
    step(kube)
    return True


def walk(kube):
    """Drive the run to the end, completing each runner; returns the reconciles it took."""
    reconciles = 0
    for stage in STAGE_NAMES:
        step(kube)
        reconciles += 1
        if finish_units(kube, stage):
            reconciles += 2
        elif kube.kinds("Deployment") and ("Job", f"{NAME}-{stage}") not in kube.objects:
            assert kube.run["status"]["stages"][STAGE_NAMES.index(stage)]["state"] == "Waiting"
            kube.make_available()
            step(kube)
            reconciles += 1
        assert kube.run["status"].get("outputUri") is None  # no model yet
        kube.finish(*runner_of(kube, stage))
    step(kube)
    return reconciles + 1


def status_of(kube, stage):
    return kube.run["status"]["stages"][STAGE_NAMES.index(stage)]


def test_a_run_walks_every_stage_in_order_and_succeeds():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    reconciles = walk(kube)
    status = kube.run["status"]
    all_stages = f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}"
    assert status["phase"] == "Succeeded" and status["progress"] == all_stages and status.get("stage") is None
    assert status["outputUri"] == "s3://bkt/runs/demo/wrpo/model/"
    assert [s["state"] for s in status["stages"]] == ["Succeeded"] * len(STAGE_NAMES)
    assert all(s["outputUri"] == f"s3://bkt/runs/demo/{s['name']}/" for s in status["stages"])
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {"Ready": "True", "Progressing": "False", "Succeeded": "True", "Failed": "False",
                     "Suspended": "False", "Stalled": "False"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    # GPUs are freed as soon as a sampling stage commits; finished Jobs stay for their logs; the checkpoint
    # PVC goes once the run succeeded.
    assert kube.kinds("Deployment") == [] and kube.kinds("Service") == []
    assert kube.kinds("PersistentVolumeClaim") == []
    assert len(kube.kinds("Job")) == 9 + 2 and kube.kinds("PyTorchJob") == ["demo-sft", "demo-wrpo"]  # + 2 units
    for obj in kube.objects.values():
        if obj["kind"] != "FusionRun":
            assert obj["metadata"]["ownerReferences"][0]["uid"] == UID
            assert obj["metadata"]["labels"][LABEL_RUN] == NAME and obj["metadata"]["labels"][LABEL_RUN_UID] == UID
    reasons = [r for _, r, _ in kube.events]
    assert reasons.count("StageSucceeded") == len(STAGE_NAMES) and reasons[-1] == "RunSucceeded"
    # one per stage, two more for the units of sample-sources (servers ready, units done), one more for the
    # SFT target's vLLM wait, one to finish
    assert reconciles == 15
    # every creation happened exactly once: CM, Deployment + Service for llama and for the SFT target, the
    # checkpoint PVC, a runner per stage (no eval prompts: no eval servers) and a Job per source unit;
    # nothing was ever listed (the watches feed the cache)
    assert set(kube.created.values()) == {1} and len(kube.created) == 1 + 2 + 2 + 1 + len(STAGE_NAMES) + 2
    assert not [c for c in kube.calls if c[0] == "list"]


def test_only_the_current_stage_is_built_and_finished_jobs_stay(monkeypatch):
    """A pass builds the children of the current stage only: a finished stage's Jobs (its units' too) are kept
    for their logs by their labels, not by building the stage again."""
    from wrpo_operator import decide as decide_module

    kube = FakeKube()
    kube.add_run(tiny_spec())
    for stage in STAGE_NAMES[: STAGE_NAMES.index("ref-logps")]:
        step(kube)
        if not finish_units(kube, stage) and kube.kinds("Deployment") and ("Job", f"{NAME}-{stage}") not in \
                kube.objects:
            kube.make_available()
            step(kube)
        kube.finish(*runner_of(kube, stage))
    step(kube)  # build-pairs succeeds, ref-logps starts
    built = []
    real = decide_module.stage_children
    monkeypatch.setattr(decide_module, "stage_children", lambda *a, **kw: built.append(a[3]) or real(*a, **kw))
    step(kube)
    assert built == ["ref-logps"]
    finished = {n for k, n in kube.objects if k in ("Job", "PyTorchJob")}
    assert {f"{NAME}-prepare", f"{NAME}-sft", f"{NAME}-build-pairs"} <= finished
    assert len(unit_jobs(kube, "sample-sources")) == 2  # the units' Jobs stay: their units stay done


def test_reconcile_is_idempotent_and_silent_when_nothing_changed():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    d = step(kube)
    assert d.requeue is None  # a running stage is not polled: its Job's events wake the run
    before = copy.deepcopy(kube.objects)
    kube.calls.clear()
    step(kube, minutes=0)
    assert kube.objects == before and not kube.calls  # not one request


def test_operator_restart_continues_without_rerunning_or_duplicating():
    kube = kube_in_sampling()
    created = sum(n for (verb, kind), n in kube.calls.items() if verb == "create" and kind != "Event")
    kube.calls.clear()
    step(kube)  # a fresh reconcile sees only what the apiserver holds (status + children)
    assert not [k for k in kube.calls if k[0] == "create" and k[1] != "Event"]
    assert status_of(kube, "prepare")["state"] == "Succeeded"
    assert created == 6  # ConfigMap, prepare Job, Deployment + Service of llama, a sampling Job per unit


def test_a_failed_stage_fails_the_run_with_the_pod_termination_reason_and_frees_gpus():
    kube = kube_in_sampling()
    kube.add_pod("demo-sample-sources-llama", "demo-sample-sources-x1", {"phase": "Failed", "containerStatuses": [
        {"name": "stage", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                                   "finishedAt": "2025-01-01T00:05:00Z"}}}]})
    kube.finish("Job", "demo-sample-sources-llama", ok=False, failed=3)
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and status["stage"] == "sample-sources"
    assert "unit llama: BackoffLimitExceeded" in status["message"]
    assert "OOMKilled (exit code 137)" in status["message"]
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Failed"
    assert ("Warning", "StageFailed") in [(t, r) for t, r, _ in kube.events]
    assert ("Warning", "RunFailed") in [(t, r) for t, r, _ in kube.events]
    assert kube.kinds("Deployment") == []  # GPUs freed
    assert "demo-sample-sources-llama" in kube.kinds("Job")  # kept for its logs
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Ready"]["status"] == "False"
    # a spec edit retries the failed stage
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["sampling"] = {"concurrency": 4}
    run["metadata"]["generation"] = 2
    step(kube)
    assert "demo-sample-sources-llama" not in kube.kinds("Job")
    step(kube)
    assert kube.run["status"]["phase"] == "Running" and kube.kinds("Deployment") == ["demo-src-llama"]


def test_suspend_removes_active_children_and_resume_continues():
    kube = kube_in_sampling()
    assert "demo-sample-sources-llama" in kube.kinds("Job")
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
    assert status_of(kube, "prepare")["state"] == "Succeeded"  # prepare is not re-run
    assert kube.kinds("Deployment") == ["demo-src-llama"]
    assert ("Normal", "Resumed") in [(t, r) for t, r, _ in kube.events]


def test_a_spec_change_reruns_only_the_stages_that_depend_on_it_and_outputuri_waits():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    walk(kube)
    assert kube.run["status"]["outputUri"]
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["wrpo"] = {"beta": 0.05}
    run["metadata"]["generation"] = 2
    step(kube)
    status = kube.run["status"]
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert [n for n, s in states.items() if s != "Succeeded"] == ["ref-logps", "wrpo", "eval"]
    assert status["phase"] == "Running" and status["stage"] == "ref-logps"
    assert "outputUri" not in status  # the model of the old spec is not this spec's model
    # the old ref-logps Job (older hash) is replaced, not reused
    assert "demo-ref-logps" not in kube.kinds("Job")
    step(kube)
    assert "demo-ref-logps" in kube.kinds("Job")


def test_spec_configmaps_are_immutable_one_per_spec_and_kept_while_a_running_child_reads_one():
    kube = kube_in_sampling()
    (cm1,) = kube.kinds("ConfigMap")
    assert kube.objects[("ConfigMap", cm1)]["immutable"] is True
    job = kube.objects[("Job", "demo-sample-sources-llama")]
    # a change that leaves the sampling stage alone (the wrpo section) makes a new ConfigMap; the running
    # sampling Job keeps reading the one it was built with
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["wrpo"] = {"beta": 0.05}
    run["metadata"]["generation"] = 2
    step(kube)
    assert kube.objects[("Job", "demo-sample-sources-llama")]["metadata"]["uid"] == job["metadata"]["uid"]
    cms = kube.kinds("ConfigMap")
    assert len(cms) == 2 and cm1 in cms
    kube.finish(*runner_of(kube, "sample-sources"))
    step(kube)
    (cm2,) = kube.kinds("ConfigMap")
    assert cm2 != cm1
    runner = kube.objects[("Job", "demo-score-sources")]
    assert {v["configMap"]["name"] for v in runner["spec"]["template"]["spec"]["volumes"] if "configMap" in v} \
        == {cm2}


def test_a_cluster_change_replaces_the_unfinished_stages_children_only_where_it_applies():
    kube = kube_in_sampling()
    uids = {k: o["metadata"]["uid"] for k, o in kube.objects.items()}
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["cluster"]["vllm"] = {"memory": "40Gi"}  # vLLM pods only
    run["metadata"]["generation"] = 2
    step(kube)
    assert ("Deployment", "demo-src-llama") not in kube.objects  # replaced: deleted now, made again next
    llama = ("Job", "demo-sample-sources-llama")
    assert kube.objects[llama]["metadata"]["uid"] == uids[llama]
    assert kube.objects[("Service", "demo-src-llama")]["metadata"]["uid"] == uids[("Service", "demo-src-llama")]
    assert kube.objects[("Job", "demo-prepare")]["metadata"]["uid"] == uids[("Job", "demo-prepare")]  # done
    step(kube)
    dep = kube.objects[("Deployment", "demo-src-llama")]
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["memory"] == "40Gi"
    # a fix for the stage's own pods (a wrong image of a stuck Job) replaces its runner too
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["cluster"]["runtimeImage"] = "registry.example/wrpo-runtime:fixed"
    run["metadata"]["generation"] = 3
    step(kube)
    assert llama not in kube.objects
    step(kube)  # the runtime image is also the vLLM pods' init container: their Deployment was replaced too
    kube.make_available()
    step(kube)
    job = kube.objects[llama]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/wrpo-runtime:fixed"


def test_a_field_written_at_its_default_replaces_nothing():
    kube = kube_in_sampling()
    before = {k: o["metadata"]["uid"] for k, o in kube.objects.items() if k[0] != "FusionRun"}
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["cluster"].update(stallTimeoutSeconds=1800, scratch={"type": "ephemeral"}, queueName=None)
    run["metadata"]["generation"] = 2
    step(kube)
    after = {k: o["metadata"]["uid"] for k, o in kube.objects.items() if k[0] != "FusionRun"}
    assert after == before


def test_children_are_matched_by_owner_uid_not_by_name():
    """A run re-created with the same name never reads the old run's children (garbage collection has not
    removed them yet): it waits for them to go, then makes its own."""
    kube = kube_in_sampling()
    kube.objects[("FusionRun", NAME)]["metadata"]["uid"] = "uid-2"
    kube.objects[("FusionRun", NAME)].pop("status")
    kube.finish("Job", "demo-prepare")  # the old run's prepare Job succeeded: not ours
    with pytest.raises(ApiError, match="earlier FusionRun demo"):
        step(kube)
    assert "status" not in kube.run and kube.objects[("Job", "demo-prepare")]["metadata"]["ownerReferences"][0][
        "uid"] == UID  # nothing of the old run was touched or adopted
    for key in [k for k, o in kube.objects.items() if k[0] != "FusionRun"]:
        del kube.objects[key]  # garbage collection
    step(kube)
    assert kube.objects[("Job", "demo-prepare")]["metadata"]["ownerReferences"][0]["uid"] == "uid-2"
    assert status_of(kube, "prepare")["state"] == "Running"


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


def test_the_deadline_bounds_the_wait_for_servers():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"activeDeadlineSeconds": 600}, sources=[{"name": "llama", "model": "s3://bkt/m"}]))
    step(kube)
    kube.finish("Job", "demo-prepare")
    d = step(kube)
    assert status_of(kube, "sample-sources")["state"] == "Waiting" and 0 < d.requeue <= 600
    step(kube, minutes=11)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and "DeadlineExceeded" in status["message"]
    assert kube.kinds("Deployment") == []


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
    new = {"phase": "Running", "stages": [{"name": "prepare", "state": "Succeeded", "outputUri": "s3://bkt/r/prepare/"}]}
    reasons = [r for _, r, _ in transitions(old, new)]
    assert reasons == ["StageStarted", "StageSucceeded"]
    assert transitions(new, new) == []


# -- stalls ----------------------------------------------------------------------------------------------

PULL = {"phase": "Pending", "containerStatuses": [{"name": "stage", "state": {"waiting": {
    "reason": "ImagePullBackOff", "message": 'Back-off pulling image "nope:1"'}}}]}
CRASH = {"phase": "Running", "containerStatuses": [{"name": "vllm", "restartCount": 4, "state": {"waiting": {
    "reason": "CrashLoopBackOff", "message": "back-off 40s"}}, "lastState": {"terminated": {
        "reason": "OOMKilled", "exitCode": 137}}}]}
UNSCHEDULABLE = {"phase": "Pending", "conditions": [{
    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}


def stall_settings():
    return tiny_spec(cluster={"training": {"gpus": 1}, "stallTimeoutSeconds": 600})


@pytest.mark.parametrize("owner,pod,reason,text", [
    ("demo-prepare", PULL, "ImagePullBackOff", 'pod demo-prepare-p container stage: ImagePullBackOff: Back-off'),
    ("demo-prepare", UNSCHEDULABLE, "Unschedulable", "pod demo-prepare-p: Unschedulable: 0/3 nodes are available"),
])
def test_a_stalled_pod_shows_once_then_fails_the_stage_after_the_timeout(owner, pod, reason, text):
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.add_pod(owner, f"{owner}-p", pod)
    d = step(kube)
    status = kube.run["status"]
    stall = status_of(kube, "prepare")["stall"]
    assert stall["reason"] == reason and status["phase"] == "Running"
    assert text in status["message"]
    cond = {c["type"]: c for c in status["conditions"]}["Stalled"]
    assert cond["status"] == "True" and cond["reason"] == reason and f"pod {owner}-p" in cond["message"]
    assert d.requeue == 600  # woken for the timeout, not polled
    warnings = [m for t, r, m in kube.events if r == "StageStalled"]
    assert len(warnings) == 1 and text in warnings[0]
    d = step(kube, minutes=5)  # still stalled: no second Event, the clock keeps running
    assert len([r for _, r, _ in kube.events if r == "StageStalled"]) == 1 and d.requeue == 300
    kube.objects[("Job", owner)]["status"] = {"failed": 1}  # the status changes for another reason
    step(kube, minutes=0)
    assert status_of(kube, "prepare")["retries"] == 1
    assert len([r for _, r, _ in kube.events if r == "StageStalled"]) == 1  # the same cause: still one
    step(kube, minutes=6)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and f"Stalled for more than 600s: {text}" in status["message"]
    assert "demo-prepare" not in kube.kinds("Job")  # its pods stop holding nodes
    assert {c["type"]: c["status"] for c in status["conditions"]}["Stalled"] == "False"


def test_a_crash_looping_server_names_the_last_termination_reason():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.add_pod("demo-src-llama", "demo-src-llama-abc", CRASH)
    step(kube)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "CrashLoopBackOff" and stall["subject"] == "pod demo-src-llama-abc container vllm"
    assert "OOMKilled (exit code 137), 4 restarts" in stall["message"]


def test_a_cleared_stall_says_so_and_a_new_cause_gets_its_own_event():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    pod = kube.add_pod("demo-prepare", "demo-prepare-p", PULL)
    step(kube)
    pod["status"] = UNSCHEDULABLE
    step(kube)
    assert [r for _, r, _ in kube.events].count("StageStalled") == 2
    since = status_of(kube, "prepare")["stall"]["since"]
    pod["status"] = {"phase": "Running", "containerStatuses": [{"name": "stage", "state": {"running": {}}}]}
    step(kube)
    assert "stall" not in status_of(kube, "prepare") and since
    assert ("Normal", "StallCleared") in [(t, r) for t, r, _ in kube.events]


def test_deployment_conditions_and_create_failures_are_stalls():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    dep = kube.objects[("Deployment", "demo-src-llama")]
    dep["status"] = {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                     "message": 'ReplicaSet "demo-src-llama-1" has timed out progressing.'}]}
    step(kube)
    assert status_of(kube, "sample-sources")["stall"]["reason"] == "ProgressDeadlineExceeded"
    dep["status"]["conditions"] = [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                    "message": 'pods "x" is forbidden: exceeded quota: gpus'}]
    step(kube)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "QuotaExceeded" and stall["subject"] == "Deployment demo-src-llama"


def test_a_server_held_by_kueue_past_its_progress_deadline_is_queued_not_stalled():
    """The Deployment controller's progress deadline runs while Kueue holds the pods at its gate: a long
    queue is not a stuck server (docs/operator.md, "Kueue")."""
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1}, "stallTimeoutSeconds": 600, "queueName": "team-gpus"}))
    step(kube)
    kube.objects[("Job", "demo-prepare")]["spec"]["suspend"] = False
    kube.finish("Job", "demo-prepare")
    step(kube)
    dep = kube.objects[("Deployment", "demo-src-llama")]
    dep["status"] = {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                     "message": 'ReplicaSet "demo-src-llama-1" has timed out progressing.'}]}
    gated = kube.add_pod("demo-src-llama", "llama-0", {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]})
    step(kube, minutes=60)
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Queued" and not st.get("stall"), st
    gated["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]  # admitted, yet no progress
    step(kube)
    assert status_of(kube, "sample-sources")["stall"]["reason"] == "ProgressDeadlineExceeded"


def test_a_job_whose_pods_are_refused_is_stalled_by_its_warning_events():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    job = kube.objects[("Job", "demo-prepare")]
    kube.objects[("Event", "demo-prepare.1")] = {
        "kind": "Event", "metadata": {"name": "demo-prepare.1", "namespace": NS, "uid": "e1"},
        "involvedObject": {"kind": "Job", "name": "demo-prepare", "uid": job["metadata"]["uid"]},
        "reason": "FailedCreate", "type": "Warning", "lastTimestamp": "2025-01-01T00:00:00Z",
        "message": 'Error creating: pods "demo-prepare-x" is forbidden: exceeded quota: q, requested: pods=1'}
    step(kube)
    stall = status_of(kube, "prepare")["stall"]
    assert stall["reason"] == "QuotaExceeded" and stall["subject"] == "Job demo-prepare"
    kube.add_pod("demo-prepare", "demo-prepare-x", {"phase": "Running"})  # the quota was raised
    step(kube)
    assert "stall" not in status_of(kube, "prepare")


# -- refused creations ---------------------------------------------------------------------------------

def test_a_child_the_apiserver_refuses_fails_the_stage_at_once_with_its_message():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    kube.refuse[("Job", "demo-prepare")] = ApiError(
        422, "Unprocessable Entity", '{"message": "Job.batch \\"demo-prepare\\" is invalid: '
        'spec.template.spec.volumes[3]: Required value: must specify a volume type"}')
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Failed"
    assert "cannot create Job demo-prepare: Job.batch" in status["message"] and "volume type" in status["message"]
    assert ("Warning", "StageFailed") in [(t, r) for t, r, _ in kube.events]
    # the user fixes the spec: the stage is retried
    del kube.refuse[("Job", "demo-prepare")]
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["cluster"]["backoffLimit"] = 3
    run["metadata"]["generation"] = 2
    step(kube)
    step(kube)
    assert kube.run["status"]["phase"] == "Running" and "demo-prepare" in kube.kinds("Job")


def test_a_quota_refusal_is_a_stall_retried_later():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    kube.refuse[("Job", "demo-prepare")] = ApiError(
        403, "Forbidden", '{"message": "jobs.batch \\"demo-prepare\\" is forbidden: exceeded quota: jobs"}')
    d = step(kube, settings=Settings(retry=7))
    status = kube.run["status"]
    assert status["phase"] == "Running" and status_of(kube, "prepare")["stall"]["reason"] == "QuotaExceeded"
    assert d.requeue == 7
    del kube.refuse[("Job", "demo-prepare")]
    step(kube)
    assert "demo-prepare" in kube.kinds("Job") and "stall" not in status_of(kube, "prepare")


def test_a_transient_apiserver_error_is_raised_for_a_retry():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    kube.refuse[("Job", "demo-prepare")] = ApiError(503, "Service Unavailable", "etcd leader changed")
    with pytest.raises(ApiError, match="503"):
        step(kube)


# -- Kueue and checkpoints --------------------------------------------------------------------------------

def test_with_a_queue_the_runner_is_created_suspended_and_shows_as_queued():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1}, "queueName": "team-gpus"}))
    step(kube)
    job = kube.objects[("Job", "demo-prepare")]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][QUEUE_LABEL] == "team-gpus"
    st = status_of(kube, "prepare")
    assert st["state"] == "Queued" and "team-gpus" in st["message"]
    assert ("Normal", "StageQueued") in [(t, r) for t, r, _ in kube.events]
    job["spec"]["suspend"] = False  # Kueue admits it
    step(kube)
    assert status_of(kube, "prepare")["state"] == "Running"
    assert ("Normal", "StageStarted") in [(t, r) for t, r, _ in kube.events]


QUOTA = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor "
         "default-flavor, 3 more needed")


def workload(kube, owner, reason=None):
    """Kueue's Workload of `owner` (a Job or a pod) as v0.17 writes it: owned by it, `QuotaReserved=False`
    with `reason` while it waits, `Admitted=True` once admitted (`reason` None)."""
    conditions = ([{"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": reason}] if reason
                  else [{"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "ok"},
                        {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "ok"}])
    name = f"{owner['kind'].lower()}-{owner['metadata']['name']}-1a2b3"
    wl = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
          "metadata": {"name": name, "namespace": NS, "uid": f"wl-{name}", "ownerReferences": [
              {"apiVersion": "v1", "kind": owner["kind"], "name": owner["metadata"]["name"],
               "uid": owner["metadata"]["uid"], "controller": True}]},
          "spec": {"queueName": "team-gpus"}, "status": {"conditions": conditions}}
    kube._stamp(wl)
    kube.objects[("Workload", name)] = wl


def test_kueues_reason_shows_on_a_held_runner_a_gated_server_and_held_units():
    """docs/operator.md, "Kueue": what a Workload's QuotaReserved=False says is the stage's message, and a
    unit whose Job Kueue holds is Queued, not Running."""
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1}, "queueName": "team-gpus"}))
    step(kube)
    job = kube.objects[("Job", "demo-prepare")]
    workload(kube, job, QUOTA)
    step(kube)
    st = status_of(kube, "prepare")
    assert st["state"] == "Queued"
    assert st["message"] == f"held by Kueue (queue team-gpus): Job demo-prepare: Pending: {QUOTA}"
    assert kube.run["status"]["phase"] == "Running" and QUOTA in kube.run["status"]["message"]
    job["spec"]["suspend"] = False  # Kueue admits it
    workload(kube, job)
    step(kube)
    assert status_of(kube, "prepare")["state"] == "Running"
    kube.finish("Job", "demo-prepare")
    step(kube)
    # sample-sources: llama's server pod waits at Kueue's scheduling gate
    (server,) = kube.kinds("Deployment")
    pod = kube.add_pod(server, "llama-0", {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]})
    workload(kube, pod, QUOTA)
    step(kube)
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Queued" and st["units"] == "0/2", st
    assert f"held by Kueue (queue team-gpus): pod llama-0: Pending: {QUOTA}" in st["message"]
    assert "stall" not in st or st["stall"] is None
    # the server admitted and Ready: the units' Jobs are created suspended, and Queued until Kueue admits them
    del kube.objects[("Pod", "llama-0")]
    kube.make_available()
    step(kube)
    units = unit_jobs(kube, "sample-sources")
    assert len(units) == 2 and all(kube.objects[("Job", u)]["spec"]["suspend"] for u in units)
    assert status_of(kube, "sample-sources")["state"] == "Queued"
    for u in units:
        workload(kube, kube.objects[("Job", u)], QUOTA)
    step(kube)
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Queued" and all(f"Job {u}: Pending: {QUOTA}" in st["message"] for u in units), st
    kube.objects[("Job", units[0])]["spec"]["suspend"] = False
    workload(kube, kube.objects[("Job", units[0])])
    step(kube)
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Running" and f"Job {units[1]}: Pending: {QUOTA}" in st["message"]
    assert f"Job {units[0]}:" not in st["message"]


def test_a_workload_wakes_the_run_of_the_child_it_belongs_to():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"training": {"gpus": 1}, "queueName": "team-gpus"}))
    step(kube)
    cache = Cache()
    cache.put_run(kube.run)
    cache.put(copy.deepcopy(kube.objects[("Job", "demo-prepare")]))
    workload(kube, kube.objects[("Job", "demo-prepare")], QUOTA)
    (wl,) = [o for (k, _), o in kube.objects.items() if k == "Workload"]
    assert cache.put(copy.deepcopy(wl)) == [(NS, NAME)]
    assert [w["metadata"]["name"] for w in cache.observed(kube.run).workloads] == [wl["metadata"]["name"]]
    unrelated = {**copy.deepcopy(wl), "metadata": {**wl["metadata"], "name": "other", "ownerReferences": [
        {"kind": "Job", "name": "x", "uid": "someone-else", "controller": True}]}}
    assert cache.put(unrelated) == [] and len(cache.observed(kube.run).workloads) == 1
    assert cache.remove(copy.deepcopy(wl)) == [(NS, NAME)] and cache.observed(kube.run).workloads == []


def test_the_checkpoint_pvc_comes_with_training_and_outlives_a_failure():
    kube = FakeKube()
    kube.add_run(tiny_spec())
    for stage in STAGE_NAMES[:4]:
        step(kube)
        kube.make_available()
        step(kube)
        kube.finish(*runner_of(kube, stage))
    step(kube)
    assert kube.kinds("PersistentVolumeClaim") == ["demo-checkpoints"] and "demo-sft" in kube.kinds("PyTorchJob")
    kube.finish("PyTorchJob", "demo-sft", ok=False)
    step(kube)
    assert kube.run["status"]["phase"] == "Failed" and kube.kinds("PersistentVolumeClaim") == ["demo-checkpoints"]


def test_pods_of_other_stages_or_templates_do_not_stall_the_current_one():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    pod = kube.add_pod("demo-prepare", "old-pod", PULL)
    pod["metadata"]["labels"][LABEL_TEMPLATE_HASH] = "0000000000000000"  # built from another spec
    other = kube.add_pod("demo-prepare", "other-stage", PULL)
    other["metadata"]["labels"][LABEL_STAGE] = "sft"
    step(kube)
    assert "stall" not in status_of(kube, "prepare")


def test_a_pod_unschedulable_for_a_moment_is_not_a_stall_yet():
    """Pods wait a few seconds for their volumes to be bound: Unschedulable counts after stalls.GRACE."""
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    pending = copy.deepcopy(UNSCHEDULABLE)
    pending["conditions"][0]["lastTransitionTime"] = (now() + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.add_pod("demo-prepare", "demo-prepare-p", pending)
    d = step(kube)
    assert "stall" not in status_of(kube, "prepare") and 0 < d.requeue <= 30
    assert "StageStalled" not in [r for _, r, _ in kube.events]
    step(kube)  # a minute later it still is: now it counts
    assert status_of(kube, "prepare")["stall"]["reason"] == "Unschedulable"


def test_the_reported_cause_stays_while_it_lasts():
    """Two servers crash: the first one seen is reported until it ends (one Event), not flipped."""
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.add_pod("demo-src-llama", "demo-src-llama-b", CRASH)
    step(kube)
    second = kube.add_pod("demo-src-llama", "demo-src-llama-a", CRASH)  # sorts first, seen second
    step(kube)
    assert status_of(kube, "sample-sources")["stall"]["subject"] == "pod demo-src-llama-b container vllm"
    assert [r for _, r, _ in kube.events].count("StageStalled") == 1
    del kube.objects[("Pod", "demo-src-llama-b")]
    step(kube)
    assert status_of(kube, "sample-sources")["stall"]["subject"] == "pod demo-src-llama-a container vllm"
    assert second and [r for _, r, _ in kube.events].count("StageStalled") == 2


def test_an_admission_plugin_that_does_not_know_the_kind_yet_is_retried():
    """OwnerReferencesPermissionEnforcement resolves the owner's kind by discovery, which lags a new CRD."""
    kube = FakeKube()
    kube.add_run(tiny_spec())
    message = ('{"message": "configmaps \\"demo-spec\\" is forbidden: no matches for kind \\"FusionRun\\" in '
               'version \\"fusion.wrpo.io/v1alpha1\\""}')
    kube.refuse[("Job", "demo-prepare")] = ApiError(403, "Forbidden", message)
    with pytest.raises(ApiError, match="no matches for kind"):
        step(kube)
    assert "status" not in kube.run  # nothing recorded: the controller retries with back-off


def _terminated(message: str, code: int = 0) -> dict:
    return {"containerStatuses": [{"name": "stage", "state": {"terminated": {"exitCode": code, "message": message}}}]}


def _eval_pod(message: str, code: int = 0, stage_hash: str = "") -> dict:
    labels = {LABEL_RUN: NAME, "fusion.wrpo.io/stage": "eval", "fusion.wrpo.io/stage-hash": stage_hash}
    return {"kind": "Pod", "metadata": {"name": f"{NAME}-eval-x{code}", "namespace": NS, "labels": labels},
            "status": _terminated(message, code)}


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
    old = kube.add_pod(f"{NAME}-eval", "a-old", _terminated(line.replace("62.5", "10.0")))
    old["metadata"]["labels"][LABEL_STAGE_HASH] = "0" * 16  # an older hash
    kube.add_pod(f"{NAME}-eval", "failed", _terminated("Traceback ...", 1))
    kube.add_pod(f"{NAME}-eval", "ok", _terminated(line))
    kube.finish(*runner_of(kube, "eval"))
    step(kube)
    status = kube.run["status"]
    assert status["phase"] == "Succeeded"
    assert status["eval"] == {"prompts": 8, "fusedVsTarget": 62.5, "fusedVsSft": 55.0, "lcFusedVsTarget": 58.1,
                              "hash": eval_hash}
    kube.calls.clear()
    step(kube, minutes=0)  # known for this hash: not read again, status unchanged
    assert ("patch/status", "FusionRun") not in kube.calls
    # messages that are not a summary give no summary (never a guess)
    assert eval_summary([_eval_pod("not json", 0), _eval_pod(line, 137)], "h") is None


# -- units under the GPU budget (docs/operator.md, "GPU budget and units") ------------------------------

def paper_spec(budget: int | None, extra: list | None = None) -> dict:
    """The paper example's ten sources (39 GPUs of servers at once) with training that fits the budget."""
    import yaml

    doc = yaml.safe_load((Path(__file__).parents[2] / "manifests/examples/paper-llama3-8b.yaml").read_text())
    spec = doc["spec"]
    spec["storage"] = {"runUri": "s3://bkt/runs/demo"}
    spec["sources"] = [*spec["sources"], *(extra or [])]
    spec["cluster"] = {"gpuBudget": budget, "training": {"gpus": 8, "procsPerNode": 8},
                       "scoring": {"gpus": 1}} if budget else {"training": {"gpus": 8, "procsPerNode": 8}}
    return spec


def deployment_gpus(kube) -> int:
    total = 0
    for name in kube.kinds("Deployment"):
        dep = kube.objects[("Deployment", name)]
        c = dep["spec"]["template"]["spec"]["containers"][0]
        total += int(c["resources"]["requests"].get("nvidia.com/gpu", 0)) * dep["spec"]["replicas"]
    return total


def drive_units(kube, peak: list[int]) -> list[str]:
    """Run sample-sources' units to the end: servers become Available, unit Jobs succeed one per step;
    returns the units in the order their Jobs were created. `peak` collects the GPUs held after each step."""
    order = []
    for _ in range(60):
        step(kube, minutes=0)
        peak.append(deployment_gpus(kube))
        for name in unit_jobs(kube, "sample-sources"):
            if name not in order:
                order.append(name)
        if ("Job", f"{NAME}-sample-sources") in kube.objects:
            return order
        kube.make_available()
        running = [n for n in unit_jobs(kube, "sample-sources")
                   if "conditions" not in (kube.objects[("Job", n)].get("status") or {})]
        if running:
            kube.finish("Job", running[0])
    raise AssertionError("the units did not finish")


def test_ten_sources_under_a_budget_of_8_never_hold_more_than_8_gpus():
    kube = FakeKube()
    kube.add_run(paper_spec(8))
    step(kube)
    kube.finish("Job", "demo-prepare")
    peak: list[int] = []
    order = drive_units(kube, peak)
    assert max(peak) <= 8 and max(peak) == 8  # the budget is used, never exceeded
    assert len(order) == 10 and kube.kinds("Deployment") == []  # every unit ran; its servers are gone
    st = status_of(kube, "sample-sources")
    assert st["units"] == "10/10" and st["state"] == "Running"  # now the commit Job runs
    commit = kube.objects[("Job", "demo-sample-sources")]
    command = commit["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--endpoint" not in command and "--unit" not in command  # it only commits the stage


def test_without_a_budget_every_source_server_starts_at_once():
    kube = FakeKube()
    kube.add_run(paper_spec(None))
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    assert deployment_gpus(kube) == 39 and len(kube.kinds("Deployment")) == 10


def test_the_window_reports_units_and_what_waits_for_the_budget():
    kube = FakeKube()
    kube.add_run(paper_spec(8))
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    st, status = status_of(kube, "sample-sources"), kube.run["status"]
    assert st["units"] == "0/10" and status["units"] == "0/10"
    assert "waiting for the GPU budget (8 GPUs, 0 held)" in st["message"]
    assert "mistral-large" in st["message"].split("running:")[1].split(";")[0]  # spec order, first fit


def test_an_added_source_samples_only_that_source():
    kube = FakeKube()
    kube.add_run(paper_spec(8))
    step(kube)
    kube.finish("Job", "demo-prepare")
    drive_units(kube, [])
    kube.finish("Job", "demo-sample-sources")
    step(kube)
    assert status_of(kube, "sample-sources")["state"] == "Succeeded"
    before = {n: kube.objects[("Job", n)]["metadata"]["uid"] for n in unit_jobs(kube, "sample-sources")}
    run = kube.objects[("FusionRun", NAME)]
    run["spec"]["sources"].append({"name": "olmo", "model": "/models/olmo", "tensorParallelSize": 2})
    run["metadata"]["generation"] = 2
    step(kube)
    assert status_of(kube, "sample-sources")["state"] in ("Waiting", "Running")
    assert kube.kinds("Deployment") == ["demo-src-olmo"]  # the only server started
    assert {n: kube.objects[("Job", n)]["metadata"]["uid"] for n in before} == before  # still done
    assert status_of(kube, "sample-sources")["units"] == "10/11"


def test_servers_of_a_finished_unit_still_shutting_down_hold_their_gpus():
    kube = FakeKube()
    kube.add_run(paper_spec(8))
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    assert kube.kinds("Deployment") == ["demo-src-mistral-large"]
    pod = kube.add_pod("demo-src-mistral-large", "mistral-0", {"phase": "Running"})
    pod["spec"] = {"containers": [{"name": "vllm", "resources": {"requests": {"nvidia.com/gpu": "8"}}}]}
    kube.make_available()
    step(kube)
    kube.finish("Job", "demo-sample-sources-mistral-large")
    step(kube)  # the unit is done: its Deployment goes, but its pod still holds 8 GPUs
    assert kube.kinds("Deployment") == []
    assert "8 held" in status_of(kube, "sample-sources")["message"]
    del kube.objects[("Pod", "mistral-0")]
    step(kube)
    assert kube.kinds("Deployment")  # the next units start once the pod is gone


def test_scoring_shards_run_as_an_indexed_job_then_a_commit_job():
    from wrpo.pipeline.spec import parse_spec
    from wrpo_operator import builders as b

    small = [{"name": f"s{i}", "model": f"/models/s{i}"} for i in range(3)]
    spec = parse_spec(paper_spec(3) | {"sources": small, "cluster": {
        "gpuBudget": 3, "training": {"gpus": 2, "procsPerNode": 2}, "scoring": {"gpus": 1, "parallelism": 6}}}, "t")
    kids = b.stage_children(NAME, NS, spec, "score-sources", "s3://bkt/runs/demo", "h")
    shards, commit = kids.runners
    assert shards["spec"]["completionMode"] == "Indexed" and shards["spec"]["completions"] == 6
    assert shards["spec"]["parallelism"] == 3  # the budget's 3 GPUs, one per shard pod
    assert shards["spec"]["backoffLimitPerIndex"] == 2 and "backoffLimit" not in shards["spec"]
    command = shards["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/6"
    assert kids.after_runners == {commit["metadata"]["name"]: [shards["metadata"]["name"]]}
    commit_container = commit["spec"]["template"]["spec"]["containers"][0]
    assert "--shard" not in commit_container["command"]
    assert "nvidia.com/gpu" not in commit_container["resources"]["requests"]  # it only commits the parts
    plain = b.stage_children(NAME, NS, parse_spec(paper_spec(8), "t"), "score-sources", "s3://bkt/runs/demo", "h")
    assert len(plain.runners) == 1 and "completionMode" not in plain.runners[0]["spec"]


def test_selection_shards_follow_cluster_small_parallelism():
    """select-sources and build-pairs shard by prompt hash (docs/data.md, "Shards") as an Indexed Job of
    `cluster.small.parallelism` pods plus a commit Job; the other small stages stay one Job."""
    from wrpo.pipeline.spec import parse_spec
    from wrpo_operator import builders as b

    spec = parse_spec(paper_spec(8) | {"cluster": {"gpuBudget": 8, "small": {"parallelism": 4}}}, "t")
    for stage in ("select-sources", "build-pairs"):
        shards, commit = b.stage_children(NAME, NS, spec, stage, "s3://bkt/runs/demo", "h").runners
        assert shards["spec"]["completions"] == 4 and shards["spec"]["parallelism"] == 4
        command = shards["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[command.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/4"
        assert "--shard" not in commit["spec"]["template"]["spec"]["containers"][0]["command"]
    (prepare,) = b.stage_children(NAME, NS, spec, "prepare", "s3://bkt/runs/demo", "h").runners
    assert "completionMode" not in prepare["spec"]


def test_a_unit_committed_in_the_run_directory_gets_no_server():
    """An earlier FusionRun on the same runUri committed two units: the operator reads their markers
    (runstate.RunState) and starts servers only for the others."""
    from wrpo_operator.runstate import RunState

    reads = []

    def read(spec, stage):
        reads.append(stage)
        return {"mistral-large", "qwen2-72b"}

    state = RunState(read)
    kube = FakeKube()
    kube.add_run(paper_spec(8))
    for _ in range(3):
        reconcile(kube.run, kube.observed(), kube, now=T0, run_state=state)
        kube.finish("Job", "demo-prepare")
    assert "demo-src-mistral-large" not in kube.kinds("Deployment") and "demo-src-qwen2-72b" not in kube.kinds(
        "Deployment")
    assert "demo-src-gemma-2-27b" in kube.kinds("Deployment")
    assert status_of(kube, "sample-sources")["units"] == "2/10"
    assert reads == ["sample-sources"]  # once per stage hash, not per reconcile


def test_a_failed_run_state_read_falls_back_to_the_jobs():
    from wrpo_operator.runstate import RunState

    def read(spec, stage):
        raise OSError("no route to the endpoint")

    kube = FakeKube()
    kube.add_run(paper_spec(8))
    for _ in range(3):
        reconcile(kube.run, kube.observed(), kube, now=T0, run_state=RunState(read))
        kube.finish("Job", "demo-prepare")
    assert kube.kinds("Deployment") == ["demo-src-mistral-large"]
    assert status_of(kube, "sample-sources")["units"] == "0/10"


def test_a_stage_waits_until_earlier_stages_pods_leave_room_in_the_budget():
    """After sample-sources the last unit's server pod may still hold its GPUs: score-sources (a GPU Job)
    starts only once budget - held covers it."""
    spec = paper_spec(8)
    spec["cluster"]["scoring"] = {"gpus": 1, "parallelism": 4}
    kube = FakeKube()
    kube.add_run(spec)
    step(kube)
    kube.finish("Job", "demo-prepare")
    drive_units(kube, [])
    kube.finish("Job", "demo-sample-sources")
    pod = kube.add_pod("demo-sample-sources", "server-going", {"phase": "Running"})
    pod["spec"] = {"containers": [{"name": "vllm", "resources": {"requests": {"nvidia.com/gpu": "6"}}}]}
    step(kube)
    st = status_of(kube, "score-sources")
    assert st["state"] == "Waiting" and "needs 4 GPUs" in st["message"] and "hold 6 of 8" in st["message"]
    assert "demo-score-sources-shards" not in kube.kinds("Job")
    del kube.objects[("Pod", "server-going")]
    step(kube)
    assert "demo-score-sources-shards" in kube.kinds("Job")


def test_an_eval_summary_not_yet_in_the_cache_is_looked_for_again_soon():
    """The eval Job's completion can reach the operator before its pod's termination message."""
    kube = FakeKube()
    kube.add_run(tiny_spec())
    for stage in STAGE_NAMES[:-1]:
        step(kube)
        if kube.kinds("Deployment") and ("Job", f"{NAME}-{stage}") not in kube.objects:
            kube.make_available()
            step(kube)
        kube.finish(*runner_of(kube, stage))
    step(kube)
    pod = kube.add_pod(f"{NAME}-eval", "ok", {"phase": "Running"})
    kube.finish(*runner_of(kube, "eval"))
    d = step(kube, minutes=0)
    assert kube.run["status"]["phase"] == "Succeeded" and "eval" not in kube.run["status"]
    assert d.requeue == 2.0  # not forgotten: looked at again
    pod["status"] = _terminated('{"summary": {"prompts": 4, "fused_vs_target": 50.0}}')
    d = step(kube, minutes=0)
    assert kube.run["status"]["eval"]["prompts"] == 4 and d.requeue is None


# -- stalls that were missed (issue 23) ------------------------------------------------------------------

def _at(minutes: float = 0) -> str:
    return (now() + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _creating(reason: str = "ContainerCreating", message: str | None = None, scheduled: str | None = None) -> dict:
    """A pod on a node whose container has not started (scheduled `scheduled`, default: the next step)."""
    waiting = {"reason": reason, **({"message": message} if message else {})}
    return {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True",
                                                "lastTransitionTime": scheduled or _at(1)}],
            "containerStatuses": [{"name": "stage", "ready": False, "state": {"waiting": waiting}}]}


def _warning(kube, name: str, involved: dict, reason: str, message: str, first: str) -> None:
    kube.objects[("Event", name)] = {
        "kind": "Event", "metadata": {"name": name, "namespace": NS, "uid": f"event-{name}"},
        "involvedObject": {"kind": involved["kind"], "name": involved["metadata"]["name"],
                           "uid": involved["metadata"]["uid"]},
        "reason": reason, "type": "Warning", "firstTimestamp": first, "lastTimestamp": first, "message": message}


def test_a_failed_mount_is_a_stall_naming_the_pod_and_the_kubelets_message_after_its_grace():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    pod = kube.add_pod("demo-prepare", "demo-prepare-p", _creating())
    _warning(kube, "demo-prepare-p.1", pod, "FailedMount",
             'MountVolume.SetUp failed for volume "spec" : configmap "demo-spec-1" not found', _at(1))
    d = step(kube)
    assert "stall" not in status_of(kube, "prepare") and 0 < d.requeue <= 60  # within stalls.GRACE
    step(kube, minutes=2)
    stall = status_of(kube, "prepare")["stall"]
    assert stall["reason"] == "FailedMount" and stall["subject"] == "pod demo-prepare-p"
    assert 'configmap "demo-spec-1" not found' in stall["message"]
    cond = {c["type"]: c for c in kube.run["status"]["conditions"]}["Stalled"]
    assert cond["status"] == "True" and cond["reason"] == "FailedMount"
    assert [r for _, r, _ in kube.events].count("StageStalled") == 1


def test_a_pod_stuck_in_container_creating_is_a_stall_after_its_grace():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.add_pod("demo-prepare", "demo-prepare-p", _creating())
    step(kube)
    assert "stall" not in status_of(kube, "prepare")
    step(kube, minutes=6)  # over stalls.GRACE["ContainerCreating"]
    stall = status_of(kube, "prepare")["stall"]
    assert stall["reason"] == "ContainerCreating" and stall["subject"] == "pod demo-prepare-p container stage"


def test_a_missing_configmap_key_is_a_stall_after_its_grace():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    message = "couldn't find key model in ConfigMap team-a/settings"
    kube.add_pod("demo-prepare", "demo-prepare-p", _creating("CreateContainerConfigError", message))
    step(kube)
    assert "stall" not in status_of(kube, "prepare")  # the ConfigMap may be created a moment later
    step(kube, minutes=2)
    stall = status_of(kube, "prepare")["stall"]
    assert stall["reason"] == "CreateContainerConfigError" and stall["message"] == message
    assert "pod demo-prepare-p container stage" in kube.run["status"]["message"]


def test_a_refused_pod_of_one_units_job_is_reported_while_another_units_pod_runs():
    kube = FakeKube()
    kube.add_run(stall_settings())
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.make_available()
    step(kube)
    jobs = sorted(unit_jobs(kube, "sample-sources"))
    assert jobs == ["demo-sample-sources-api", "demo-sample-sources-llama"]
    kube.add_pod("demo-sample-sources-api", "demo-sample-sources-api-x", {"phase": "Running"})
    _warning(kube, "llama.1", kube.objects[("Job", "demo-sample-sources-llama")], "FailedCreate",
             'Error creating: pods "demo-sample-sources-llama-y" is forbidden: violates PodSecurity "restricted"',
             _at())
    step(kube)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "FailedCreate" and stall["subject"] == "Job demo-sample-sources-llama"
    assert "PodSecurity" in stall["message"]


def test_a_vllm_server_never_ready_within_its_startup_budget_is_a_stall():
    spec = stall_settings()
    spec["cluster"]["vllm"] = {"startupProbe": {"periodSeconds": 10, "failureThreshold": 6}}  # 60 s
    kube = FakeKube()
    kube.add_run(spec)
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.add_pod("demo-src-llama", "demo-src-llama-abc", {"phase": "Running", "containerStatuses": [
        {"name": "vllm", "ready": False, "restartCount": 0, "state": {"running": {"startedAt": _at(1)}}}]})
    d = step(kube)
    assert "stall" not in status_of(kube, "sample-sources") and 0 < d.requeue <= 60
    step(kube, minutes=2)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "ServerNotReady" and stall["subject"] == "pod demo-src-llama-abc container vllm"
    assert "60s" in stall["message"]


def test_a_vllm_server_the_startup_probe_restarts_is_not_ready_since_its_pod_condition():
    """The startup probe restarts the container at the end of each budget: the clock is the pod's Ready
    condition, which a restart does not move."""
    spec = stall_settings()
    spec["cluster"]["vllm"] = {"startupProbe": {"periodSeconds": 10, "failureThreshold": 6}}  # 60 s
    kube = FakeKube()
    kube.add_run(spec)
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    kube.add_pod("demo-src-llama", "demo-src-llama-abc", {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": _at(-5)}],
        "containerStatuses": [{"name": "vllm", "ready": False, "restartCount": 4,
                               "state": {"running": {"startedAt": _at(1)}}}]})  # restarted just now
    step(kube)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "ServerNotReady" and stall["message"].endswith("4 restarts")


def _scoring_behind_a_stuck_server(held: int, **cluster) -> FakeKube:
    """The paper's run (gpuBudget 8) at score-sources (4 shards of 1 GPU) while a stray pod of sample-sources
    still holds `held` GPUs; `cluster` adds the timeout under test."""
    spec = paper_spec(8)
    spec["cluster"].update(scoring={"gpus": 1, "parallelism": 4}, **cluster)
    kube = FakeKube()
    kube.add_run(spec)
    step(kube)
    kube.finish("Job", "demo-prepare")
    drive_units(kube, [])
    kube.finish("Job", "demo-sample-sources")
    pod = kube.add_pod("demo-sample-sources", "server-stuck", {"phase": "Running"})
    pod["spec"] = {"containers": [{"name": "vllm", "resources": {"requests": {"nvidia.com/gpu": str(held)}}}]}
    return kube


def test_a_stage_waiting_for_the_gpu_budget_past_the_stall_timeout_names_what_holds_it():
    kube = _scoring_behind_a_stuck_server(held=6, stallTimeoutSeconds=600)
    d = step(kube)
    assert status_of(kube, "score-sources")["state"] == "Waiting" and "stall" not in status_of(kube, "score-sources")
    assert 0 < d.requeue <= 600  # woken when the wait becomes a stall
    step(kube, minutes=11)
    st = status_of(kube, "score-sources")
    assert st["state"] == "Waiting" and st["stall"]["reason"] == "WaitingForGPUBudget"
    assert st["stall"]["subject"] == "pods server-stuck"
    assert "needs 4 GPUs at once, cluster.gpuBudget is 8 and 6 are held by: pod server-stuck (sample-sources) 6" \
        in st["stall"]["message"]
    cond = {c["type"]: c for c in kube.run["status"]["conditions"]}["Stalled"]
    assert cond["status"] == "True" and cond["reason"] == "WaitingForGPUBudget"
    assert kube.run["status"]["phase"] == "Running"  # its own pods end: only activeDeadlineSeconds fails it
    del kube.objects[("Pod", "server-stuck")]
    step(kube)
    assert "stall" not in status_of(kube, "score-sources") and "demo-score-sources-shards" in kube.kinds("Job")
    assert ("Normal", "StallCleared") in [(t, r) for t, r, _ in kube.events]


def test_a_stage_that_failed_while_waiting_posts_no_started_event():
    kube = FakeKube()
    kube.add_run(tiny_spec(cluster={"activeDeadlineSeconds": 600}, sources=[{"name": "llama", "model": "s3://bkt/m"}]))
    step(kube)
    kube.finish("Job", "demo-prepare")
    step(kube)
    step(kube, minutes=11)
    assert status_of(kube, "sample-sources")["state"] == "Failed"
    mine = [r for _, r, m in kube.events if "sample-sources" in m]
    assert "StageFailed" in mine and "StageStarted" not in mine


def test_units_that_cannot_start_for_the_gpu_budget_past_the_stall_timeout_name_what_holds_it():
    spec = paper_spec(8)
    spec["cluster"]["stallTimeoutSeconds"] = 600
    kube = FakeKube()
    kube.add_run(spec)
    step(kube)
    stray = kube.add_pod("demo-prepare", "stray", {"phase": "Running"})  # still holds 8 GPUs
    stray["spec"] = {"containers": [{"name": "stage", "resources": {"requests": {"nvidia.com/gpu": "8"}}}]}
    kube.finish("Job", "demo-prepare")
    step(kube)
    st = status_of(kube, "sample-sources")
    assert st["state"] == "Waiting" and "stall" not in st and st["waitingSince"]
    assert not unit_jobs(kube, "sample-sources")
    step(kube, minutes=5)
    assert "stall" not in status_of(kube, "sample-sources")  # 5 of 10 minutes
    step(kube, minutes=6)
    stall = status_of(kube, "sample-sources")["stall"]
    assert stall["reason"] == "WaitingForGPUBudget" and stall["subject"] == "pods stray"
    assert "8 are held by: pod stray (prepare) 8" in stall["message"]
    del kube.objects[("Pod", "stray")]
    step(kube)
    st = status_of(kube, "sample-sources")
    assert "stall" not in st and "waitingSince" not in st and kube.kinds("Deployment")


def test_the_deadline_bounds_the_wait_for_the_gpu_budget():
    kube = _scoring_behind_a_stuck_server(held=8, activeDeadlineSeconds=600)
    d = step(kube)
    assert status_of(kube, "score-sources")["state"] == "Waiting" and 0 < d.requeue <= 600
    step(kube, minutes=11)
    status = kube.run["status"]
    assert status["phase"] == "Failed" and status["stage"] == "score-sources"
    assert "DeadlineExceeded: the stage waited longer than 600s for its servers or the GPU budget" in status["message"]

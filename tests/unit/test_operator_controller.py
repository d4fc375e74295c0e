"""The controller around reconcile: watch events wake exactly the run they concern, the work queue merges
bursts and never hands one run to two workers, deadlines and back-off are the only timed wake-ups, an
invalid spec is recorded once, a follower replica does not act. Against the in-memory apiserver of
test_operator_reconcile (the cluster tests run the real one)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
from test_operator_reconcile import NAME, NS, UID, FakeKube, tiny_spec

from wrpo_operator.cache import Cache
from wrpo_operator.controller import Controller
from wrpo_operator.kube import ApiError
from wrpo_operator.workqueue import WorkQueue

KEY = (NS, NAME)


class WatchedKube(FakeKube):
    """FakeKube whose writes go to the controller's cache, as Kube.on_change does."""

    on_change = None
    on_request = None

    def create(self, obj, dry_run=False):
        made = super().create(obj, dry_run)
        if made and self.on_change and not dry_run:  # as Kube.create: a dry run changes nothing
            self.on_change("write", made)
        return made

    def merge_patch(self, kind, namespace, name, patch, sub=None):
        out = super().merge_patch(kind, namespace, name, patch, sub)
        if self.on_change:
            self.on_change("write", out)
        return out

    def delete(self, kind, namespace, name):
        gone = super().delete(kind, namespace, name)
        if self.on_change:
            self.on_change("delete", {"kind": kind, "metadata": {"name": name, "namespace": namespace}})
        return gone


@pytest.fixture
def controller():
    kube = WatchedKube()
    c = Controller(kube, workers=0)
    yield c
    c.stop()


def drain(c: Controller) -> int:
    """Run every queued key now (as a worker would); returns how many reconciles ran."""
    n = 0
    while (key := c.queue.get(timeout=0)) is not None:
        try:
            c.reconcile(key)
            n += 1
        finally:
            c.queue.done(key)
    return n


def test_a_new_run_is_reconciled_once_and_its_own_writes_need_no_second_pass(controller):
    kube = controller.kube
    kube.add_run(tiny_spec())
    controller.run_event("ADDED", kube.run)
    controller.run_event("MODIFIED", kube.run)  # a burst is one reconcile
    assert drain(controller) == 1
    assert "demo-prepare" in kube.kinds("Job")
    # the watch events of what it wrote arrive later: they wake the run, which does nothing
    for (kind, _), obj in list(kube.objects.items()):
        if kind != "FusionRun":
            controller.child_event("ADDED", copy.deepcopy(obj))
    controller.run_event("MODIFIED", kube.run)
    kube.calls.clear()
    assert drain(controller) == 1 and not kube.calls


def test_a_child_event_wakes_its_run_and_only_its_run(controller):
    kube = controller.kube
    kube.add_run(tiny_spec())
    controller.run_event("ADDED", kube.run)
    drain(controller)
    stranger = {"kind": "Job", "metadata": {"name": "x", "namespace": NS, "uid": "u9", "labels": {},
                                            "ownerReferences": [{"uid": "someone-else", "controller": True}]}}
    controller.child_event("ADDED", stranger)
    assert len(controller.queue) == 0
    kube.finish("Job", "demo-prepare")
    controller.child_event("MODIFIED", copy.deepcopy(kube.objects[("Job", "demo-prepare")]))
    assert len(controller.queue) == 1 and drain(controller) == 1
    assert kube.run["status"]["stages"][0]["state"] == "Succeeded"
    assert "demo-src-llama" in kube.kinds("Deployment")  # the next stage started in the same pass


def test_a_run_with_nothing_to_wait_for_is_not_queued_again(controller):
    kube = controller.kube
    kube.add_run(tiny_spec())
    controller.run_event("ADDED", kube.run)
    drain(controller)
    assert controller.queue.get(timeout=0.2) is None  # no poll of a running Job


def test_an_invalid_spec_is_recorded_once(controller):
    kube = controller.kube
    kube.add_run(tiny_spec(storage={}))
    controller.run_event("ADDED", kube.run)
    drain(controller)
    status = kube.objects[("FusionRun", NAME)]["status"]
    assert status["phase"] == "Failed" and "storage.runUri" in status["message"]
    assert kube.events[-1][:2] == ("Warning", "InvalidSpec")
    controller.run_event("MODIFIED", kube.run)
    drain(controller)
    assert len(kube.events) == 1 and controller.queue.get(timeout=0.1) is None


def test_an_apiserver_error_is_retried_with_growing_back_off(controller, monkeypatch):
    kube = controller.kube
    kube.add_run(tiny_spec())
    kube.refuse[("Job", "demo-prepare")] = ApiError(500, "Internal Server Error", "etcdserver: timeout")
    delays = []
    monkeypatch.setattr(controller.queue, "add_after", lambda key, s: delays.append(s))
    controller.run_event("ADDED", kube.run)
    drain(controller)
    controller.queue.add(KEY)
    drain(controller)
    assert delays == [1.0, 2.0]
    del kube.refuse[("Job", "demo-prepare")]
    controller.queue.add(KEY)
    drain(controller)
    assert "demo-prepare" in kube.kinds("Job") and controller.queue.backoff(KEY) == 1.0  # forgotten on success


def test_a_follower_does_not_act_until_it_leads():
    kube = WatchedKube()
    c = Controller(kube, workers=1, acting=False).start()
    try:
        kube.add_run(tiny_spec())
        c.run_event("ADDED", kube.run)
        time.sleep(0.5)
        assert not kube.calls
        c.lead()
        deadline = time.monotonic() + 60  # a hang detector: the worker acts within milliseconds when idle
        while "demo-prepare" not in kube.kinds("Job") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "demo-prepare" in kube.kinds("Job")
    finally:
        c.stop()


def test_a_deleted_run_is_forgotten(controller):
    kube = controller.kube
    kube.add_run(tiny_spec())
    controller.run_event("ADDED", kube.run)
    drain(controller)
    controller.run_event("DELETED", kube.run)
    kube.calls.clear()
    controller.queue.add(KEY)
    drain(controller)
    assert not kube.calls and controller.cache.run(KEY) is None


# -- the cache -------------------------------------------------------------------------------------------

def _job(name, uid, owner=UID, rv="5", labels=None):
    return {"kind": "Job", "metadata": {"name": name, "namespace": NS, "uid": uid, "resourceVersion": rv,
                                        "labels": labels or {"fusion.wrpo.io/run": NAME},
                                        "ownerReferences": [{"uid": owner, "controller": True}]}}


def test_the_cache_matches_children_by_owner_uid_and_ignores_older_events():
    cache = Cache()
    run = {"kind": "FusionRun", "metadata": {"name": NAME, "namespace": NS, "uid": UID, "resourceVersion": "1"}}
    cache.put_run(run)
    assert cache.put(_job("demo-prepare", "j1", rv="7")) == [KEY]
    assert cache.put(_job("demo-prepare", "j1", rv="6")) == [KEY]  # older than what we hold: ignored
    (child,) = cache.observed(run).children
    assert child["metadata"]["resourceVersion"] == "7"
    assert cache.put(_job("demo-sft", "j2", owner="old-run")) == []  # another run's: no wake, not observed
    assert [c["metadata"]["name"] for c in cache.observed(run).children] == ["demo-prepare"]
    orphan = _job("demo-wrpo", "j3")
    orphan["metadata"]["ownerReferences"] = []
    assert cache.put(orphan) == [KEY]  # an orphan with our name label: offered for adoption
    assert len(cache.observed(run).children) == 2


def test_our_delete_hides_the_object_until_its_deleted_event():
    cache = Cache()
    run = {"kind": "FusionRun", "metadata": {"name": NAME, "namespace": NS, "uid": UID}}
    cache.put_run(run)
    cache.put(_job("demo-prepare", "j1"))
    cache.remove({"kind": "Job", "metadata": {"name": "demo-prepare", "namespace": NS}}, ours=True)
    cache.put(_job("demo-prepare", "j1", rv="9"))  # an event sent before the delete
    assert cache.observed(run).children == []
    cache.remove(_job("demo-prepare", "j1"))  # its DELETED event
    cache.put(_job("demo-prepare", "j4", rv="12"))  # made again: a new UID
    assert [c["metadata"]["uid"] for c in cache.observed(run).children] == ["j4"]


def test_pods_are_trimmed_and_found_by_the_run_uid_label():
    cache = Cache()
    run = {"kind": "FusionRun", "metadata": {"name": NAME, "namespace": NS, "uid": UID}}
    cache.put_run(run)
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": NS, "uid": "p1", "managedFields": [{}] * 50,
                                       "labels": {"fusion.wrpo.io/run-uid": UID}},
           "spec": {"containers": [{"name": "c", "env": [{"name": "A", "value": "x" * 1000}]},
                                   {"name": "g", "resources": {"requests": {"cpu": "2", "nvidia.com/gpu": "4"}}}]},
           "status": {"phase": "Pending"}}
    assert cache.put(pod) == [KEY]
    (seen,) = cache.observed(run).pods
    assert "managedFields" not in seen["metadata"]
    # of the containers only their GPU requests stay (the GPU budget counts them)
    assert seen["spec"]["containers"] == [{"name": "g", "resources": {"requests": {"nvidia.com/gpu": "4"}}}]


def test_a_failed_mount_event_on_a_pod_wakes_its_run_and_is_observed():
    """The kubelet's FailedMount Warning Event is about a pod, not a child: it reaches the run through the pod's
    UID (stalls.MOUNT_FAILURES); other Warning Events on pods are dropped."""
    cache = Cache()
    run = {"kind": "FusionRun", "metadata": {"name": NAME, "namespace": NS, "uid": UID}}
    cache.put_run(run)
    cache.put({"kind": "Pod", "metadata": {"name": "p", "namespace": NS, "uid": "p1",
                                           "labels": {"fusion.wrpo.io/run-uid": UID}}, "status": {"phase": "Pending"}})

    def event(name: str, reason: str) -> dict:
        return {"metadata": {"name": name, "namespace": NS, "uid": f"e-{name}"}, "reason": reason,
                "involvedObject": {"kind": "Pod", "name": "p", "uid": "p1"}, "message": "m",
                "firstTimestamp": "2025-01-01T00:00:00Z", "lastTimestamp": "2025-01-01T00:01:00Z"}

    assert cache.put(event("p.1", "FailedMount")) == [KEY]
    assert cache.put(event("p.2", "BackOff")) == []
    (seen,) = cache.observed(run).events
    assert seen["reason"] == "FailedMount" and seen["firstTimestamp"] == "2025-01-01T00:00:00Z"


# -- the work queue --------------------------------------------------------------------------------------

def test_the_work_queue_merges_adds_and_serializes_a_key():
    q = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert q.get(timeout=0) == "a"
    q.add("a")  # while "a" is being processed: handed out again only after done()
    assert q.get(timeout=0) == "b"
    assert q.get(timeout=0) is None
    q.done("a")
    assert q.get(timeout=0) == "a"


def test_the_work_queue_delays_and_keeps_the_earliest():
    q = WorkQueue()
    t0 = time.monotonic()
    q.add_after("a", 0.3)
    q.add_after("a", 600)
    # handed out at all within the (hang-detector) 60 s: the earlier due time was kept, not the later one
    assert q.get(timeout=60) == "a" and time.monotonic() - t0 >= 0.3
    q.done("a")
    assert q.get(timeout=0.1) is None


def test_the_work_queue_wakes_a_waiting_worker_and_shuts_down():
    q = WorkQueue()
    got = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    time.sleep(0.1)
    q.add("x")
    t.join(60)  # a hang detector: a loaded machine may not run the thread for a while
    assert got == ["x"]
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shut_down()
    t.join(60)
    assert got == ["x", None]


def test_a_key_added_first_jumps_the_queue():
    q = WorkQueue()
    for k in ("a", "b", "c"):
        q.add(k)
    q.add("new", first=True)
    q.add("c", first=True)  # already waiting: moved to the front
    assert [q.get(timeout=0) for _ in range(4)] == ["c", "new", "a", "b"]


def test_a_new_run_goes_before_wake_ups_of_running_ones(controller):
    kube = controller.kube
    kube.add_run(tiny_spec())
    running = copy.deepcopy(kube.run)
    running["metadata"].update(name="old", uid="uid-old")
    running["status"] = {"observedGeneration": 1}
    controller.run_event("MODIFIED", running)
    controller.run_event("ADDED", kube.run)  # no status yet: unseen
    assert controller.queue.get(timeout=0) == KEY

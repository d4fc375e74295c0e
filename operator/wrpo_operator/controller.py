"""The operator's engine (docs/operator.md, "Reconcile"): watch events go into the cache and put the run they
concern on the work queue; worker threads take runs off the queue and reconcile them. So a change of any
child (a Job finishing, a pod stuck pulling its image, a Deployment becoming Available) wakes its run at
once, a burst of events is one reconcile, one run is never reconciled by two workers at the same time, and
nothing is polled: the only timed wake-ups are the deadlines `decide` asks for and the back-off after an
error. With leader election, every replica keeps its cache warm but only the leader's workers act.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import UTC, datetime
from typing import Any

from wrpo.errors import SpecError
from wrpo_operator import metrics
from wrpo_operator.cache import Cache, RunKey
from wrpo_operator.decide import Settings
from wrpo_operator.kube import Kube
from wrpo_operator.reconcile import reconcile
from wrpo_operator.status import derive_conditions, timestamp
from wrpo_operator.workqueue import WorkQueue

log = logging.getLogger("wrpo_operator")
Obj = dict[str, Any]


class Controller:
    def __init__(self, kube: Kube, settings: Settings | None = None, workers: int = 4, acting: bool = True):
        self.kube, self.settings, self.workers = kube, settings or Settings(), workers
        self.cache, self.queue = Cache(), WorkQueue()
        self.acting = threading.Event()
        if acting:
            self.acting.set()
        self._threads: list[threading.Thread] = []
        self._events: queue.Queue = queue.Queue(maxsize=10000)
        kube.on_change = self._written
        kube.on_request = self._requested

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Controller:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"wrpo-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        poster = threading.Thread(target=self._post_events, name="wrpo-events", daemon=True)
        poster.start()
        self._threads.append(poster)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.acting.clear()
        self.queue.shut_down()
        self._events.put(None)
        for t in self._threads:
            t.join(timeout)

    def post_event(self, *event: Any) -> None:
        """Events are posted by one background thread, in order (best effort, like the kubelet's)."""
        try:
            self._events.put_nowait(event)
        except queue.Full:
            log.warning("dropping Event %s: the poster is behind", event[2])

    def _post_events(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                self.kube.event(*event)
            except Exception as e:  # noqa: BLE001 - an Event is not worth a failed reconcile
                log.warning("cannot post Event %s: %s", event[2], e)

    def lead(self) -> None:
        """This replica became the leader: act on every run it knows."""
        log.info("acting as the leader: reconciling %d FusionRuns", len(self.cache.runs))
        metrics.LEADER.set(1)
        self.acting.set()
        for key in list(self.cache.runs):
            self.queue.add(key)

    # -- feeds (called from the watch handlers) ---------------------------------------------------------
    def run_event(self, etype: str | None, run: Obj) -> None:
        if etype == "DELETED":
            self.cache.drop_run(run)
            metrics.record_phase(run["metadata"].get("uid", ""), None)
            return
        # a new or edited run goes first: its first children are what a user waits for
        unseen = (run.get("status") or {}).get("observedGeneration") != run["metadata"].get("generation")
        self.queue.add(self.cache.put_run(run), first=unseen)

    def child_event(self, etype: str | None, obj: Obj) -> None:
        keys = self.cache.remove(obj) if etype == "DELETED" else self.cache.put(obj)
        for key in keys:
            self.queue.add(key)

    @staticmethod
    def _requested(verb: str, kind: str, seconds: float) -> None:
        metrics.API_CALLS.labels(verb, kind).inc()
        metrics.API_SECONDS.observe(seconds)

    def _written(self, what: str, obj: Obj) -> None:
        if obj.get("kind") == "FusionRun":
            if what == "write":
                self.cache.put_run(obj)
        elif what == "write":
            self.cache.put(obj)
        else:
            self.cache.remove(obj, ours=True)

    # -- workers ---------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                if self.acting.is_set():
                    self.reconcile(key)
            except Exception:  # noqa: BLE001 - a worker must survive anything; reconcile logs
                log.exception("reconcile of %s/%s crashed", *key)
            finally:
                self.queue.done(key)

    def reconcile(self, key: RunKey) -> None:
        run = self.cache.run(key)
        if run is None or run["metadata"].get("deletionTimestamp"):
            self.queue.forget(key)
            return  # gone or going: its children go by garbage collection
        try:
            d = reconcile(run, self.cache.observed(run), self.kube, settings=self.settings,
                          post_event=self.post_event if self.workers else None)
        except SpecError as e:
            metrics.RECONCILES.labels("invalid").inc()
            self._mark_invalid(run, str(e))
            self.queue.forget(key)
            return
        except Exception as e:  # noqa: BLE001 - apiserver errors and connection failures: retried
            delay = self.queue.backoff(key)
            metrics.RECONCILES.labels("error").inc()
            log.warning("FusionRun %s/%s: %s; retrying in %.0fs", *key, e, delay)
            self.queue.add_after(key, delay)
            return
        self.queue.forget(key)
        metrics.RECONCILES.labels("ok").inc()
        metrics.record_stages(run.get("status") or {}, d.status)
        metrics.record_phase(run["metadata"]["uid"], None if d.delete_run else d.status["phase"])
        if d.requeue is not None:
            log.debug("FusionRun %s/%s: looking again in %.0fs (%s)", *key, d.requeue, d.reason)
            self.queue.add_after(key, d.requeue)

    def _mark_invalid(self, run: Obj, message: str) -> None:
        """A spec the cluster cannot run: Failed with the reason, one InvalidSpec Event (not repeated)."""
        meta, old = run["metadata"], run.get("status") or {}
        if old.get("phase") == "Failed" and old.get("message") == message:
            return
        now = datetime.now(UTC)
        gen = meta.get("generation", 1)
        status = {"phase": "Failed", "message": message, "observedGeneration": gen,
                  "conditions": derive_conditions("Failed", message, gen, old.get("conditions") or [], now)}
        try:
            self.kube.merge_patch("FusionRun", meta["namespace"], meta["name"], {"status": status}, sub="status")
            self.kube.event(run, "Warning", "InvalidSpec", message, timestamp(now))
        except Exception as e:  # noqa: BLE001 - retried on the next change of the run
            log.warning("FusionRun %s/%s: cannot record the invalid spec: %s", meta["namespace"], meta["name"], e)

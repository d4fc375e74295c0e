"""Leader election over a coordination.k8s.io Lease (docs/operator.md, "Replicas"), with the Kubernetes
client's `kubernetes.leaderelection`: of several replicas, only the one holding the Lease acts; the others
keep their watches and caches warm and take over when the Lease is not renewed for `lease_seconds`.

A leader that cannot renew in time stops acting and exits (its Deployment restarts it as a follower), as
Kubernetes' own controllers do: two replicas never act on one run. On a clean shutdown it releases the
Lease so that a follower takes over at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("wrpo_operator")


@dataclass
class ElectionSettings:
    namespace: str
    name: str = "wrpo-operator"
    identity: str = ""
    lease_seconds: int = 15
    renew_seconds: int = 10
    retry_seconds: int = 2

    @classmethod
    def from_env(cls) -> ElectionSettings | None:
        """WRPO_OPERATOR_LEADER_ELECTION=true turns it on (the chart sets it); None when off."""
        if os.environ.get("WRPO_OPERATOR_LEADER_ELECTION", "false") != "true":
            return None
        env = os.environ.get
        identity = env("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        return cls(namespace=env("WRPO_OPERATOR_LEASE_NAMESPACE") or env("POD_NAMESPACE") or "default",
                   name=env("WRPO_OPERATOR_LEASE_NAME", "wrpo-operator"),
                   identity=f"{identity}_{uuid.uuid4().hex[:8]}",
                   lease_seconds=int(env("WRPO_OPERATOR_LEASE_SECONDS", "15")),
                   renew_seconds=int(env("WRPO_OPERATOR_RENEW_SECONDS", "10")),
                   retry_seconds=int(env("WRPO_OPERATOR_RETRY_PERIOD_SECONDS", "2")))

    def check(self) -> None:
        if not (self.lease_seconds > self.renew_seconds > 1.2 * self.retry_seconds >= 1.2):
            raise ValueError("leader election needs lease > renew deadline > 1.2 × retry period ≥ 1.2 s; got "
                             f"{self.lease_seconds}, {self.renew_seconds}, {self.retry_seconds}")


class LeaderElector:
    def __init__(self, settings: ElectionSettings, kube: Any, on_lead, on_lose=None):
        settings.check()
        self.settings, self.kube = settings, kube
        self.on_lead, self.on_lose = on_lead, on_lose or _exit
        self.leading = False
        self._thread: threading.Thread | None = None

    def start(self) -> LeaderElector:
        self._thread = threading.Thread(target=self._run, name="wrpo-leader-election", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        from kubernetes.leaderelection import electionconfig, leaderelection
        from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

        s = self.settings
        logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every retry at INFO
        lock = LeaseLock(s.name, s.namespace, s.identity)
        config = electionconfig.Config(lock, s.lease_seconds, s.renew_seconds, s.retry_seconds,
                                       self._lead, self._lose)
        log.info("leader election: %s is a candidate for Lease %s/%s", s.identity, s.namespace, s.name)
        leaderelection.LeaderElection(config).run()

    def _lead(self) -> None:
        self.leading = True
        log.info("leader election: %s holds Lease %s/%s", self.settings.identity, self.settings.namespace,
                 self.settings.name)
        self.on_lead()

    def _lose(self) -> None:
        if not self.leading:
            return
        self.leading = False
        log.error("leader election: lost Lease %s/%s; stopping", self.settings.namespace, self.settings.name)
        self.on_lose()

    def release(self) -> None:
        """Give the Lease up (a clean shutdown), so that a follower takes over without waiting."""
        if not self.leading:
            return
        self.leading = False
        s = self.settings
        try:
            self.kube.request("patch", "Lease", "PATCH",
                              f"/apis/coordination.k8s.io/v1/namespaces/{s.namespace}/leases/{s.name}",
                              body={"spec": {"holderIdentity": None}},
                              content_type="application/merge-patch+json")
            log.info("leader election: released Lease %s/%s", s.namespace, s.name)
        except Exception as e:  # noqa: BLE001 - the Lease then simply expires
            log.warning("leader election: could not release the Lease: %s", e)


def _exit() -> None:
    """Stop the whole operator (kopf shuts down on SIGTERM); its Deployment starts it again."""
    os.kill(os.getpid(), signal.SIGTERM)

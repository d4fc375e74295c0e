"""The operator as the cluster tests run it (docs/cluster-harness.md): `python -m wrpo_operator` as a local
process acting as the chart's ServiceAccount, and small helpers to create, patch and wait for FusionRuns.
The fixtures that use them (`run_namespace`, `operator`, `apis`) are in conftest.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from wrpo.data.serving import free_port
from wrpo_operator import GROUP, LABEL_RUN, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wrpo-operator"
RELEASE = "wrpo-operator"
HOLD = "wrpo.test/hold"  # kwok keeps such a pod Running until the annotation is removed (kwok/stages.yaml)


def tiny_spec(**cluster) -> dict:
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["cluster"].update(cluster)
    return pin_backend(spec)


def pin_backend(spec: dict, backend: str = "pytorchjob") -> dict:
    """`cluster.training.backend` set when the spec leaves it to `auto`: the session's apiserver serves TrainJob
    too once a test has started the controllers (`k8s_controllers`), so `auto` would pick by test order. The
    tests of `auto` itself use an apiserver of their own (test_operator_backend_auto.py)."""
    spec["cluster"].setdefault("training", {}).setdefault("backend", backend)
    return spec


class Operator:
    """`python -m wrpo_operator` as a local process acting as the chart's ServiceAccount. `env` adds
    WRPO_OPERATOR_* settings (leader election: as the chart sets them)."""

    def __init__(self, identity, namespace: str, log: Path, env: dict[str, str] | None = None,
                 log_level: str = "--debug"):
        self.identity, self.namespace, self.log = identity, namespace, log
        self.extra_env = env or {}
        self.log_level = log_level  # a kopf run option: --debug, --verbose, --quiet, or "" for info
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self, wait_live: bool = True) -> Operator:
        env = {**os.environ, **self.identity.env(),
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]),
               "WRPO_OPERATOR_RETRY_SECONDS": "2",
               "WRPO_OPERATOR_METRICS_PORT": str(self.metrics_port),
               "WRPO_OPERATOR_SCANNING": "false",  # as the chart sets it in namespace scope
               **self.extra_env}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [sys.executable, "-m", "wrpo_operator", "--standalone", f"--namespace={self.namespace}",
                f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
                *([self.log_level] if self.log_level else [])]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        if wait_live:
            wait(lambda: self._get(f"http://127.0.0.1:{self.liveness_port}/healthz"), 180, "operator liveness",
                 self)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _get(self, url: str) -> str | None:
        assert self.process and self.process.poll() is None, f"operator exited:\n{self.tail()}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        text = self._get(f"http://127.0.0.1:{self.metrics_port}/metrics") or ""
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(wrpo_\w+)(\{[^}]*\})? ([0-9.e+]+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return out

    def kopf_patches(self) -> int:
        """PATCHes kopf itself sent (progress/diff-base annotations, finalizers): none are expected."""
        return len(re.findall(r"Merge-patching the (?:resource|status) with", self.log.read_text()))

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def _transient(e: Exception) -> bool:
    """A server error (5xx) or a dropped connection: the condition is unknown yet, not false."""
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    return (isinstance(e, ApiException) and (e.status or 0) >= 500) or isinstance(e, HTTPError | ConnectionError)


def wait(check, timeout: float, what: str, operator: Operator | None = None, interval: float = 0.5,
         seen=None):
    """`check()` once it is truthy. A timeout is a hang detector: the error names the condition (`what`), the
    last value `check` returned, what `seen()` describes then (when given), and the operator's log tail."""
    deadline = time.monotonic() + timeout
    value, error = None, None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient
            if not _transient(e):
                raise
            error = e  # an overloaded apiserver answers 5xx (504 Gateway Timeout) now and then: not yet
        else:
            if value:
                return value
        time.sleep(interval)
    saw = f"; last check returned {value!r}" + (f" (last transient error: {error})" if error else "") + \
        (f"; then: {seen()}" if seen else "")
    detail = operator.tail() if operator else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{saw}\n{detail}")


def create_run(custom, ns: str, name: str, spec: dict, annotations: dict | None = None) -> dict:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FusionRun",
            "metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def patch_run(custom, ns, name, patch: dict) -> dict:
    return custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch,
                                                 _content_type="application/merge-patch+json")


def get_run(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def wait_phase(custom, ns, name, phases, timeout, operator, generation: int = 0) -> dict:
    """The run's status once its phase is one of `phases` (for a status of at least `generation`: after a
    spec change, pass the generation the patch returned)."""
    phases = {phases} if isinstance(phases, str) else set(phases)

    last: dict = {}

    def check():
        last.update(status=get_run(custom, ns, name).get("status") or {})
        status = last["status"]
        fresh = (status.get("observedGeneration") or 0) >= generation
        return status if fresh and status.get("phase") in phases else None

    def seen() -> str:
        status = last.get("status") or {}
        stages = {s.get("name"): s.get("state") or s.get("phase") for s in status.get("stages") or []}
        return (f"phase {status.get('phase')!r}, observedGeneration {status.get('observedGeneration')} "
                f"(want ≥ {generation}), stages {stages}, message {status.get('message')!r}")

    return wait(check, timeout, f"FusionRun {name} phase in {phases}", operator, seen=seen)


def children(apis, ns, name) -> dict[str, list[dict]]:
    """The run's children by its label; without the Jobs JobSet makes for its TrainJobs, which carry the label
    too (copied from the runtime) but are the JobSet's."""
    custom, batch, apps, core = apis
    sel = f"{LABEL_RUN}={name}"
    jobs = batch.list_namespaced_job(ns, label_selector=sel).to_dict()["items"]
    return {
        "Job": [j for j in jobs if not any(r["controller"] and r["kind"] != "FusionRun"
                                           for r in j["metadata"].get("owner_references") or [])],
        "Deployment": apps.list_namespaced_deployment(ns, label_selector=sel).to_dict()["items"],
        "Service": core.list_namespaced_service(ns, label_selector=sel).to_dict()["items"],
        "ConfigMap": core.list_namespaced_config_map(ns, label_selector=sel).to_dict()["items"],
        "PyTorchJob": custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs",
                                                           label_selector=sel)["items"],
        "TrainJob": _trainjobs(custom, ns, sel),
    }


def _trainjobs(custom, ns: str, selector: str) -> list[dict]:
    """The TrainJobs with `selector`; none where Trainer's CRD is not installed (no controllers started)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return custom.list_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs",
                                                    label_selector=selector)["items"]
    except ApiException as e:
        if e.status == 404:
            return []
        raise


def events(core, ns, name) -> list[tuple[str, str, str]]:
    items = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    items.sort(key=lambda e: (e.first_timestamp or e.event_time, e.metadata.creation_timestamp))
    ours = [e for e in items if e.source and e.source.component == "wrpo-operator"]
    return [(e.type, e.reason, e.message) for e in ours]




def wait_events(core, ns: str, name: str, reasons: set[str], timeout: float = 120,
                operator: Operator | None = None) -> list[tuple[str, str, str]]:
    """The run's Events once every reason in `reasons` is among them (the operator posts Events from a
    background thread, just after the status patch that caused them)."""
    def check():
        evs = events(core, ns, name)
        return evs if reasons <= {r for _, r, _ in evs} else None

    return wait(check, timeout, f"Events {sorted(reasons)} of {name}", operator)


class Releaser(threading.Thread):
    """Removes the hold annotation (HOLD) from every held pod of the namespace, until stopped: started once
    the test's fault happened, it lets the held pods (and every later one) complete."""

    def __init__(self, core, ns: str):
        super().__init__(daemon=True)
        self.core, self.ns = core, ns
        self.stop = threading.Event()

    def run(self) -> None:  # noqa: D102 - threading.Thread
        from kubernetes.client.rest import ApiException

        while not self.stop.is_set():
            for pod in self.core.list_namespaced_pod(self.ns).items:
                if HOLD in (pod.metadata.annotations or {}):
                    with contextlib.suppress(ApiException):  # gone meanwhile
                        self.core.patch_namespaced_pod(pod.metadata.name, self.ns,
                                                       {"metadata": {"annotations": {HOLD: None}}})
            self.stop.wait(0.2)

"""kopf registration only (docs/architecture.md, "Operator"): create, resume and update call `reconcile`, and so
does a timer that catches drift while nothing else happens. Waiting is `TemporaryError(delay=...)`; a spec the
cluster cannot run is `PermanentError` (after writing it into the status)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import kopf

from wrpo.errors import SpecError
from wrpo_operator import GROUP, PLURAL, VERSION, metrics
from wrpo_operator.kube import ApiError, Kube
from wrpo_operator.reconcile import Settings, reconcile
from wrpo_operator.status import derive_conditions, timestamp

log = logging.getLogger("wrpo_operator")
STATE: dict[str, Any] = {}  # the Kube client and settings, made at startup


def _kube() -> Kube:
    if "kube" not in STATE:
        from kubernetes import client, config

        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
        else:
            config.load_kube_config()
        STATE["kube"] = Kube(client.ApiClient())
    return STATE["kube"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf keeps its bookkeeping in annotations: the status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.enabled = False  # reconcile posts one Event per transition itself
    settings.watching.server_timeout = 300
    settings.execution.max_workers = int(os.environ.get("WRPO_OPERATOR_WORKERS", "4"))
    # Namespace scope has no RBAC to watch Namespaces and CRDs: without this kopf retries those
    # LISTs for about a minute before it falls back to the namespaces it was given.
    settings.scanning.disabled = os.environ.get("WRPO_OPERATOR_SCANNING", "true") == "false"
    STATE["settings"] = Settings.from_env()
    _kube()
    metrics.serve(int(os.environ.get("WRPO_OPERATOR_METRICS_PORT", "9090")))


def _plain(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(body, default=dict))


def run_once(body: Any, *, raise_waiting: bool = True) -> None:
    """One reconcile with the operator's client; translate its outcome into kopf's vocabulary."""
    run, kube = _plain(body), _kube()
    before = Counter(kube.calls)
    try:
        d = reconcile(run, kube, settings=STATE.get("settings"))
    except SpecError as e:
        metrics.RECONCILES.labels("invalid").inc()
        _mark_invalid(run, kube, str(e))
        raise kopf.PermanentError(str(e)) from None
    except ApiError as e:
        metrics.RECONCILES.labels("error").inc()
        raise kopf.TemporaryError(f"apiserver: {e}", delay=30) from None
    finally:
        metrics.record_calls(Counter(kube.calls) - before)
    metrics.RECONCILES.labels("ok").inc()
    metrics.record_stages(run.get("status") or {}, d.status)
    metrics.record_phase(run["metadata"]["uid"], None if d.delete_run else d.status["phase"])
    if d.requeue is not None and raise_waiting:
        raise kopf.TemporaryError(d.reason, delay=d.requeue)


def _mark_invalid(run: dict[str, Any], kube: Kube, message: str) -> None:
    meta, old = run["metadata"], run.get("status") or {}
    if old.get("phase") == "Failed" and old.get("message") == message:
        return
    now = datetime.now(UTC)
    gen = meta.get("generation", 1)
    status = {"phase": "Failed", "message": message, "observedGeneration": gen,
              "conditions": derive_conditions("Failed", message, gen, old.get("conditions") or [], now)}
    kube.merge_patch("FusionRun", meta["namespace"], meta["name"], {"status": status}, sub="status")
    kube.event(run, "Warning", "InvalidSpec", message, timestamp(now))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def fusionrun(body: kopf.Body, **_: Any) -> None:
    run_once(body)


@kopf.timer(GROUP, VERSION, PLURAL, interval=60, idle=60, initial_delay=60)
def drift(body: kopf.Body, **_: Any) -> None:
    run_once(body, raise_waiting=False)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget(body: kopf.Body, **_: Any) -> None:
    """Children go by garbage collection (owner references); only the metrics forget the run."""
    metrics.record_phase(body["metadata"]["uid"], None)

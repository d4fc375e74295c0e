"""kopf registration only (docs/architecture.md, "Operator"; docs/operator.md, "Reconcile"): watch-event
handlers feed the controller's cache and wake the run concerned; the controller's workers reconcile.

Only `on.event` and `index` handlers are registered — no create/update/resume handlers, no timers, no
daemons — so kopf keeps no state in the FusionRuns (no annotations) and adds no finalizer: a run deleted
while no operator runs is deleted at once, and garbage collection removes its children. The children's
watches are filtered on the apiserver by the `fusion.wrpo.io/run` label, the Events' by `type=Warning`;
Kueue's Workloads carry no label of ours and are watched whole (none without Kueue: kopf serves only the
resources the apiserver has; queueing.py).

The `index` handlers put every object into the cache as kopf lists and watches it; kopf holds every
`on.event` handler back until the initial lists of all indexed kinds are done, so no run is reconciled
(and nothing created twice) before the cache holds all of its children.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import kopf

from wrpo_operator import GROUP, LABEL_RUN, PLURAL, VERSION, metrics
from wrpo_operator.controller import Controller
from wrpo_operator.decide import Settings
from wrpo_operator.kube import Kube
from wrpo_operator.leader import ElectionSettings, LeaderElector
from wrpo_operator.queueing import WORKLOADS

log = logging.getLogger("wrpo_operator")
STATE: dict[str, Any] = {}  # the controller and the elector, made at startup

#: (group, version, plural) of every child kind, of pods, and of Events.
CHILDREN = (("", "v1", "configmaps"), ("", "v1", "services"), ("", "v1", "persistentvolumeclaims"),
            ("apps", "v1", "deployments"), ("batch", "v1", "jobs"), ("kubeflow.org", "v1", "pytorchjobs"),
            ("trainer.kubeflow.org", "v1alpha1", "trainjobs"), ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes"))
PODS = ("", "v1", "pods")
EVENTS = ("", "v1", "events")


def _kube() -> Kube:
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return Kube(client.ApiClient())


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False  # reconcile posts one Event per transition itself
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # kopf logs every watch event a handler saw at INFO; below --debug that is noise at scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    # Namespace scope has no RBAC to watch Namespaces and CRDs: without this kopf retries those
    # LISTs for about a minute before it falls back to the namespaces it was given.
    settings.scanning.disabled = os.environ.get("WRPO_OPERATOR_SCANNING", "true") == "false"
    for resource in (*CHILDREN, PODS):
        settings.watching.label_selectors[resource] = LABEL_RUN
    settings.watching.field_selectors[EVENTS] = "type=Warning"
    election = ElectionSettings.from_env()
    # Workers mostly wait for the apiserver (0.4 s a request under a burst of 100 new runs on the harness):
    # 16 keep the first children of 100 runs applied at once within seconds (docs/operator.md, "Scale").
    workers = int(os.environ.get("WRPO_OPERATOR_WORKERS", "16"))
    controller = Controller(_kube(), Settings.from_env(), workers=workers, acting=election is None)
    STATE["controller"] = controller.start()
    metrics.LEADER.set(0 if election else 1)
    if election is not None:
        STATE["elector"] = LeaderElector(election, controller.kube, controller.lead).start()
    metrics.serve(int(os.environ.get("WRPO_OPERATOR_METRICS_PORT", "9090")))


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    controller = STATE.pop("controller", None)
    if controller is not None:
        controller.stop()
    elector = STATE.pop("elector", None)
    if elector is not None:
        elector.release()


def _plain(body: Any) -> dict[str, Any]:
    return json.loads(json.dumps(body, default=dict))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def fusionrun_event(event: dict[str, Any], **_: Any) -> None:
    if "controller" in STATE:
        STATE["controller"].run_event(event.get("type"), _plain(event["object"]))


async def child_event(event: dict[str, Any], **_: Any) -> None:
    """A child, a pod or a Warning Event changed: into the cache, and its run onto the work queue (async: it
    only updates memory, so it runs in kopf's event loop, not in a thread)."""
    if "controller" in STATE:
        STATE["controller"].child_event(event.get("type"), _plain(event["object"]))


async def remember(body: kopf.Body, **_: Any) -> None:
    """Index handler: into the cache, as kopf lists and watches (nothing is kept in kopf's index)."""
    if "controller" in STATE:
        STATE["controller"].cache.put(_plain(body))


async def remember_run(body: kopf.Body, **_: Any) -> None:
    if "controller" in STATE:
        STATE["controller"].cache.put_run(_plain(body))


kopf.index(GROUP, VERSION, PLURAL, id="cache-fusionruns")(remember_run)
for _group, _version, _plural in (*CHILDREN, PODS):
    kopf.index(_group, _version, _plural, labels={LABEL_RUN: kopf.PRESENT}, id=f"cache-{_plural}")(remember)
    kopf.on.event(_group, _version, _plural, labels={LABEL_RUN: kopf.PRESENT}, id=f"watch-{_plural}")(child_event)
kopf.index(*EVENTS, id="cache-warnings")(remember)
kopf.on.event(*EVENTS, id="watch-warnings")(child_event)
kopf.index(*WORKLOADS, id="cache-workloads")(remember)
kopf.on.event(*WORKLOADS, id="watch-workloads")(child_event)

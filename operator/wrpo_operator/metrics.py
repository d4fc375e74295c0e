"""Prometheus metrics of the operator (served on WRPO_OPERATOR_METRICS_PORT, default 9090)."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from wrpo_operator.status import parse_time

RUNS = Gauge("wrpo_fusionruns", "FusionRuns seen by this operator, by phase.", ["phase"])
STAGE_SECONDS = Histogram(
    "wrpo_stage_duration_seconds", "Wall time of committed stages (first child created → Job succeeded).",
    ["stage"], buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800),
)
RECONCILES = Counter("wrpo_reconciles_total", "Reconciles of FusionRuns, by result.", ["result"])
API_CALLS = Counter("wrpo_apiserver_requests_total", "Requests the reconciler sent, by verb and kind.",
                    ["verb", "kind"])
API_SECONDS = Histogram("wrpo_apiserver_request_seconds", "Time the apiserver took to answer the reconciler.",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LEADER = Gauge("wrpo_operator_leader", "1 while this replica acts (the leader, or leader election off).")
PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")

_lock = threading.Lock()
_phase_of: dict[str, str] = {}


def record_phase(uid: str, phase: str | None) -> None:
    """Remember a run's phase (None: the run is gone) and refresh the per-phase gauge."""
    with _lock:
        if phase is None:
            _phase_of.pop(uid, None)
        else:
            _phase_of[uid] = phase
        for p in PHASES:
            RUNS.labels(p).set(sum(v == p for v in _phase_of.values()))


def record_stages(old: dict, new: dict) -> None:
    """Observe the duration of every stage that committed between two statuses."""
    before = {s["name"]: s.get("state") for s in old.get("stages") or []}
    for s in new.get("stages") or []:
        if s.get("state") == "Succeeded" and before.get(s["name"]) != "Succeeded" and s.get("startTime"):
            seconds = (parse_time(s["completionTime"]) - parse_time(s["startTime"])).total_seconds()
            STAGE_SECONDS.labels(s["name"]).observe(seconds)


def serve(port: int) -> None:
    if port:
        start_http_server(port)

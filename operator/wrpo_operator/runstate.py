"""The one thing the operator reads from the run directory: which units are committed
(docs/operator.md, "GPU budget and units").

Before it starts a source's vLLM server the operator checks the unit's commit marker
(`<run>/<stage>/_units/<unit>.json`, written by `wrpo stage` after the unit's objects): a unit committed
with its current hash - by an earlier FusionRun on the same `storage.runUri`, or one deleted and
re-created - gets no server. `RunState` reads the markers once per run, stage and stage hash (the units
that commit later are known from their Jobs) and remembers a failed read for a while; a read that fails
(no credentials, no route to the endpoint) only costs the servers it would have saved. Credentials come
from the operator's own environment (the chart's `runState.credentialsSecret`, or an instance/pod role),
never from the runs' Secrets. boto3 is imported only here and only when a check is made, so the operator
still imports no heavy library at start.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from wrpo.pipeline.plan import plan_hashes
from wrpo.pipeline.spec import FusionSpec

_KEYS = {"AWS_ACCESS_KEY_ID": "access_key_id", "AWS_SECRET_ACCESS_KEY": "secret_access_key",
         "AWS_SESSION_TOKEN": "session_token"}


def credentials(secret: dict[str, Any] | None) -> dict[str, str]:
    """S3Options keyword arguments from a Secret object (its base64 `data`)."""
    data = (secret or {}).get("data") or {}
    return {_KEYS[k]: base64.b64decode(v).decode() for k, v in data.items() if k in _KEYS}


def committed_units(spec: FusionSpec, stage: str, secret: dict[str, Any] | None = None) -> set[str]:
    """The units of `stage` committed with their current hash; raises WrpoError when the run directory
    cannot be read (the caller then relies on the units' Jobs)."""
    from wrpo.pipeline.rundir import RunDir
    from wrpo.storage import S3Options

    units = plan_hashes(spec).units.get(stage, {})
    if not units or not spec.storage.run_uri:
        return set()
    base = S3Options.from_spec(spec.storage)
    s3 = S3Options(endpoint_url=base.endpoint_url, region=base.region, max_attempts=2, connect_timeout_s=3.0,
                   read_timeout_s=10.0, **credentials(secret))
    markers = RunDir(spec.storage.run_uri, s3).stage(stage).committed_units()  # StorageError: a WrpoError
    return {u for u, m in markers.items() if units.get(u) == m.get("hash")}


log = logging.getLogger("wrpo_operator.runstate")


class RunState:
    """`committed(uid, spec, stage)`: the stage's units committed with their hash, read once per (run,
    stage, stage hash); a failed read yields no units and is tried again after `retry_s`."""

    def __init__(self, read: Callable[[FusionSpec, str], set[str]] = committed_units, retry_s: float = 300.0,
                 size: int = 4096):
        self._read, self._retry_s, self._size = read, retry_s, size
        self._memo: OrderedDict[tuple[str, str, str], tuple[set[str], float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def committed(self, uid: str, spec: FusionSpec, stage: str) -> set[str]:
        key = (uid, stage, plan_hashes(spec).stages[stage])
        with self._lock:
            hit = self._memo.get(key)
        if hit is not None and (hit[1] is None or time.monotonic() < hit[1]):
            return hit[0]
        try:
            found, until = self._read(spec, stage), None
        except Exception as e:  # noqa: BLE001 - any failure: fall back to the units' Jobs
            log.warning("cannot read the committed units of %s in %s (%s): the units' Jobs tell instead",
                        stage, spec.storage.run_uri, type(e).__name__)
            found, until = set(), time.monotonic() + self._retry_s
        with self._lock:
            self._memo[key] = (found, until)
            self._memo.move_to_end(key)
            while len(self._memo) > self._size:
                self._memo.popitem(last=False)
        return found

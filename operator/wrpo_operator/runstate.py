"""The one thing the operator reads from the run directory: which units are committed
(docs/operator.md, "GPU budget and units").

Before it starts a source's vLLM server the operator checks the unit's commit marker
(`<run>/<stage>/_units/<unit>.json`, written by `wrpo stage` after the unit's objects): a unit committed
with its current hash - by an earlier run on the same `storage.runUri`, or before the operator
restarted - gets no server. Credentials come from the run's `storage.credentialsSecret` (read when the
check is made, never logged or stored) or the operator's own environment (an instance/pod role).
boto3 is imported only here and only when a check is made, so the operator still imports no heavy
library at start.
"""

from __future__ import annotations

import base64
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

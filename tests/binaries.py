"""Outside programs some tests run (helm, kubectl, podman, containerd, ctr, mmdebstrap, skopeo...).

A test that needs one calls `require_binary`: where the program is absent the test skips and says which
program and where it was looked for, except in CI (`CI=true`) or with `WRPO_REQUIRE_ALL=1` (or the
test layer's own `WRPO_REQUIRE_*` variable), where absence is a failure: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest


def required(*variables: str) -> bool:
    """True in CI, with WRPO_REQUIRE_ALL=1, or when one of `variables` (e.g. WRPO_REQUIRE_CLUSTER) is 1."""
    return os.environ.get("CI") == "true" or any(os.environ.get(v) == "1" for v in ("WRPO_REQUIRE_ALL", *variables))


def missing(message: str, *variables: str) -> None:
    """Skip with `message`, or fail with it where everything is required (see `required`)."""
    if required(*variables):
        pytest.fail(f"required here (CI=true or WRPO_REQUIRE_*=1) but {message}", pytrace=False)
    pytest.skip(message)


def find_binary(name: str, candidates: Iterable[str | Path] = ()) -> str | None:
    """The first executable among `candidates`, else `name` on PATH, else None."""
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


def require_binary(name: str, candidates: Iterable[str | Path] = (), hint: str = "", *variables: str) -> str:
    """The path of program `name` (see `find_binary`); skips or fails (see `missing`) without it."""
    candidates = list(candidates)
    found = find_binary(name, candidates)
    if found is None:
        where = ", ".join(map(str, [*candidates, "PATH"]))
        missing(f"{name} not found (looked in {where}){': ' + hint if hint else ''}", *variables)
    return found

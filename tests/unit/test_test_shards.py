"""$WRPO_TEST_SHARD (tests/conftest.py): scripts/test.sh runs the cluster tests as shards side by side, so the
shards must split exactly what `-m` selected, whole files each, and a malformed value must stop the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECT = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cluster and not heavy", "tests/cluster"]


def _collect(shard: str) -> tuple[int, list[str]]:
    env = {**os.environ, "WRPO_TEST_SHARD": shard}
    proc = subprocess.run(COLLECT, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, [line for line in proc.stdout.splitlines() if "::" in line]


def test_two_shards_split_the_selection_by_whole_files():
    rc, everything = _collect("")
    assert rc == 0 and everything
    rc0, first = _collect("0/2")
    rc1, second = _collect("1/2")
    assert rc0 == rc1 == 0 and first and second
    assert sorted(first + second) == sorted(everything) and not set(first) & set(second)
    files = [{t.split("::")[0] for t in shard} for shard in (first, second)]
    assert not files[0] & files[1]  # no file in both: its module fixtures are set up once


def test_a_malformed_shard_stops_the_run_naming_the_variable():
    proc = subprocess.run(COLLECT, cwd=ROOT, env={**os.environ, "WRPO_TEST_SHARD": "2/2"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "WRPO_TEST_SHARD='2/2': expected K/N" in proc.stdout + proc.stderr

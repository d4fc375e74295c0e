"""Fault tests of the sampling stage: a killed sampling process resumes without re-asking committed shards.
The server here is the STAND-IN of tests/openai_standin.py (it logs every request); 500/429 recovery is in
tests/unit/test_sampling.py against the same stand-in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from openai_standin import StandIn

from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo.records import SampleRecord, dump_jsonl, parse_jsonl

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def spec_for(tmp_path: Path, n_prompts: int):
    data = tmp_path / "prompts.jsonl"
    rows = ({"prompt_id": f"p{i:02d}", "prompt": f"question {i}"} for i in range(n_prompts))
    data.write_text(dump_jsonl(rows))
    return parse_spec({
        "target": {"model": "unused"},
        "sources": [{"name": "src-a", "endpoint": {"url": "http://127.0.0.1:1/v1", "model": "m"}}],
        "reward": {"type": "sequence-classification", "model": "unused"},
        "dataset": {"uri": str(data), "sftFraction": 0.5},
        "sampling": {"n": 2, "concurrency": 1, "shardSize": 2, "maxRetries": 2},
    })


SCRIPT = textwrap.dedent("""
    import sys
    from wrpo.data.stages import sample_sources
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.rundir import RunDir
    from wrpo.pipeline.runtime import context_for
    from wrpo.pipeline.spec import FusionSpec
    spec = FusionSpec.model_validate_json(open(sys.argv[1]).read())
    run = RunDir(sys.argv[2])
    sample_sources(context_for(spec, run, "sample-sources", StageOptions(endpoints={"src-a": sys.argv[3]}),
                               unit="src-a"))
""")


def test_killed_sampling_resumes_without_rerequesting_committed_shards(tmp_path):
    from wrpo.data.stages import prepare, sample_sources
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.runtime import context_for

    spec = spec_for(tmp_path, 12)
    run = RunDir(str(tmp_path / "run"))
    ctx = context_for(spec, run, "prepare")
    prepare(ctx)
    ctx.out.commit("h")
    # one request per prompt (concurrency 1), shards of 2 prompts: the stand-in answers 4 requests and holds
    # the 5th, so the process is killed at a known point: exactly 2 shards committed, the 3rd in flight
    server = StandIn(hold_after=4).start()
    try:
        (tmp_path / "spec.json").write_text(spec.model_dump_json(by_alias=True))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "spec.json"), run.uri,
                                 server.base_url], env=env, start_new_session=True)
        deadline = time.monotonic() + 300  # a hang detector: this takes seconds

        def shards() -> int:
            return len(run.stage("sample-sources").committed_shards("src-a"))

        while not (shards() == 2 and len(server.requests) == 5):
            assert proc.poll() is None, f"sampling ended ({proc.returncode}) before its held request"
            assert time.monotonic() < deadline, f"after 300 s: {shards()} shards, {len(server.requests)} requests"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        server.hold_after = None
        committed = run.stage("sample-sources").committed_shards("src-a")
        assert len(committed) == 2
        done_prompts = [json.loads(line)["prompt_id"] for info in committed.values()
                        for line in run.stage("sample-sources").read_shard(info).decode().splitlines()]
        assert not (tmp_path / "run" / "sample-sources" / "src-a.jsonl").exists()
        asked_before = len(server.requests)

        summary = sample_sources(context_for(spec, run, "sample-sources",
                                             StageOptions(endpoints={"src-a": server.base_url}), unit="src-a"))
    finally:
        server.stop()
    assert summary["shards_reused"] == len(committed)
    asked_after = Counter(f"p{int(r.prompt.split()[-1]):02d}" for r in server.requests[asked_before:])
    for pid in done_prompts:
        assert asked_after[pid] == 0, f"{pid} was asked again"
    assert sum(asked_after.values()) == 12 - len(done_prompts)
    recs = parse_jsonl((tmp_path / "run" / "sample-sources" / "src-a.jsonl").read_text(), SampleRecord, "x")
    assert sorted(r.prompt_id for r in recs) == sorted(f"p{i:02d}" for i in range(12))
    assert all(len(r.responses) == 2 for r in recs)


def test_bad_input_writes_nothing(tmp_path):
    from wrpo.data.stages import prepare
    from wrpo.errors import DataError
    from wrpo.pipeline.runtime import context_for

    spec = spec_for(tmp_path, 3)
    Path(spec.dataset.uri).write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "b", "prompt": \n')
    run = RunDir(str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"prompts.jsonl:2: malformed JSON"):
        prepare(context_for(spec, run, "prepare"))
    assert not (tmp_path / "run" / "prepare").exists()

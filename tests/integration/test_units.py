"""Units and shards (docs/architecture.md, "Units and shards"): sample-sources and score-sources commit
one unit per source, so adding or fixing one source redoes only that source; a scoring stage split into
K shards commits each part on its own and assembles the same objects as one invocation.

Sources are external endpoints served by the OpenAI stand-in (tests/openai_standin.py, which logs every
request, so a test can see that nothing was asked again); the reward model is the real tiny one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_standin import StandIn

from wrpo.errors import WrpoError
from wrpo.pipeline.context import StageOptions
from wrpo.pipeline.plan import plan_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.runtime import run_stage
from wrpo.pipeline.spec import FusionSpec, parse_spec
from wrpo.records import ScoreRecord, dump_jsonl, parse_jsonl

pytestmark = pytest.mark.integration
PROMPTS = 9


@pytest.fixture
def standins():
    servers: dict[str, StandIn] = {}

    def get(name: str, **kw) -> StandIn:
        servers[name] = StandIn(**kw).start()
        return servers[name]

    yield get
    for s in servers.values():
        s.stop()


def make_spec(tmp_path: Path, tiny_models: Path, sources: dict[str, StandIn]) -> FusionSpec:
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        data.write_text(dump_jsonl({"prompt_id": f"p{i}", "prompt": f"question {i}"} for i in range(PROMPTS)))
    return parse_spec({
        "target": {"model": str(tiny_models / "target")},
        "sources": [{"name": n, "endpoint": {"url": s.base_url, "model": n}} for n, s in sources.items()],
        "reward": {"type": "sequence-classification", "model": str(tiny_models / "reward"), "maxLength": 256},
        "dataset": {"uri": str(data), "sftFraction": 0.34},
        "sampling": {"n": 2, "concurrency": 2, "shardSize": 4, "maxRetries": 0},
    })


def run(spec: FusionSpec, rd: RunDir, tmp_path: Path, *names: str, **options):
    opts = StageOptions(workdir=str(tmp_path / "work"), **options)
    return {n: run_stage(spec, rd, n, opts) for n in names}


def test_adding_a_source_samples_and_scores_only_it(tmp_path, tiny_models, standins):
    a, b = standins("a"), standins("b")
    rd = RunDir(str(tmp_path / "run"))
    spec = make_spec(tmp_path, tiny_models, {"a": a, "b": b})
    first = run(spec, rd, tmp_path, "prepare", "sample-sources", "score-sources")
    assert first["sample-sources"].units == {"a": "done", "b": "done"}
    before = rd.stage("score-sources").manifest()["objects"]
    asked = len(a.requests), len(b.requests)
    assert asked == (PROMPTS, PROMPTS)

    c = standins("c")
    grown = make_spec(tmp_path, tiny_models, {"a": a, "b": b, "c": c})
    again = run(grown, rd, tmp_path, "prepare", "sample-sources", "score-sources")
    assert again["prepare"].status == "skipped"
    assert again["sample-sources"].units == {"a": "skipped", "b": "skipped", "c": "done"}
    assert again["score-sources"].units == {"a": "skipped", "b": "skipped", "c": "done"}
    assert (len(a.requests), len(b.requests), len(c.requests)) == (*asked, PROMPTS)
    after = rd.stage("score-sources").manifest()
    assert after["spec_hash"] == plan_hashes(grown).stages["score-sources"]
    assert {k: after["objects"][k] for k in before} == before  # a's and b's scores untouched
    scores = parse_jsonl(rd.stage("score-sources").read_text("c.jsonl"), ScoreRecord, "c")
    assert len(scores) == PROMPTS and all(len(s.scores) == 2 for s in scores)


def test_a_failed_source_leaves_the_others_committed(tmp_path, tiny_models, standins):
    a, b = standins("a"), standins("b", fail_statuses=[500] * 50)
    rd = RunDir(str(tmp_path / "run"))
    spec = make_spec(tmp_path, tiny_models, {"a": a, "b": b})
    run(spec, rd, tmp_path, "prepare")
    with pytest.raises(WrpoError, match="of b"):
        run(spec, rd, tmp_path, "sample-sources")
    sd = rd.stage("sample-sources")
    assert not sd.is_committed() and set(sd.committed_units()) == {"a"}
    b.fail_statuses.clear()  # the provider is back
    asked_a = len(a.requests)
    result = run(spec, rd, tmp_path, "sample-sources")["sample-sources"]
    assert result.status == "done" and result.units == {"a": "skipped", "b": "done"}
    assert len(a.requests) == asked_a


def test_one_unit_per_invocation_commits_the_stage_with_the_last(tmp_path, tiny_models, standins):
    a, b = standins("a"), standins("b")
    rd = RunDir(str(tmp_path / "run"))
    spec = make_spec(tmp_path, tiny_models, {"a": a, "b": b})
    run(spec, rd, tmp_path, "prepare")
    first = run(spec, rd, tmp_path, "sample-sources", units=["b"])["sample-sources"]
    assert first.status == "partial" and first.units == {"a": "pending", "b": "done"}
    assert not rd.stage("sample-sources").is_committed() and len(a.requests) == 0
    second = run(spec, rd, tmp_path, "sample-sources", units=["a"])["sample-sources"]
    assert second.status == "done" and rd.stage("sample-sources").is_committed()
    with pytest.raises(WrpoError, match="has no unit z"):
        run(spec, rd, tmp_path, "score-sources", units=["z"])


def test_a_sharded_scoring_stage_equals_one_invocation_and_retries_one_shard(tmp_path, tiny_models, standins,
                                                                              monkeypatch):
    import wrpo.data.stages as data_stages

    a, b = standins("a"), standins("b")
    spec = make_spec(tmp_path, tiny_models, {"a": a, "b": b})
    whole = RunDir(str(tmp_path / "whole"))
    run(spec, whole, tmp_path, "prepare", "sample-sources", "score-sources")

    sharded = RunDir(str(tmp_path / "sharded"))
    for name in ("prepare", "sample-sources"):  # the same inputs, copied as committed
        src = Path(whole.stage(name).uri())
        dst = Path(sharded.stage(name).uri())
        dst.mkdir(parents=True)
        for f in src.rglob("*"):
            if f.is_file():
                (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    calls: list[tuple[str, tuple[int, int]]] = []
    real = data_stages._score_file

    def counted(ctx, *args):
        calls.append((ctx.unit, ctx.shard))
        if ctx.shard == (1, 3) and calls.count((ctx.unit, ctx.shard)) == 1 and ctx.unit == "b":
            raise RuntimeError("shard pod killed")  # the first attempt of shard 1 dies in unit b
        return real(ctx, *args)

    monkeypatch.setattr(data_stages, "_score_file", counted)
    assert run(spec, sharded, tmp_path, "score-sources", shard=(0, 3))["score-sources"].status == "partial"
    with pytest.raises(RuntimeError, match="shard pod killed"):
        run(spec, sharded, tmp_path, "score-sources", shard=(1, 3))
    last = run(spec, sharded, tmp_path, "score-sources", shard=(2, 3))["score-sources"]
    # a's part 1 was committed before the kill, so shard 2 completes unit a; b still lacks part 1
    assert last.status == "partial" and last.units == {"a": "done", "b": "pending"}
    sd = sharded.stage("score-sources")
    assert set(sd.committed_units()) == {"a"} and not sd.is_committed()
    retry = run(spec, sharded, tmp_path, "score-sources", shard=(1, 3))["score-sources"]
    assert retry.status == "done"
    # the retry redid only its own work: a's part 1 was committed before the kill and is not redone
    assert calls == [("a", (0, 3)), ("b", (0, 3)), ("a", (1, 3)), ("b", (1, 3)), ("a", (2, 3)), ("b", (2, 3)),
                     ("b", (1, 3))]
    for src in ("a", "b"):
        one = parse_jsonl(whole.stage("score-sources").read_text(f"{src}.jsonl"), ScoreRecord, "whole")
        parts = parse_jsonl(sd.read_text(f"{src}.jsonl"), ScoreRecord, "sharded")
        assert [r.prompt_id for r in parts] == [r.prompt_id for r in one]
        for x, y in zip(parts, one, strict=True):
            # float32 forwards over other batches: summation order only, ≤ 100·√n·u32 relative with
            # n < 4·10^3, u32 = 2^-24 (tests/integration/test_train_multirank.py's REL32)
            assert x.scores == pytest.approx(y.scores, rel=3.8e-4, abs=3.8e-4)
    summary = sd.manifest()["summary"]["units"]
    assert summary["a"]["answers"] == 2 * PROMPTS
    assert json.loads(json.dumps(summary)) == summary
    with pytest.raises(WrpoError, match="cannot be split"):
        run(spec, sharded, tmp_path, "sample-sources", shard=(0, 2), force=True)

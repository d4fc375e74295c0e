"""The sampling client against a STAND-IN OpenAI-compatible server (tests/openai_standin.py): retries on
500/429, fewer choices than asked, shard resume, API keys, and vLLM batch files. Real vLLM is exercised in
tests/integration."""

from __future__ import annotations

import asyncio
import logging

import pytest
from openai_standin import StandIn

from wrpo.data.sampling import (
    ChatClient,
    SamplingError,
    SamplingParams,
    resolve_api_key,
    sample_group,
)
from wrpo.pipeline.rundir import RunDir
from wrpo.records import PromptRecord, SampleRecord, parse_jsonl

PARAMS = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_tokens=16, seed=5)


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(prompt_id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]


@pytest.fixture
def server():
    srv = StandIn().start()
    yield srv
    srv.stop()


def client(srv: StandIn, **kw) -> ChatClient:
    kw = {"concurrency": 4, "timeout_s": 10, "max_retries": 5, "backoff_initial_s": 0.01,
          "backoff_max_s": 0.05} | kw
    return ChatClient(srv.base_url, "m", **kw)


def run_group(srv: StandIn, out, ps, shard_size=2, **kw):
    async def go():
        async with client(srv, **kw) as c:
            return await sample_group(c, ps, PARAMS, out, "src", shard_size, progress=False)
    return asyncio.run(go())


def test_n_answers_in_one_request_with_parameters_recorded(server, tmp_path):
    out = RunDir(str(tmp_path)).stage("sample-sources").writer()
    summary = run_group(server, out, prompts(5))
    assert summary["prompts"] == 5 and summary["shards"] == 3 and summary["short_prompts"] == 0
    assert len(server.requests) == 5 and all(r.n == 3 for r in server.requests)
    recs = parse_jsonl((tmp_path / "sample-sources" / "src.jsonl").read_text(), SampleRecord, "src.jsonl")
    assert [r.prompt_id for r in recs] == [f"p{i}" for i in range(5)]
    r = recs[0]
    assert len(r.responses) == 3 and r.finish_reasons == ["stop", "length", "stop"]
    assert r.sampling["server_model"] == "standin-model" and r.sampling["temperature"] == 0.8
    assert r.sampling["n"] == 3 and r.model == "src"


def test_500_and_429_are_retried_nothing_lost_nothing_doubled(server, tmp_path):
    server.fail_statuses = [500, 429, 503, 500, 502]
    server.retry_after = "0"
    out = RunDir(str(tmp_path)).stage("s").writer()
    run_group(server, out, prompts(6))
    answered = server.answered()
    assert sorted(r.prompt for r in answered) == sorted(f"q{i}" for i in range(6))  # each exactly once
    assert len(server.requests) == 6 + 5
    recs = parse_jsonl((tmp_path / "s" / "src.jsonl").read_text(), SampleRecord, "src.jsonl")
    assert len(recs) == 6 and all(len(r.responses) == 3 for r in recs)


def test_retries_exhausted_is_a_clear_error_and_commits_nothing_partial(server, tmp_path):
    server.fail_statuses = [500] * 100
    out = RunDir(str(tmp_path)).stage("s").writer()
    with pytest.raises(SamplingError, match=r"prompt 'p\d' of src: .*giving up after 3 attempts"):
        run_group(server, out, prompts(2), max_retries=2)
    assert not (tmp_path / "s" / "src.jsonl").exists()
    assert out.stage.committed_shards("src") == {}


def test_non_retryable_status_fails_at_once(server, tmp_path):
    server.fail_statuses = [400]
    out = RunDir(str(tmp_path)).stage("s").writer()
    with pytest.raises(SamplingError, match="HTTP 400"):
        run_group(server, out, prompts(1))
    assert len(server.requests) == 1


def test_fewer_choices_are_topped_up(server, tmp_path):
    server.max_choices = 2
    out = RunDir(str(tmp_path)).stage("s").writer()
    summary = run_group(server, out, prompts(1))
    assert [r.n for r in server.requests] == [3, 1]
    assert server.requests[0].seed != server.requests[1].seed
    assert summary["short_prompts"] == 0
    server.max_choices = 0
    out2 = RunDir(str(tmp_path / "b")).stage("s").writer()
    summary = run_group(server, out2, prompts(1))
    assert summary["short_prompts"] == 1 and len(server.requests) == 2 + 3


def test_committed_shards_are_not_requested_again(server, tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("s").writer()
    run_group(server, out, prompts(4), shard_size=2)
    # forget shard 1's marker: as if the process died after writing its data but before the marker
    (tmp_path / "s" / "_shards" / "src" / "000001.jsonl.done").unlink()
    server.requests.clear()
    summary = run_group(server, run.stage("s").writer(), prompts(4), shard_size=2)
    assert sorted(r.prompt for r in server.requests) == ["q2", "q3"]
    assert summary["shards_reused"] == 1
    # a changed parameter invalidates the shards
    server.requests.clear()

    async def go():
        async with client(server) as c:
            return await sample_group(c, prompts(4), SamplingParams(n=2), run.stage("s").writer(), "src", 2,
                                      progress=False)
    asyncio.run(go())
    assert len(server.requests) == 4


def test_api_key_is_sent_but_never_logged(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MY_KEY", "sk-secret-123")
    key = resolve_api_key("MY_KEY")
    server.fail_statuses = [500]
    caplog.set_level(logging.DEBUG)
    c = client(server, api_key=key)
    assert "sk-secret" not in repr(c)
    out = RunDir(str(tmp_path)).stage("s").writer()

    async def go():
        async with c:
            return await sample_group(c, prompts(1), PARAMS, out, "src", 2, progress=False)
    asyncio.run(go())
    assert server.requests[-1].auth == "Bearer sk-secret-123"
    assert "sk-secret" not in caplog.text
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert resolve_api_key(None, str(f)) == "from-file"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(SamplingError, match="MY_KEY"):
        resolve_api_key("MY_KEY")
    assert resolve_api_key() is None


def test_connection_errors_are_retried_then_fail(tmp_path):
    from wrpo.data.serving import free_port

    c = ChatClient(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=2, backoff_initial_s=0.01,
                   backoff_max_s=0.02, timeout_s=2)

    async def go():
        async with c:
            await c.complete([{"role": "user", "content": "x"}], PARAMS, 1, 0)
    with pytest.raises(SamplingError, match="giving up after 3 attempts.*ConnectError"):
        asyncio.run(go())
    assert c.requests == 3 and c.retries == 2


def test_batch_files_round_trip():
    import json

    from wrpo.data.sampling_batch import batch_requests, read_batch_results
    from wrpo.errors import DataError

    ps = prompts(2)
    text = batch_requests(ps, PARAMS, "m")
    reqs = [json.loads(line) for line in text.splitlines()]
    assert [r["custom_id"] for r in reqs] == ["p0", "p1"]
    assert reqs[0]["url"] == "/v1/chat/completions" and reqs[0]["body"]["n"] == 3
    results = "".join(json.dumps({"id": "b", "custom_id": r["custom_id"], "error": None, "response": {
        "status_code": 200, "body": {"model": "srv", "choices": [
            {"index": 1, "message": {"content": "B"}, "finish_reason": "length"},
            {"index": 0, "message": {"content": "A"}, "finish_reason": "stop"}]}}}) + "\n"
        for r in reversed(reqs))
    recs = read_batch_results(results, PARAMS, "src", order=["p0", "p1"])
    assert [r.prompt_id for r in recs] == ["p0", "p1"]
    assert recs[0].responses == ["A", "B"] and recs[0].finish_reasons == ["stop", "length"]
    with pytest.raises(DataError, match="no result, e.g. 'p2'"):
        read_batch_results(results, PARAMS, "src", order=["p0", "p1", "p2"])
    bad = json.dumps({"custom_id": "p0", "error": {"message": "boom"}, "response": None})
    with pytest.raises(DataError, match="<batch results>:1: request for prompt 'p0' failed"):
        read_batch_results(bad, PARAMS, "src")


def test_generate_backend_behind_the_same_interface(tiny_models, tmp_path):
    from wrpo.data.sampling import GenerateBackend

    backend = GenerateBackend(str(tiny_models / "target"))
    out = RunDir(str(tmp_path)).stage("s").writer()
    params = SamplingParams(n=2, max_tokens=6, seed=1)

    async def go():
        async with backend:
            return await sample_group(backend, prompts(2), params, out, "target", 2, progress=False)
    summary = asyncio.run(go())
    recs = parse_jsonl((tmp_path / "s" / "target.jsonl").read_text(), SampleRecord, "t")
    assert summary["prompts"] == 2 and all(len(r.responses) == 2 for r in recs)
    assert all(set(r.finish_reasons) <= {"stop", "length"} for r in recs)
    # the same seed gives the same answers
    again = asyncio.run(backend.complete([{"role": "user", "content": "q0"}], params, 2, 123))
    assert again.responses == asyncio.run(backend.complete([{"role": "user", "content": "q0"}], params, 2,
                                                           123)).responses


def test_vllm_command_line(monkeypatch):
    from wrpo.data.serving import VLLMServer

    monkeypatch.setattr("wrpo.data.serving.on_gpu", lambda: False)
    srv = VLLMServer("/m", "name", runner="pooling", python="/py", aliases=["alias"], max_model_len=512,
                     extra_args=["--seed", "1"])
    srv.port = 1234
    cmd = srv.command()
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--served-model-name"):][:3] == ["--served-model-name", "name", "alias"]
    assert cmd[cmd.index("--host"):][:2] == ["--host", "127.0.0.1"]
    flags = (["--runner", "pooling"], ["--dtype", "float32"], ["--max-model-len", "512"], ["--seed", "1"])
    for flag in flags:
        assert cmd[cmd.index(flag[0]):][:2] == flag
    env = srv.environment()
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"

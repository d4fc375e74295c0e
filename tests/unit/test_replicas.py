"""Data-parallel replicas of one model: the client spreads requests across them (fewest in flight
first) and a failed replica's retry goes to another; locally each replica gets its own GPUs."""

from __future__ import annotations

import asyncio

import pytest
from openai_standin import StandIn

from wrpo.data.sampling import ChatClient, SamplingParams, sample_group
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.servers import Server
from wrpo.records import PromptRecord

PARAMS = SamplingParams(n=1, temperature=0.8, top_p=0.95, max_tokens=8, seed=1, stop=())


@pytest.fixture
def replicas():
    servers = [StandIn(delay_s=0.05).start(), StandIn(delay_s=0.05).start()]
    yield servers
    for s in servers:
        s.stop()


def sample(urls: list[str], tmp_path, n_prompts: int, **kw):
    prompts = [PromptRecord(prompt_id=f"p{i}", prompt=[{"role": "user", "content": f"q {i}"}])
               for i in range(n_prompts)]
    out = RunDir(str(tmp_path / "run")).stage("s").writer()

    async def go():
        async with ChatClient(urls, "m", concurrency=4, timeout_s=10, max_retries=3, backoff_initial_s=0.01,
                              backoff_max_s=0.02, **kw) as c:
            summary = await sample_group(c, prompts, PARAMS, out, "src", 4, progress=False)
            return c, summary
    return asyncio.run(go())


def test_requests_are_spread_across_replicas(replicas, tmp_path):
    client, summary = sample([s.base_url for s in replicas], tmp_path, 16)
    counts = [len(s.answered()) for s in replicas]
    assert sum(counts) == 16 and summary["prompts"] == 16
    assert min(counts) >= 6, f"unbalanced: {counts}"  # least-in-flight keeps both busy
    assert client.sent == counts


def test_a_slow_replica_gets_fewer_requests(tmp_path):
    # least-in-flight keeps ~2 of the 4 requests on each replica: the slow one answers ~2 per delay_s, so the
    # fast one wins by more than 2x only while its own latency (thread scheduling, on a loaded machine tens to
    # hundreds of ms) stays below ~delay_s / 2: 0.4 s left 0.2 s of margin, 2 s leaves 1 s
    slow, fast = StandIn(delay_s=2.0).start(), StandIn(delay_s=0.0).start()
    try:
        sample([slow.base_url, fast.base_url], tmp_path, 24)
        assert len(fast.answered()) > 2 * len(slow.answered()) > 0
    finally:
        slow.stop()
        fast.stop()


def test_a_failing_replica_is_retried_on_another(replicas, tmp_path):
    replicas[0].fail_statuses = [503] * 40  # down for good: every request must end on the other one
    sample([s.base_url for s in replicas], tmp_path, 8)
    answered = {r.prompt for s in replicas for r in s.answered()}
    assert answered == {f"q {i}" for i in range(8)}
    assert replicas[0].requests and all(r.status == 503 for r in replicas[0].requests)


def test_local_replicas_get_disjoint_gpus(monkeypatch):
    from wrpo.data import serving
    from wrpo.data.serving import replica_devices
    from wrpo.errors import WrpoError

    server = Server("src-a", "a", "/m", tensor_parallel_size=2, replicas=3)
    monkeypatch.setattr(serving, "on_gpu", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5")
    assert [replica_devices(server, r) for r in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(WrpoError, match="need 6 GPUs; 4 are visible"):
        replica_devices(server, 2)
    monkeypatch.setattr(serving, "on_gpu", lambda: False)
    assert replica_devices(server, 1) == {}


def test_a_server_playing_two_roles_starts_once_per_stage(monkeypatch):
    """Locally, the one server of an eval judge that is also the reward judge is started once and kept until
    the stage's invocation ends; a server of one role is stopped when its user is done."""
    from contextlib import contextmanager

    from wrpo.data import serving
    from wrpo.pipeline.context import StageContext, StageOptions

    started, stopped = [], []

    @contextmanager
    def fake_serve(ctx, server, model_dir):  # stands for vLLM subprocesses (none run in the unit tier)
        started.append(server.key)
        yield [f"http://127.0.0.1/{server.key}"]
        stopped.append(server.key)

    monkeypatch.setattr(serving, "_serve", fake_serve)
    ctx = StageContext(None, None, None, None, {}, StageOptions(), None)  # type: ignore[arg-type]
    judge = Server("judge", "judge", "/j", roles=("reward",))
    for _ in range(2):
        with serving.serve(ctx, judge) as urls:
            assert urls == ["http://127.0.0.1/judge"]
    assert started == ["judge"] and stopped == []
    with serving.serve(ctx, Server("eval-target", "target", "/t")):
        pass
    assert started == ["judge", "eval-target"] and stopped == ["eval-target"]
    ctx.resources.close()
    assert stopped == ["eval-target", "judge"]


def test_discovered_replicas_are_the_addresses_of_the_name(monkeypatch, tmp_path):
    """`discover`: the replicas are what the Service name resolves to (a headless Service: its Ready pods), looked
    up again after a failure; IPv4 only when the name has both families (a dual-stack pod has both)."""
    import socket

    from wrpo.data import sampling

    a = StandIn(host="127.0.0.2").start()
    b = StandIn(host="127.0.0.3", port=a.port).start()
    answers = [["127.0.0.2", "127.0.0.3", "::1"]]  # the name's addresses, one lookup after another
    looked_up = []
    real = socket.getaddrinfo

    def resolve(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
        if host != "svc.test":
            return real(host, port, family, type, proto, flags)
        looked_up.append(answers[min(len(looked_up), len(answers) - 1)])
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in looked_up[-1]]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(sampling, "DISCOVERY_S", 3600.0)  # only a failure makes it look again
    url = f"http://svc.test:{a.port}/v1"
    try:
        client, _ = sample([url], tmp_path / "one", 8, discover=True)
        assert client.urls == [f"http://127.0.0.2:{a.port}/v1/chat/completions",
                               f"http://127.0.0.3:{a.port}/v1/chat/completions"]
        assert len(a.answered()) == len(b.answered()) == 4 and len(looked_up) == 1
        # replica a fails, and is gone from the name's answer: the failure makes the client look again
        a.fail_statuses = [503] * 100
        answers[:] = [["127.0.0.2", "127.0.0.3"], ["127.0.0.3"]]
        looked_up.clear()
        client, _ = sample([url], tmp_path / "two", 8, discover=True)
        assert len(looked_up) == 2 and client.urls == [f"http://127.0.0.3:{a.port}/v1/chat/completions"]
        assert len(b.answered()) == 12 and a.requests[4:] and not a.answered()[4:]
    finally:
        a.stop()
        b.stop()


def test_an_https_url_is_not_resolved_to_addresses():
    """Its certificate names the host: an https base URL stays one replica under its name."""
    client = ChatClient(["https://localhost:8443/v1"], "m", discover=True)
    asyncio.run(client._resolve())
    assert client.urls == ["https://localhost:8443/v1/chat/completions"]

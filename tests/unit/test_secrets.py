"""Secrets stay secret (docs/spec.md, "Secrets"): a provider's error body reaches our messages cut short
and scrubbed of the key, URLs in messages carry no credentials, and a local vLLM server process gets an
explicit environment without our API keys and S3 credentials. Credentials written into spec URLs are
refused at validation (tests/corpus/specs/*credentials*)."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import stat
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wrpo.data.sampling import ChatClient, SamplingError, SamplingParams, scrub
from wrpo.data.serving import VLLMServer, server_environment
from wrpo.pipeline.checks import redact_url

KEY = "sk-live-0123456789abcdefghij"
PARAMS = SamplingParams(n=1, max_tokens=4)


class Provider:
    """A real HTTP server on 127.0.0.1 that answers every request with one status and body (what a
    proprietary API does when it refuses a key: it echoes the key back, in full or in part)."""

    def __init__(self, status: int, body: str):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.auth.append(self.headers.get("Authorization"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.auth: list[str | None] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Provider:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


def ask(url: str, **kw) -> None:
    client = ChatClient(url, "gpt", api_key=KEY, max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.02, **kw)

    async def go():
        async with client:
            await client.complete([{"role": "user", "content": "hi"}], PARAMS, 1, 0)
    asyncio.run(go())


ECHO = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}. Header was 'Bearer {KEY}'. "
                             "request id req_Zx9Qm2Lp8Vt4Kr7Yw1Bn5Hc3Jd6Fg0Sa", "type": "invalid_request_error",
                             "padding": "x" * 600}})


@pytest.mark.parametrize("status", [401, 500], ids=["refused", "retried"])
def test_provider_error_bodies_are_cut_and_scrubbed(status, caplog):
    caplog.set_level(logging.DEBUG)
    with Provider(status, ECHO) as provider, pytest.raises(SamplingError) as e:
        ask(provider.url)
    assert provider.auth[-1] == f"Bearer {KEY}"  # the key was sent
    text = str(e.value)
    assert f"HTTP {status}" in text and "Incorrect API key provided: ***" in text
    assert KEY not in text and KEY[:12] not in text and "req_Zx9Qm2Lp8Vt4Kr7Yw1Bn5Hc3Jd6Fg0Sa" not in text
    assert len(text) < 450  # the 600-character padding is gone: at most 200 characters of the body
    assert KEY not in caplog.text


def test_scrub_masks_what_looks_like_a_key_and_keeps_the_rest():
    body = ('{"detail": "token=abc123def rejected", "x-api-key": "zzz", "hint": "Authorization: Basic dXNlcjpw"} '
            'ghp_abcdefghijklmnop hf_ABCDEFGHIJKLMNOPQRS plain words stay')
    out = scrub(body, (), limit=1000)
    for secret in ("abc123def", "zzz", "dXNlcjpw", "ghp_abcdefghijklmnop", "hf_ABCDEFGHIJKLMNOPQRS"):
        assert secret not in out
    assert "token=***" in out and "Basic ***" in out and "plain words stay" in out
    assert scrub("quota exceeded; retry later") == "quota exceeded; retry later"
    assert scrub("a" * 300) == "***"  # one long opaque token
    assert scrub("word " * 100).endswith("…") and len(scrub("word " * 100)) == 201


def test_urls_in_messages_lose_credentials_and_queries():
    assert redact_url("https://me:pw@api.example.com/v1?key=abc#x") == "https://***@api.example.com/v1"
    client = ChatClient("https://u:p@api.example.com/v1?api-key=abc", "m")
    assert "u:p" not in repr(client) and "abc" not in repr(client)


def test_a_local_vllm_process_gets_no_unrelated_secrets(tmp_path, monkeypatch):
    """A stand-in 'python' records the environment the real subprocess call gives it."""
    fake = tmp_path / "python"
    dump = tmp_path / "env.json"
    fake.write_text(f"#!{sys.executable}\nimport json, os\njson.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    for name, value in {"AWS_SECRET_ACCESS_KEY": "aws-secret", "AWS_ACCESS_KEY_ID": "AKIA", "OPENAI_API_KEY": KEY,
                        "MY_PROVIDER_TOKEN": "tok", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "HF_HOME": str(tmp_path),
                        "EXTRA_NEEDED": "yes", "WRPO_VLLM_ENV_PASS": "EXTRA_NEEDED"}.items():
        monkeypatch.setenv(name, value)
    server = VLLMServer("/models/x", "x", python=str(fake), log_path=tmp_path / "vllm.log")
    server.launch()
    assert server.proc is not None and server.proc.wait(30) == 0
    server.stop()
    seen = json.loads(dump.read_text())
    assert not {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "OPENAI_API_KEY", "MY_PROVIDER_TOKEN"} & seen.keys()
    assert seen["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and seen["HF_HOME"] == str(tmp_path)
    assert seen["EXTRA_NEEDED"] == "yes" and seen["PATH"] == os.environ["PATH"]
    assert seen["HF_HUB_OFFLINE"] == "1" and seen["VLLM_HOST_IP"] == "127.0.0.1"  # what VLLMServer adds
    assert server_environment({"AWS_REGION": "x", "LC_ALL": "C"}) == {"LC_ALL": "C"}


def test_a_local_vllm_process_keeps_its_runtime_files_in_a_folder_removed_when_it_stops(tmp_path, monkeypatch):
    """vLLM binds ZMQ sockets under VLLM_RPC_BASE_PATH and file stores under TMPDIR and leaves some behind; the
    stand-in 'python' leaves one in each, as a killed server does."""
    fake = tmp_path / "python"
    dump = tmp_path / "env.json"
    fake.write_text(f"#!{sys.executable}\nimport json, os, pathlib\n"
                    f"json.dump(dict(os.environ), open({str(dump)!r}, 'w'))\n"
                    "pathlib.Path(os.environ['VLLM_RPC_BASE_PATH'], 'left-socket').touch()\n"
                    "pathlib.Path(os.environ['TMPDIR'], 'vllm_dist_x').touch()\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    server = VLLMServer("/models/x", "x", python=str(fake), log_path=tmp_path / "vllm.log")
    server.launch()
    assert server.proc is not None and server.proc.wait(30) == 0
    seen = json.loads(dump.read_text())
    private = Path(seen["TMPDIR"])
    assert seen["VLLM_RPC_BASE_PATH"] == str(private) and private.parent == Path(tempfile.gettempdir())
    assert (private / "left-socket").exists() and (private / "vllm_dist_x").exists()
    # the compile cache stays where torch would have put it without the private TMPDIR (warm across servers)
    assert seen["TORCHINDUCTOR_CACHE_DIR"] == str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
    server.stop()
    assert not private.exists() and server.runtime_dir is None

    # a base path the user chose is theirs: kept, and not removed
    own = tmp_path / "rpc"
    own.mkdir()
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(own))
    server.launch()
    assert server.proc.wait(30) == 0
    server.stop()
    assert json.loads(dump.read_text())["VLLM_RPC_BASE_PATH"] == str(own) and (own / "left-socket").exists()

"""A STAND-IN OpenAI-compatible server (aiohttp, 127.0.0.1) for fault tests of the sampling client.

It is not vLLM: it answers `/v1/chat/completions` with deterministic texts (or what `reply` makes of
the request: scripted judge verdicts), and can be told to fail (500/429), to be slow, to hold every
request after the first `hold_after` unanswered (until `hold_after` is set to None: a client stopped at a
known point), or to return fewer choices than asked. Every request is logged (prompt text, n, seed,
Authorization header) so tests can check that nothing was asked twice. The happy path of the data pipeline
is tested against a real vLLM server (tests/integration).

Run as a program (`python tests/openai_standin.py --host H --port P [--hold-file F]`) it is a server pod of
the cluster harness (tests/cluster/test_sampling_replicas.py): it answers `/health`, prints a line per
request it gets (`standin: request ...`) and per answer (`standin: answered ...`), so a test counts what
each replica served, and holds every request until the file `--hold-file` names exists.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    prompt: str
    n: int
    seed: int | None
    auth: str | None
    status: int


@dataclass
class StandIn:
    fail_statuses: list[int] = field(default_factory=list)  # returned, in order, before answering
    delay_s: float = 0.0
    max_choices: int | None = None
    retry_after: str | None = None
    reply: Callable[[dict[str, Any]], str] | None = None  # the answer text for a request body (judge tests)
    hold_after: int | None = None  # requests after this many wait (unanswered) while it is set
    bodies: list[dict[str, Any]] = field(default_factory=list)  # every request body, in order
    requests: list[Request] = field(default_factory=list)
    port: int = 0  # 0: any free port
    host: str = "127.0.0.1"
    hold_file: str | None = None  # requests wait (unanswered) until this file exists
    verbose: bool = False  # a line per request and per answer on stdout

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def answered(self) -> list[Request]:
        return [r for r in self.requests if r.status == 200]

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        status = self.fail_statuses.pop(0) if self.fail_statuses else 200
        self.requests.append(Request(prompt, body.get("n", 1), body.get("seed"),
                                     request.headers.get("Authorization"), status))
        index = len(self.requests)
        self._say(f"request {prompt!r} n={body.get('n', 1)} seed={body.get('seed')}")
        while (self.hold_after is not None and index > self.hold_after) or \
                (self.hold_file and not os.path.exists(self.hold_file)):
            await asyncio.sleep(0.05)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if status != 200:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.json_response({"error": {"message": "stand-in failure"}}, status=status,
                                     headers=headers)
        n = body.get("n", 1) if self.max_choices is None else min(self.max_choices, body.get("n", 1))
        def text(i: int) -> str:
            return self.reply(body) if self.reply else f"answer {body.get('seed')}-{i} to {prompt}"

        self._say(f"answered {prompt!r} n={n}")
        choices = [{"index": i, "message": {"role": "assistant", "content": text(i)},
                    "finish_reason": "stop" if i % 2 == 0 else "length"} for i in range(n)]
        return web.json_response({"id": "x", "object": "chat.completion", "model": "standin-model",
                                  "choices": choices})

    def _say(self, line: str) -> None:
        if self.verbose:
            print(f"standin: {line}", flush=True)

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(text="ok")

    def start(self) -> StandIn:
        from aiohttp import web

        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/health", self._health)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("stand-in server did not start")
        return self

    def stop(self) -> None:
        async def down() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        time.sleep(0.05)


def main(argv: list[str]) -> None:
    """Serve until killed (a server pod of the cluster harness)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hold-file")
    args = parser.parse_args(argv)
    server = StandIn(host=args.host, port=args.port, hold_file=args.hold_file, verbose=True).start()
    print(f"standin: serving on {server.base_url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])

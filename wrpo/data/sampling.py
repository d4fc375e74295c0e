"""Sampling N answers per prompt from OpenAI-compatible servers (vLLM, proprietary APIs) or from a local
transformers model, into resumable shards.

`ChatClient` asks `/v1/chat/completions` for all N answers in one request (n=N), with bounded concurrency,
timeouts, and tenacity retries with jittered exponential backoff on 429, 5xx and connection errors
(honouring Retry-After). A server that returns fewer than N choices is asked again for the rest.
`sample_group` runs one model over a prompt list and commits its output shard by shard, so an interrupted
stage resumes without re-asking any prompt of a committed shard. API keys come from an environment
variable or a mounted file and are never logged or put in error messages: a provider's error body is
cut to 200 characters and scrubbed of the key and of anything that looks like one (`scrub`), and URLs
in messages lose credentials and query strings (docs/spec.md, "Secrets").
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from wrpo.errors import WrpoError
from wrpo.pipeline.checks import redact_url
from wrpo.pipeline.rundir import ShardInfo, StageWriter
from wrpo.records import PromptRecord, SampleRecord, dump_jsonl, iter_jsonl, split_lines

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
REPLICA_COOLDOWN_S = 10.0  # a replica that failed is avoided this long while another one is healthy
DISCOVERY_S = 5.0  # how often a discovered Service name is resolved again (docs/operator.md, "Sampling replicas")
TOP_UPS = 2  # extra requests when a server returns fewer than N choices


class SamplingError(WrpoError):
    """A request failed for good (a non-retryable status, or retries exhausted); names model and prompt."""


@dataclass(frozen=True)
class SamplingParams:
    """The parameters sent with every request and recorded in every sample record."""

    n: int = 5
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 2048
    seed: int = 42
    stop: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, sampling: Any) -> SamplingParams:
        return cls(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                   max_tokens=sampling.max_tokens, seed=sampling.seed, stop=tuple(sampling.stop))

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"stop": list(self.stop)}


@dataclass(frozen=True)
class Completion:
    """The answers to one prompt, with finish reasons and the model id the server reported."""

    responses: list[str]
    finish_reasons: list[str | None]
    model: str


class ChatBackend(Protocol):
    """Anything that answers a chat with up to `n` sampled completions."""

    model: str

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams, n: int,
                       seed: int) -> Completion: ...


def prompt_seed(base: int, prompt_id: str, attempt: int = 0) -> int:
    """A per-prompt seed: reproducible whatever the order in which prompts are sent."""
    digest = hashlib.sha256(f"{base}:{prompt_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def resolve_api_key(api_key_env: str | None = None, api_key_file: str | None = None) -> str | None:
    """The API key from an environment variable or a (mounted Secret) file; None if neither is set."""
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise SamplingError(f"environment variable {api_key_env} (the endpoint's API key) is not set")
        return value.strip()
    if api_key_file:
        try:
            return Path(api_key_file).read_text().strip()
        except OSError as e:
            raise SamplingError(f"cannot read the API key file {api_key_file} ({e.strerror})") from None
    return None


# ---------------------------------------------------------------------------------------------- HTTP client


BODY_LIMIT = 200  # characters of a provider's error body kept in a message
_KEYLIKE = (  # (what to keep)(the secret)
    re.compile(r"(?i)(\b(?:bearer|basic)\s+)[^\s\"',;]+"),  # Authorization header values
    re.compile(r"(?i)([\"']?\b(?:api[_-]?key|x-api-key|access[_-]?token|token|secret|password|authorization|key)"
               r"[\"']?\s*[:=]\s*[\"']?)(?!(?:bearer|basic)\s|\*\*\*)[^\s\"',;&}]+"),  # key=..., "token": "..."
    re.compile(r"()\b(?:sk|pk|rk|hf|ghp|gho|glpat|xox[abpr])[-_][A-Za-z0-9_\-]{8,}"),  # well-known key prefixes
    re.compile(r"()[A-Za-z0-9+/_\-]{32,}={0,2}"),  # long opaque tokens
)


def scrub(text: str, secrets: tuple[str | None, ...] = (), limit: int = BODY_LIMIT) -> str:
    """`text` (a provider's error body) cut to `limit` characters, with the known `secrets` and anything
    that looks like a key replaced by `***`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern in _KEYLIKE:
        text = pattern.sub(lambda m: m.group(1) + "***", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class RetryableStatus(Exception):
    """An HTTP status worth retrying (429, 5xx); carries the server's Retry-After, if any. The body is
    already scrubbed (`scrub`)."""

    def __init__(self, status: int, retry_after: float | None, body: str):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.retry_after = status, retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


@dataclass
class Replica:
    """One replica of a served model: its URL and what the client has sent it."""

    url: str
    in_flight: int = 0
    sent: int = 0  # requests sent to it
    failed_until: float = 0.0  # monotonic time until which it is avoided


class ChatClient:
    """Async client of an OpenAI-compatible `/chat/completions` endpoint (use as `async with`).

    Given several base URLs (the replicas of one model), each request goes to the replica with the
    fewest requests in flight, and a retry may go to another one. With `discover`, each base URL's host
    name is resolved to all its addresses, each one a replica, and resolved again every `DISCOVERY_S`
    seconds and after a replica failed: the operator's headless Service names its Ready server pods, so
    a replica that dies drops out and a new one joins (docs/operator.md, "Sampling replicas")."""

    def __init__(self, base_url: str | Sequence[str], model: str, api_key: str | None = None,
                 concurrency: int = 32, timeout_s: float = 600.0, max_retries: int = 8,
                 backoff_max_s: float = 30.0, backoff_initial_s: float = 0.5, path: str = "/chat/completions",
                 discover: bool = False):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.base_urls = [u.rstrip("/") + path for u in urls]
        more = f" (+{len(self.base_urls) - 1} replicas)" if len(self.base_urls) > 1 else ""
        self.shown_url = redact_url(self.base_urls[0]) + more  # for messages: no credentials, no query string
        self.discover = discover
        self.known: dict[str, Replica] = {u: Replica(u) for u in self.base_urls}  # every replica seen
        self.replicas = list(self.known.values())  # those requests go to now
        self._resolve_at = 0.0 if discover else float("inf")
        self._resolving = asyncio.Lock()  # one resolution at a time; requests wait for its answer
        self.model = model
        self._api_key = api_key
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_max_s = max_retries, backoff_max_s
        self.backoff_initial_s = backoff_initial_s
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self.requests = 0
        self.retries = 0

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def sent(self) -> list[int]:
        """Requests sent to each current replica."""
        return [r.sent for r in self.replicas]

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={self.shown_url!r}, model={self.model!r})"

    async def __aenter__(self) -> ChatClient:
        import httpx

        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=min(30.0, self.timeout_s))
        self._client = httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)
        self._sem = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    def _wait(self, state: Any) -> float:
        from tenacity import wait_exponential_jitter

        backoff = wait_exponential_jitter(initial=self.backoff_initial_s, max=self.backoff_max_s)(state)
        err = state.outcome.exception() if state.outcome else None
        after = getattr(err, "retry_after", None)
        return min(self.backoff_max_s, max(backoff, after or 0.0))

    def _before_sleep(self, state: Any) -> None:
        self.retries += 1
        err = state.outcome.exception()
        log.warning("retrying %s (attempt %d): %s", self.shown_url, state.attempt_number, type(err).__name__
                    if not isinstance(err, RetryableStatus) else f"HTTP {err.status}")

    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST with retries on 429/5xx/connection errors; a non-retryable status raises SamplingError."""
        import httpx
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1), wait=self._wait, reraise=True,
            retry=retry_if_exception_type((httpx.TransportError, RetryableStatus)),
            before_sleep=self._before_sleep,
        )
        assert self._sem is not None, "use ChatClient as `async with`"
        async with self._sem:
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._post_once(body)
            except (httpx.TransportError, RetryableStatus) as e:
                raise SamplingError(f"{self.shown_url}: giving up after {self.max_retries + 1} attempts "
                                    f"({type(e).__name__}: {e})") from None
        raise AssertionError("unreachable")

    def _replica(self) -> Replica:
        """The replica with the fewest requests in flight (the least used so far on a tie), skipping
        replicas that failed within the last few seconds while another one is healthy (a replica that
        fails fast would otherwise attract every request)."""
        now = time.monotonic()
        return min(self.replicas, key=lambda r: (r.failed_until > now, r.in_flight, r.sent))

    async def _discover(self) -> None:
        """Look the replicas up again when it is time (`discover` only); concurrent requests wait for one
        lookup."""
        if time.monotonic() < self._resolve_at:
            return
        async with self._resolving:
            if time.monotonic() >= self._resolve_at:  # not done while this one waited
                await self._resolve()
                self._resolve_at = time.monotonic() + DISCOVERY_S

    async def _resolve(self) -> None:
        """Every address an http base URL's host name resolves to is a replica (IPv4 if the name has any,
        else IPv6: a dual-stack pod has both); an https URL stays as it is (its certificate names the host,
        not an address). A name that does not resolve, or resolves to nothing, keeps the replicas it had
        (their requests fail and are retried until it does)."""
        import socket

        import httpx

        loop, found = asyncio.get_running_loop(), []
        for base in self.base_urls:
            url = httpx.URL(base)
            if url.scheme != "http":
                found.append(base)
                continue
            try:
                infos = await loop.getaddrinfo(url.host, url.port or 80, type=socket.SOCK_STREAM)
            except OSError as e:
                log.warning("resolving %s: %s; keeping %d replicas", url.host, e, len(self.replicas))
                return
            v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
            addresses = v4 or [i[4][0] for i in infos if i[0] == socket.AF_INET6]
            found += [str(url.copy_with(host=a)) for a in dict.fromkeys(addresses)]
        if not found:
            return
        if found != self.urls:
            log.info("%s: %d replicas: %s", self.shown_url, len(found), ", ".join(map(redact_url, found)))
        self.replicas = [self.known.setdefault(u, Replica(u)) for u in found]

    async def _post_once(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        self.requests += 1
        await self._discover()
        r = self._replica()
        r.in_flight += 1
        r.sent += 1
        try:
            resp = await self._client.post(r.url, json=body)
        except httpx.TransportError:
            self._failed(r)
            raise
        finally:
            r.in_flight -= 1
        if resp.status_code in RETRY_STATUS and resp.status_code != 429:
            self._failed(r)
        if resp.status_code in RETRY_STATUS:
            raise RetryableStatus(resp.status_code, _retry_after(resp.headers.get("retry-after")),
                                  scrub(resp.text, (self._api_key,)))
        if resp.status_code >= 400:
            raise SamplingError(f"{self.shown_url}: HTTP {resp.status_code} for model '{self.model}': "
                                f"{scrub(resp.text, (self._api_key,))}")
        return resp.json()

    def _failed(self, r: Replica) -> None:
        """Avoid `r` for a while, and look the replicas up again before the next request (it may be gone)."""
        r.failed_until = time.monotonic() + REPLICA_COOLDOWN_S
        if self.discover:
            self._resolve_at = 0.0

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams, n: int,
                       seed: int) -> Completion:
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "n": n, "temperature": params.temperature,
            "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": seed,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        data = await self.post(body)
        choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
        return Completion([(c.get("message") or {}).get("content") or "" for c in choices],
                          [c.get("finish_reason") for c in choices], data.get("model") or self.model)


# ---------------------------------------------------------------------------------------------- transformers


class GenerateBackend:
    """`transformers` generate behind the ChatBackend interface, for machines without vLLM (one at a time)."""

    def __init__(self, model_dir: str, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = Path(model_dir).name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> GenerateBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def complete(self, messages: list[dict[str, str]], params: SamplingParams, n: int,
                       seed: int) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(self._generate, messages, params, n, seed)

    def _generate(self, messages: list[dict[str, str]], params: SamplingParams, n: int,
                  seed: int) -> Completion:
        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True).to(self.device)
        torch.manual_seed(seed)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": params.max_tokens,
                                  "num_return_sequences": n, "pad_token_id": self.tokenizer.pad_token_id
                                  or self.tokenizer.eos_token_id}
        if sample:
            kwargs |= {"temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            kwargs |= {"stop_strings": list(params.stop), "tokenizer": self.tokenizer}
        with torch.inference_mode():
            out = self.lm.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:]
        eos = self.lm.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        reasons = ["stop" if any(int(t) in eos_ids for t in row) or len(row) < params.max_tokens else "length"
                   for row in new]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return Completion([t.strip() for t in texts], list(reasons), self.model)


# ---------------------------------------------------------------------------------------------- stage logic


async def sample_prompt(backend: ChatBackend, prompt: PromptRecord, params: SamplingParams,
                        name: str) -> SampleRecord:
    """N answers to one prompt; asks again (other seeds) when the server returns fewer than N."""
    messages = [m.model_dump() for m in prompt.prompt]
    responses: list[str] = []
    reasons: list[str | None] = []
    server_model = backend.model
    for attempt in range(1 + TOP_UPS):
        missing = params.n - len(responses)
        if missing <= 0:
            break
        try:
            got = await backend.complete(messages, params, missing, prompt_seed(params.seed, prompt.prompt_id,
                                                                                attempt))
        except SamplingError as e:
            raise SamplingError(f"prompt '{prompt.prompt_id}' of {name}: {e}") from None
        responses += got.responses[:missing]
        reasons += got.finish_reasons[:missing]
        server_model = got.model
    sampling = params.to_json() | {"server_model": server_model}
    return SampleRecord(prompt_id=prompt.prompt_id, model=name, responses=responses,
                        finish_reasons=reasons, sampling=sampling)


def batched(items: Iterable[PromptRecord], size: int) -> Iterator[list[PromptRecord]]:
    """Consecutive lists of `size` items (the last one shorter), read lazily."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def shard_key(name: str, backend_model: str, params: SamplingParams, prompts: Sequence[PromptRecord]) -> str:
    """What a shard was made from: model, parameters and the exact prompts; a changed input re-samples."""
    blob = json.dumps({"name": name, "model": backend_model, "params": params.to_json(),
                       "prompts": [p.model_dump() for p in prompts]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


async def sample_group(backend: ChatBackend, prompts: Iterable[PromptRecord], params: SamplingParams,
                       out: StageWriter, name: str, shard_size: int, progress: bool = True,
                       file: str | None = None, total: int | None = None) -> dict[str, Any]:
    """Sample every prompt with one model into `<file>.jsonl` (default: the model's name), committing shard
    by shard (resumable); `name` is recorded as the records' model.

    The prompts stream in (`total` sizes the progress bar when they are not a list): a shard's prompts
    are read when it starts, and only a few shards are in flight at a time - enough to keep the
    backend's `concurrency` requests busy - so memory does not grow with the number of prompts (docs/
    data.md, "Scale"). Each shard's marker records its counts, which the assembly adds up."""
    file = file or name
    from tqdm.auto import tqdm

    done = out.stage.committed_shards(file)
    bar = tqdm(total=len(prompts) if isinstance(prompts, Sized) else total, desc=f"sample {name}",
               unit="prompt", disable=not progress)
    concurrency = getattr(backend, "concurrency", 1)
    ahead = asyncio.Semaphore(max(2, -(-2 * concurrency // shard_size)))  # shards in flight
    n_shards = reused = 0

    async def one(p: PromptRecord) -> SampleRecord:
        rec = await sample_prompt(backend, p, params, name)
        bar.update(1)
        return rec

    async def shard(i: int, chunk: list[PromptRecord], key: str) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(p)) for p in chunk]
            records = [t.result() for t in tasks]
            data = dump_jsonl(records).encode()
            done[i] = await asyncio.to_thread(out.commit_shard, file, i, data, key, shard_counts(records, params.n))
        finally:
            ahead.release()

    try:
        async with asyncio.TaskGroup() as group:
            for i, chunk in enumerate(batched(prompts, shard_size)):
                n_shards += 1
                key = shard_key(name, backend.model, params, chunk)
                if i in done and done[i].key == key:
                    reused += 1
                    bar.update(len(chunk))
                    continue
                await ahead.acquire()
                group.create_task(shard(i, list(chunk), key))
    except ExceptionGroup as eg:
        raise first_error(eg) from None
    finally:
        bar.close()
    return _assemble(out, file, n_shards, reused, params.n, done)


def shard_counts(records: Sequence[SampleRecord], n: int) -> dict[str, Any]:
    """What a sampling shard's marker records for the summary: prompts, prompts short of N answers, and
    the finish reasons (in order of first appearance)."""
    return {"prompts": len(records), "short_prompts": sum(1 for r in records if len(r.responses) < n),
            "finish_reasons": dict(Counter(str(f) for r in records for f in r.finish_reasons))}


def first_error(eg: BaseExceptionGroup) -> BaseException:
    """The first leaf exception of a (nested) exception group, for a plain error message."""
    err: BaseException = eg
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err


def _assemble(out: StageWriter, name: str, n_shards: int, reused: int, n: int,
              done: dict[int, ShardInfo]) -> dict[str, Any]:
    """Concatenate the committed shards `done` (in order) into `<name>.jsonl` (each shard checked
    against its marker, a few read ahead by a bounded pool: `StageDir.prefetched`); summary counts from
    the shards' markers (a shard committed without them is parsed as it streams through)."""
    prompts = short = 0
    reasons: Counter[str] = Counter()
    bodies = out.stage.prefetched(done[i] for i in range(n_shards))  # read ahead by a bounded pool
    with out.open(f"{name}.jsonl") as w:
        for i, body in zip(range(n_shards), bodies, strict=True):
            meta = done[i].meta
            chunks: Iterator[bytes] = iter((body,))
            if {"prompts", "short_prompts", "finish_reasons"} <= set(meta):
                for chunk in chunks:
                    w.write(chunk)
            else:
                def through(chunks: Iterator[bytes] = chunks) -> Iterator[bytes]:
                    for chunk in chunks:
                        w.write(chunk)
                        yield chunk

                records = [r for _, r in iter_jsonl(split_lines(through()), SampleRecord, f"{name}.jsonl")]
                meta = shard_counts(records, n)
            prompts += meta["prompts"]
            short += meta["short_prompts"]
            reasons.update(meta["finish_reasons"])
    return {"prompts": prompts, "shards": n_shards, "shards_reused": reused, "short_prompts": short,
            "finish_reasons": dict(reasons)}

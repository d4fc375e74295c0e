"""Answering evaluation prompts with one model, turn by turn, into resumable shards (docs/eval.md).

A multi-turn prompt (MT-Bench) is answered as a conversation: the answer to turn k goes into the messages
of turn k+1. Requests go through the same ChatBackend as sampling (a vLLM server, given or local, an
external endpoint, or transformers generate), one answer per turn, greedy by default.

`run_sharded` is the stage's resume mechanism for every slow step (answers and LLM-judge verdicts): the
items are cut into shards; a shard is committed (`StageWriter.commit_shard`) with a key naming what it
was made from, and a rerun reuses every committed shard whose key still matches.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from wrpo.eval.questions import EvalPrompt
from wrpo.pipeline.rundir import StageWriter

T = TypeVar("T")


@dataclass(frozen=True)
class AnswerParams:
    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42

    @classmethod
    def from_spec(cls, ev: Any) -> AnswerParams:
        return cls(ev.max_tokens, ev.temperature, ev.top_p, ev.seed)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


async def answer_prompt(backend: Any, prompt: EvalPrompt, params: AnswerParams, role: str) -> dict[str, Any]:
    """One answer per turn of `prompt`; the record the eval stage stores per model and prompt."""
    from wrpo.data.sampling import SamplingError, SamplingParams, prompt_seed

    sp = SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                        seed=params.seed)
    messages = [dict(m) for m in prompt.messages]
    answers: list[str] = []
    reasons: list[str | None] = []
    for k, question in enumerate([None, *prompt.followups]):
        if question is not None:
            messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
        try:
            got = await backend.complete(messages, sp, 1, prompt_seed(params.seed, prompt.prompt_id, k))
        except SamplingError as e:
            raise SamplingError(f"eval prompt '{prompt.prompt_id}' (turn {k + 1}) of {role}: {e}") from None
        answers.append((got.responses or [""])[0])
        reasons.append((got.finish_reasons or [None])[0])
    return {"prompt_id": prompt.prompt_id, "model": role, "answers": answers, "finish_reasons": reasons}


async def run_sharded(out: StageWriter, group: str, items: Sequence[T], shard_size: int, key: Any,
                      work: Callable[[T], Awaitable[dict[str, Any]]],
                      progress: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
    """`work(item)` for every item, concurrently within a shard, committed shard by shard under
    `_shards/<group>/`; shards committed with the same key (over `key` and the shard's items) are reused."""
    from wrpo.data.sampling import first_error

    done = out.stage.committed_shards(group)
    results: list[dict[str, Any]] = []
    for i, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start:start + shard_size]
        shard_key = digest({"key": key, "items": [repr(x) for x in chunk]})
        if i in done and done[i].key == shard_key:
            rows = [json.loads(line) for line in out.stage.read_shard(done[i]).decode().splitlines() if line]
        else:
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(work(x)) for x in chunk]
            except ExceptionGroup as eg:
                raise first_error(eg) from None
            rows = [t.result() for t in tasks]
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            await asyncio.to_thread(out.commit_shard, group, i, data, shard_key, {"items": len(rows)})
        results += rows
        if progress:
            progress(len(chunk))
    return results

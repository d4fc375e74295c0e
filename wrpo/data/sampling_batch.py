"""vLLM `run-batch` files (the OpenAI batch format), so the cluster can sample as a batch Job:

    python -m vllm.entrypoints.openai.run_batch -i requests.jsonl -o results.jsonl --model ...

`batch_requests` writes one `/v1/chat/completions` request per prompt (custom_id = prompt_id, n = N);
`read_batch_results` turns the results back into sample records, naming any failed prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from wrpo.data.sampling import SamplingParams, prompt_seed
from wrpo.errors import DataError
from wrpo.records import PromptRecord, SampleRecord, iter_objects


def batch_requests(prompts: Sequence[PromptRecord], params: SamplingParams, model: str) -> str:
    """The batch input file (JSONL): one chat-completions request per prompt."""
    lines = []
    for p in prompts:
        body: dict[str, Any] = {
            "model": model, "messages": [m.model_dump() for m in p.prompt], "n": params.n,
            "temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
            "seed": prompt_seed(params.seed, p.prompt_id),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        lines.append(json.dumps({"custom_id": p.prompt_id, "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def read_batch_results(text: str, params: SamplingParams, name: str, source: str = "<batch results>",
                       order: Sequence[str] | None = None) -> list[SampleRecord]:
    """Sample records from a batch output file; a failed request or a missing prompt is a DataError."""
    by_id: dict[str, SampleRecord] = {}
    for number, obj in iter_objects(text, source):
        pid = obj.get("custom_id")
        resp = obj.get("response") or {}
        if obj.get("error") or resp.get("status_code", 200) != 200:
            raise DataError(source, f"request for prompt '{pid}' failed: {obj.get('error') or resp}", number)
        body = resp.get("body") or {}
        choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
        by_id[pid] = SampleRecord(
            prompt_id=pid, model=name,
            responses=[(c.get("message") or {}).get("content") or "" for c in choices],
            finish_reasons=[c.get("finish_reason") for c in choices],
            sampling=params.to_json() | {"server_model": body.get("model", name)},
        )
    ids = list(order) if order is not None else list(by_id)
    missing = [pid for pid in ids if pid not in by_id]
    if missing:
        raise DataError(source, f"{len(missing)} prompt(s) have no result, e.g. '{missing[0]}'")
    return [by_id[pid] for pid in ids]

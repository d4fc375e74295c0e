"""Evaluation prompts: the held-out eval split, or a question file in one of the public benchmarks' layouts
(docs/eval.md, "Question files").

A question file is JSONL (one object a line) or a JSON array, local or on S3. Each object is read by the
first of these layouts that matches its fields:

| layout | fields | id |
|---|---|---|
| prompt record (wrpo, Arena-Hard v2) | `prompt`: a string or chat messages | `prompt_id`, `uid` |
| MT-Bench, Arena-Hard v0.1 | `turns`: strings, or objects with `content` (several: multi-turn) | `question_id` |
| AlpacaEval | `instruction` (+ optional `input`) | row number |

Every question becomes an `EvalPrompt`: its chat messages up to the first question, and the later user
turns that are asked after each answer (MT-Bench's second turn). Errors name the file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wrpo.errors import DataError
from wrpo.records import PromptRecord, iter_objects
from wrpo.storage import S3Options, read_uri_bytes


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation question: `messages` ends with the first user turn; `followups` are asked later."""

    prompt_id: str
    messages: list[dict[str, str]]
    followups: list[str] = field(default_factory=list)
    category: str | None = None

    @property
    def turns(self) -> int:
        return 1 + len(self.followups)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_id": self.prompt_id, "messages": self.messages}
        if self.followups:
            out["followups"] = self.followups
        if self.category:
            out["category"] = self.category
        return out


def from_records(records: Sequence[PromptRecord]) -> list[EvalPrompt]:
    """The prepared eval split as evaluation prompts (one turn each)."""
    return [EvalPrompt(r.prompt_id, [m.model_dump() for m in r.prompt]) for r in records]


def _text(value: Any, source: str, line: int, name: str) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataError(source, "expected a non-empty string (or an object with 'content')", line, name)
    return value


def _one(obj: dict[str, Any], source: str, line: int) -> EvalPrompt:
    from wrpo.data.prepare import prompt_messages

    category = obj.get("category")
    category = str(category) if category is not None else None
    if "prompt" in obj:
        messages = prompt_messages(obj["prompt"], source, line, "prompt")
        if messages is None:
            raise DataError(source, "empty prompt", line, "prompt")
        pid = obj.get("prompt_id", obj.get("uid", obj.get("question_id", line)))
        return EvalPrompt(str(pid), [m.model_dump() for m in messages], category=category)
    if "turns" in obj:
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise DataError(source, "expected a non-empty list of turns", line, "turns")
        texts = [_text(t, source, line, f"turns.{i}") for i, t in enumerate(turns)]
        pid = obj.get("question_id", obj.get("uid", line))
        return EvalPrompt(str(pid), [{"role": "user", "content": texts[0]}], texts[1:], category)
    if "instruction" in obj:
        text = _text(obj["instruction"], source, line, "instruction")
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra}"
        return EvalPrompt(str(obj.get("id", line)), [{"role": "user", "content": text}],
                          category=str(obj["dataset"]) if obj.get("dataset") else None)
    raise DataError(source, "no question: expected 'prompt', 'turns' (MT-Bench, Arena-Hard) or 'instruction' "
                    "(AlpacaEval)", line)


def _objects(text: str, source: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line or index, object) from JSONL or a JSON array."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(source, f"not valid JSON ({e.msg})", e.lineno) from None
        for i, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise DataError(source, f"item {i} of the JSON array is not an object")
            yield i, item
        return
    yield from iter_objects(text, source)


def parse_questions(text: str, source: str, max_prompts: int | None = None) -> list[EvalPrompt]:
    """Evaluation prompts from a question file's text; repeated ids are an error."""
    out: list[EvalPrompt] = []
    seen: dict[str, int] = {}
    for line, obj in _objects(text, source):
        q = _one(obj, source, line)
        if q.prompt_id in seen:
            raise DataError(source, f"id '{q.prompt_id}' repeats the question on line {seen[q.prompt_id]}", line)
        seen[q.prompt_id] = line
        out.append(q)
        if max_prompts and len(out) >= max_prompts:
            break
    if not out:
        raise DataError(source, "no questions")
    return out


def load_questions(uri: str, s3: S3Options | None = None, max_prompts: int | None = None) -> list[EvalPrompt]:
    return parse_questions(read_uri_bytes(uri, s3).decode("utf-8"), uri, max_prompts)

"""The JSONL records that stages exchange (see docs/architecture.md, "Records"). Field names are a contract.

Every reader goes through `parse_jsonl`, so malformed input always stops with the file, the line and
the field named, before anything is written or trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wrpo.errors import DataError

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


def _check_messages(messages: list[Message]) -> list[Message]:
    if not messages:
        raise ValueError("prompt has no messages")
    if messages[-1].role != "user":
        raise ValueError(f"the last message must come from the user, not '{messages[-1].role}'")
    if not messages[-1].content.strip():
        raise ValueError("the last user message is empty")
    return messages


class PromptRecord(BaseModel):
    """One prompt: `prompt` is a list of chat messages whose last one is from the user."""

    model_config = ConfigDict(extra="ignore")
    prompt_id: str = Field(min_length=1)
    prompt: list[Message]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: list[Message]) -> list[Message]:
        return _check_messages(v)


class SampleRecord(BaseModel):
    """N sampled responses of one model to one prompt."""

    model_config = ConfigDict(extra="ignore")
    prompt_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    responses: list[str]
    finish_reasons: list[str | None] = Field(default_factory=list)
    sampling: dict[str, Any] = Field(default_factory=dict)


class ScoreRecord(BaseModel):
    """Reward scores aligned with a SampleRecord's responses."""

    model_config = ConfigDict(extra="ignore")
    prompt_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    scores: list[float]
    reward_model: str = ""

    @field_validator("scores")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        for i, s in enumerate(v):
            if not math.isfinite(s):
                raise ValueError(f"score {i} is {s}: reward scores must be finite")
        return v


def _nonempty(name: str, value: str) -> str:
    if not value.strip():
        raise ValueError(f"{name} is empty")
    return value


class PreferenceRecord(BaseModel):
    """The WRPO quadruple (x, y_ws, y_wt, y_l), optionally with y_ls and further source answers."""

    model_config = ConfigDict(extra="ignore")
    prompt_id: str = Field(min_length=1)
    prompt: list[Message]
    chosen_source: str
    chosen_target: str
    rejected: str
    source_model: str = ""
    score_chosen_source: float | None = None
    score_chosen_target: float | None = None
    score_rejected: float | None = None
    rejected_source: str | None = None
    extra_chosen_source: list[str] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: list[Message]) -> list[Message]:
        return _check_messages(v)

    # field validators (not one record validator) so that an empty response's error names its field
    @field_validator("chosen_source", "chosen_target", "rejected", "rejected_source")
    @classmethod
    def _response_nonempty(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else _nonempty(info.field_name or "response", v)

    @field_validator("extra_chosen_source")
    @classmethod
    def _extras_nonempty(cls, v: list[str]) -> list[str]:
        for i, text in enumerate(v):
            _nonempty(f"extra_chosen_source[{i}]", text)
        return v


R = TypeVar("R", bound=BaseModel)


def _field_path(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "<record>"


def load_object(text: str, source: str, line: int) -> dict[str, Any]:
    """One JSONL line as a JSON object; DataError(source, line) when it is not one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(source, f"malformed JSON ({e.msg} at column {e.colno})", line) from None
    if not isinstance(obj, dict):
        raise DataError(source, f"expected a JSON object, got {type(obj).__name__}", line)
    return obj


def iter_objects(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL document."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, load_object(line, source, number)


def parse_line(text: str, model: type[R], source: str, line: int) -> R:
    """Parse one JSONL line into `model`, raising DataError(source, line, field) on any problem."""
    obj = load_object(text, source, line)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        raise DataError(source, msg, line, _field_path(err)) from None


def iter_jsonl(lines: Iterable[str], model: type[R], source: str) -> Iterator[tuple[int, R]]:
    """Yield (line number, record) from JSONL lines; blank lines are skipped; errors name source:line."""
    for number, text in enumerate(lines, start=1):
        if text.strip():
            yield number, parse_line(text, model, source, number)


def parse_jsonl(text: str, model: type[R], source: str, unique_ids: bool = True) -> list[R]:
    """Parse a whole JSONL document. With `unique_ids`, a repeated prompt_id (per model) is an error."""
    records: list[R] = []
    seen: dict[tuple[str, str], int] = {}
    for number, rec in iter_jsonl(text.splitlines(), model, source):
        key = (getattr(rec, "prompt_id", ""), getattr(rec, "model", ""))
        if unique_ids and key in seen:
            raise DataError(source, f"duplicate prompt_id '{key[0]}' (first on line {seen[key]})",
                            number, "prompt_id")
        seen.setdefault(key, number)
        records.append(rec)
    return records


def dump_jsonl(records: Iterable[BaseModel | dict[str, Any]]) -> str:
    """Serialise records to JSONL text (one compact object a line, UTF-8 kept readable)."""
    out = []
    for rec in records:
        obj = rec.model_dump(exclude_none=True) if isinstance(rec, BaseModel) else rec
        out.append(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
    return "".join(line + "\n" for line in out)


class SFTRecord(BaseModel):
    """One SFT example (sft.jsonl of select-sources): the prompt and the answer to imitate (y_ws).

    A preference quadruple is accepted too: its `chosen_source` becomes the response."""

    model_config = ConfigDict(extra="ignore")
    prompt_id: str = Field(min_length=1)
    prompt: list[Message]
    response: str

    @model_validator(mode="before")
    @classmethod
    def _from_preference(cls, data: Any) -> Any:
        if isinstance(data, dict) and "response" not in data and "chosen_source" in data:
            return {**data, "response": data["chosen_source"]}
        return data

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: list[Message]) -> list[Message]:
        return _check_messages(v)

    @field_validator("response")
    @classmethod
    def _response(cls, v: str) -> str:
        return _nonempty("response", v)

"""The JSONL records that stages exchange (see docs/architecture.md, "Records"). Field names are a contract.

Every reader goes through `parse_jsonl`, so malformed input always stops with the file, the line and
the field named, before anything is written or trained. Bytes from users' files go through
`decode_text` first: UTF-8 with or without a byte-order mark, any line ending; anything else is an
error naming the file, the line and the byte offset.
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


_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
         b"\xfe\xff": "UTF-16"}


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 text of a user's file: a byte-order mark is dropped; other encodings are a DataError naming
    the line and the byte offset of the first byte that is not UTF-8."""
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise DataError(source, f"is {name} (byte-order mark {bom.hex(' ').upper()}); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(source, f"is not UTF-8: byte 0x{data[e.start]:02X} at byte offset {e.start} (column "
                        f"{e.start - line_start + 1} of the line); save the file as UTF-8", line) from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_object(text: str, source: str, line: int) -> dict[str, Any]:
    """One JSONL line as a JSON object; DataError(source, line) when it is not one (or repeats a key)."""
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DataError(source, f"duplicate key '{e.args[0]}' in one object", line) from None
    except json.JSONDecodeError as e:
        hint = "; the file looks like one JSON document, not JSON Lines (one object per line)" \
            if line == 1 and text.lstrip().startswith("[") else ""
        raise DataError(source, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}){hint}",
                        line) from None
    if not isinstance(obj, dict):
        raise DataError(source, f"expected a JSON object, got {json_kind(obj)}", line)
    return obj


def json_kind(value: Any) -> str:
    """`a string`, `an array`, ... : what a JSON value is, in JSON's words (for messages)."""
    return {list: "an array", dict: "an object", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def json_value(value: Any) -> str:
    """A JSON value as written in JSON (true, null, "text", NaN), cut to 60 characters, for messages."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_message(err: Any) -> str:
    """A pydantic error of a record field in plain words, with what was found where that helps."""
    if err["type"] == "missing":
        return "is required"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        msg = "Input should be an object"
    if err["type"].endswith("_type") or err["type"] == "literal_error":
        msg += f", got {json_value(err.get('input'))}"
    return msg


def lines_of(text: str) -> list[str]:
    """JSONL lines: split at '\n' only ('\r\n' too), never inside a JSON string at U+2028 or U+0085 as
    `str.splitlines` would."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The JSONL lines of a byte stream read in chunks (`lines_of` of the decoded whole, without ever
    holding the whole): split at b'\n' only, each line decoded as UTF-8 with a '\r' before the '\n'
    dropped; a last line without '\n' is yielded too, and an empty stream is one empty line, as in
    `lines_of`. Stage objects are written as UTF-8 by `dump_jsonl`; users' files go through
    `decode_text`."""
    tail = b""
    for chunk in chunks:
        lines = (tail + chunk).split(b"\n") if tail else chunk.split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line.decode("utf-8").removesuffix("\r")
    yield tail.decode("utf-8").removesuffix("\r")


def iter_objects(text: str, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL document."""
    for number, line in enumerate(lines_of(text), start=1):
        if line.strip():
            yield number, load_object(line, source, number)


def parse_line(text: str, model: type[R], source: str, line: int) -> R:
    """Parse one JSONL line into `model`, raising DataError(source, line, field) on any problem."""
    obj = load_object(text, source, line)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise DataError(source, validation_message(err), line, _field_path(err)) from None


def iter_jsonl(lines: Iterable[str], model: type[R], source: str) -> Iterator[tuple[int, R]]:
    """Yield (line number, record) from JSONL lines; blank lines are skipped; errors name source:line."""
    for number, text in enumerate(lines, start=1):
        if text.strip():
            yield number, parse_line(text, model, source, number)


def parse_jsonl(text: str, model: type[R], source: str, unique_ids: bool = True) -> list[R]:
    """Parse a whole JSONL document. With `unique_ids`, a repeated prompt_id (per model) is an error."""
    records: list[R] = []
    seen: dict[tuple[str, str], int] = {}
    for number, rec in iter_jsonl(lines_of(text), model, source):
        key = (getattr(rec, "prompt_id", ""), getattr(rec, "model", ""))
        if unique_ids and key in seen:
            raise DataError(source, f"duplicate prompt_id '{key[0]}' (first on line {seen[key]})",
                            number, "prompt_id")
        seen.setdefault(key, number)
        records.append(rec)
    return records


_PID_PREFIX = '{"prompt_id":'
_DECODER = json.JSONDecoder()


def prompt_id_of(text: str) -> str | None:
    """The prompt id of one JSONL line, None when it has none. A line as `dump_line` writes the records
    (compact, `prompt_id` first) gives it without parsing the rest, which is how the shards of a data
    stage skip the other shards' records cheaply (docs/data.md, "Shards"); any other line is parsed."""
    if text.startswith(_PID_PREFIX):
        try:
            value = _DECODER.raw_decode(text, len(_PID_PREFIX))[0]
        except ValueError:
            value = None
        if isinstance(value, str):
            return value
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    value = obj.get("prompt_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def dump_line(rec: BaseModel | dict[str, Any]) -> str:
    """One record as a JSONL line, '\n' included (compact, UTF-8 kept readable)."""
    obj = rec.model_dump(exclude_none=True) if isinstance(rec, BaseModel) else rec
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def dump_jsonl(records: Iterable[BaseModel | dict[str, Any]]) -> str:
    """Serialise records to JSONL text (one compact object a line, UTF-8 kept readable)."""
    return "".join(dump_line(rec) for rec in records)


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

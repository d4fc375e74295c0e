"""Prompt preparation: load a dataset, normalise prompts to the prompt record, drop empties and duplicates,
split deterministically into SFT / PO / eval.

Loading (JSONL, Parquet, a `datasets` folder; local or s3://) is the I/O edge; everything after it is a pure
function over rows. The split of a prompt depends only on a hash of (seed, prompt_id), so adding prompts
to the dataset never moves an existing prompt between SFT and PO. (The eval holdout is the `eval_size`
PO prompts with the smallest second hash; adding prompts can only move a prompt between eval and PO.)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from wrpo.errors import DataError
from wrpo.records import Message, PromptRecord, decode_text, iter_objects, json_kind, json_value, validation_message
from wrpo.storage import S3Options, download_uri_tree, read_uri_bytes


@dataclass
class PrepareReport:
    """What normalisation kept and dropped."""

    rows: int = 0
    kept: int = 0
    dropped_empty: int = 0
    dropped_duplicates: int = 0
    dropped_over_max: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Split:
    sft: list[PromptRecord]
    po: list[PromptRecord]
    eval: list[PromptRecord]


# ---------------------------------------------------------------------------------------------- loading


def detect_format(uri: str, fmt: str = "auto") -> str:
    """jsonl / parquet / hf-disk from the URI's suffix (a folder means a `datasets` save_to_disk folder)."""
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if uri.startswith("s3://") or Path(uri).is_dir():
        return "hf-disk"
    raise DataError(uri, "cannot tell the dataset format from the name; set dataset.format")


Rows = Iterable[tuple[int, dict[str, Any]]]


def load_rows(uri: str, fmt: str = "auto", s3: S3Options | None = None) -> Rows:
    """(row number, row) pairs from a JSONL/Parquet file or a `datasets` folder, local or on S3.

    JSONL is read as UTF-8 with or without a byte-order mark and with any line ending; rows are numbered
    by line, so errors name the file and line (and the byte offset of bytes that are not UTF-8)."""
    fmt = detect_format(uri, fmt)
    if fmt == "jsonl":
        return _jsonl_rows(uri, decode_text(read_uri_bytes(uri, s3), uri))
    if fmt == "parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(read_uri_bytes(uri, s3)))
        except (pa.ArrowException, OSError) as e:
            raise DataError(uri, f"not a readable Parquet file ({e})") from None
        return enumerate(table.to_pylist(), start=1)
    return _hf_rows(uri, s3)


def _jsonl_rows(uri: str, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    return iter_objects(text, uri)


def _hf_rows(uri: str, s3: S3Options | None) -> Iterable[tuple[int, dict[str, Any]]]:
    import datasets

    with tempfile.TemporaryDirectory(prefix="wrpo-ds-") as tmp:
        local = download_uri_tree(uri, Path(tmp), s3) if uri.startswith("s3://") else Path(uri)
        try:
            ds = datasets.load_from_disk(str(local))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(uri, f"not a `datasets` folder saved with save_to_disk ({e}); set dataset.format "
                            "for a JSONL or Parquet file") from None
        if isinstance(ds, datasets.DatasetDict):
            split = "train" if "train" in ds else next(iter(ds))
            ds = ds[split]
        rows = list(enumerate(ds.to_list(), start=1))
    return rows


# ---------------------------------------------------------------------------------------------- normalising


def prompt_messages(value: Any, source: str, row: int, field_name: str) -> list[Message] | None:
    """A string or a list of chat messages -> messages; None if the prompt is empty.

    A prompt whose last message is not from the user is an error, not a silent drop."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if not isinstance(value, list):
        raise DataError(source, f"expected a string or a list of messages, got {json_kind(value)}",
                        row, field_name)
    if not value:
        return None
    messages = []
    for i, m in enumerate(value):
        try:
            messages.append(Message.model_validate(m))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise DataError(source, validation_message(err), row, f"{field_name}[{i}].{loc}".rstrip(".")) from None
    if messages[-1].role != "user":
        raise DataError(source, f"the last message must come from the user, not '{messages[-1].role}'",
                        row, field_name)
    if not messages[-1].content.strip():
        return None
    return messages


def text_id(messages: Sequence[Message]) -> str:
    """A stable id from the prompt's content (used when the dataset has no id field)."""
    blob = json.dumps([m.model_dump() for m in messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def normalise(rows: Iterable[tuple[int, dict[str, Any]]], source: str, prompt_field: str = "prompt",
              id_field: str | None = "prompt_id", max_prompts: int | None = None,
              ) -> tuple[list[PromptRecord], PrepareReport]:
    """Prompt records in input order: empties and repeated prompts dropped (counted), ids unique.

    The same id with a different prompt is an error (naming both rows); the same prompt under two ids
    keeps the first."""
    report = PrepareReport()
    by_id: dict[str, tuple[int, str]] = {}
    seen_text: set[str] = set()
    out: list[PromptRecord] = []
    for row_no, row in rows:
        report.rows += 1
        if prompt_field not in row:
            raise DataError(source, "is missing (dataset.promptField names the field that holds the prompt)",
                            row_no, prompt_field)
        messages = prompt_messages(row[prompt_field], source, row_no, prompt_field)
        if messages is None:
            report.dropped_empty += 1
            continue
        key = text_id(messages)
        pid = _row_id(row, id_field, key, source, row_no)
        if pid in by_id:
            first_row, first_key = by_id[pid]
            if first_key != key:
                raise DataError(source, f"duplicate prompt_id '{pid}' with a different prompt "
                                f"(first on row {first_row})", row_no, id_field)
            report.dropped_duplicates += 1
            continue
        if key in seen_text:
            report.dropped_duplicates += 1
            continue
        by_id[pid] = (row_no, key)
        seen_text.add(key)
        out.append(PromptRecord(prompt_id=pid, prompt=messages))
    if max_prompts is not None and len(out) > max_prompts:
        report.dropped_over_max = len(out) - max_prompts
        out = out[:max_prompts]
    report.kept = len(out)
    return out, report


def _row_id(row: dict[str, Any], id_field: str | None, fallback: str, source: str, row_no: int) -> str:
    if id_field is None or row.get(id_field) is None:
        return fallback
    value = row[id_field]
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise DataError(source, f"must be a non-empty string or integer (dataset.idField), got {json_value(value)}",
                        row_no, id_field)
    return str(value)


# ---------------------------------------------------------------------------------------------- splitting


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) from sha256 of the parts: the same inputs always give the same number."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(prompts: Sequence[PromptRecord], sft_fraction: float, eval_size: int, seed: int) -> Split:
    """SFT if hash(seed, id) < sft_fraction, else PO; eval = the `eval_size` PO prompts with the smallest
    second hash. Every list keeps the input order."""
    sft, po = [], []
    for p in prompts:
        (sft if unit_hash(seed, "split", p.prompt_id) < sft_fraction else po).append(p)
    by_eval_hash = sorted(po, key=lambda p: unit_hash(seed, "eval", p.prompt_id))
    eval_ids = {p.prompt_id for p in by_eval_hash[:eval_size]}
    return Split(sft=sft, po=[p for p in po if p.prompt_id not in eval_ids],
                 eval=[p for p in po if p.prompt_id in eval_ids])


def check_splits(split: Split, source: str, sft_fraction: float, eval_size: int, report: PrepareReport) -> None:
    """Refuse a split the spec asked for (SFT and preference always, eval with evalSize > 0) that came out
    empty, naming the counts, before anything is written: a later stage would fail on it, or train on
    nothing. (Eval prompts come out of the preference split, so eval is short only when that is empty.)"""
    asked = [("SFT", len(split.sft)), ("preference (po)", len(split.po))]
    if eval_size:
        asked.append(("eval", len(split.eval)))
    empty = [name for name, n in asked if n == 0]
    if empty:
        raise DataError(source, f"{report.kept} prompts (of {report.rows} rows; {report.dropped_empty} empty, "
                        f"{report.dropped_duplicates} duplicates, {report.dropped_over_max} over maxPrompts) split "
                        f"into sft={len(split.sft)}, po={len(split.po)}, eval={len(split.eval)} by "
                        f"dataset.sftFraction {sft_fraction:g} and dataset.evalSize {eval_size}: the "
                        f"{' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty; add prompts or "
                        "change dataset.sftFraction / dataset.evalSize")

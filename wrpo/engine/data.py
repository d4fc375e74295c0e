"""Training data: reading and checking JSONL (before any training starts), encoding, collators, and the
stored reference log-probs.

Responses are addressed by their record field names: `chosen_source` (y_ws), `chosen_target` (y_wt),
`rejected` (y_l), `rejected_source` (y_ls) and `extra_chosen_source[i]`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wrpo.engine.collate import Layout, Limits, collate, encode_example
from wrpo.errors import DataError
from wrpo.records import PreferenceRecord, SFTRecord, iter_jsonl


def record_responses(rec: PreferenceRecord) -> dict[str, str]:
    """Every response a quadruple holds, by name."""
    out = {"chosen_source": rec.chosen_source, "chosen_target": rec.chosen_target, "rejected": rec.rejected}
    if rec.rejected_source is not None:
        out["rejected_source"] = rec.rejected_source
    out.update({f"extra_chosen_source[{i}]": t for i, t in enumerate(rec.extra_chosen_source)})
    return out


def _read_records(path: Path, model: type) -> list[tuple[int, Any]]:
    source = str(path)
    if not path.is_file():
        raise DataError(source, "file not found")
    seen: dict[str, int] = {}
    out = []
    with path.open(encoding="utf-8") as fh:
        for line, rec in iter_jsonl(fh, model, source):
            if rec.prompt_id in seen:
                raise DataError(source, f"duplicate prompt_id '{rec.prompt_id}' (first on line "
                                f"{seen[rec.prompt_id]})", line, "prompt_id")
            seen[rec.prompt_id] = line
            out.append((line, rec))
    if not out:
        raise DataError(source, "no records")
    return out


def load_preferences(path: Path, needed: tuple[str, ...]) -> list[PreferenceRecord]:
    """Parse and check a preference JSONL; every record must hold the `needed` responses."""
    records = _read_records(Path(path), PreferenceRecord)
    for line, rec in records:
        have = record_responses(rec)
        for name in needed:
            if name not in have:
                field = name.split("[")[0]
                raise DataError(str(path), f"'{name}' is needed by this training configuration", line, field)
    return [rec for _, rec in records]


def load_sft(path: Path) -> list[SFTRecord]:
    """Parse and check an SFT JSONL ({prompt_id, prompt, response} or preference quadruples)."""
    return [rec for _, rec in _read_records(Path(path), SFTRecord)]


def messages(rec: PreferenceRecord | SFTRecord) -> list[dict[str, str]]:
    return [m.model_dump() for m in rec.prompt]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the vocabulary/merges, the chat template and EOS."""
    backend = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else ""
    blob = json.dumps([backend, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- reference log-probs stored beside the dataset ---------------------------------------------------------

def ref_meta_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name.removesuffix(".jsonl") + ".meta.json")


def write_ref_logps(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """One line per prompt: {prompt_id, logps: {name: float}, tokens: {name: int}}; meta in a sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8")
    ref_meta_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_ref_logps(path: Path, expected_meta: dict[str, Any]) -> dict[str, dict[str, float]]:
    """prompt_id → {response name: reference log-prob}; refuses values made with other settings."""
    path = Path(path)
    if not path.is_file() or not ref_meta_path(path).is_file():
        raise DataError(str(path), "reference log-probs not found: run `wrpo ref-logps` first "
                        "(or train with --reference on-the-fly)")
    meta = json.loads(ref_meta_path(path).read_text(encoding="utf-8"))
    for key, value in expected_meta.items():
        if meta.get(key) != value:
            raise DataError(str(ref_meta_path(path)), f"computed with {key}={meta.get(key)!r} but training "
                            f"uses {value!r}: recompute with `wrpo ref-logps`", field=key)
    out = {}
    with path.open(encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if text.strip():
                try:
                    row = json.loads(text)
                    out[row["prompt_id"]] = {k: float(v) for k, v in row["logps"].items()}
                except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                    raise DataError(str(path), f"malformed reference row ({e})", line) from None
    return out


def ref_meta(tokenizer: Any, limits: Limits) -> dict[str, Any]:
    """What stored reference log-probs depend on, checked when training reads them."""
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "max_length": limits.max_length,
            "max_prompt_length": limits.max_prompt_length, "max_response_length": limits.max_response_length}


# -- encoded datasets and collators ------------------------------------------------------------------------

class ListDataset(torch.utils.data.Dataset):
    """A list of already encoded items."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def encode_preferences(records: list[PreferenceRecord], names: tuple[str, ...], tokenizer: Any,
                       limits: Limits, reference: dict[str, dict[str, float]] | None,
                       source: str) -> ListDataset:
    """Encode each record's `names` responses; attach the reference log-probs in the same order."""
    items = []
    for rec in records:
        texts = record_responses(rec)
        item: dict[str, Any] = {"example": encode_example(tokenizer, messages(rec), [texts[n] for n in names],
                                                          limits), "reference": None}
        if reference is not None:
            if rec.prompt_id not in reference or any(n not in reference[rec.prompt_id] for n in names):
                raise DataError(source, f"no reference log-probs for prompt_id '{rec.prompt_id}' "
                                f"({', '.join(names)}): recompute with `wrpo ref-logps`", field="prompt_id")
            item["reference"] = [reference[rec.prompt_id][n] for n in names]
        items.append(item)
    return ListDataset(items)


@dataclass
class PreferenceCollator:
    """Collates encoded items into one forward's batch (+ `reference_logps` [B, R] when stored)."""

    pad_id: int
    layout: Layout = "padded"

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate([it["example"] for it in items], self.layout, self.pad_id)
        if items[0].get("reference") is not None:
            batch["reference_logps"] = torch.tensor([it["reference"] for it in items], dtype=torch.float64)
        return batch


@dataclass
class SFTCollator:
    """SFT batches: one sequence per example, labels on the response (or everything), padded or packed."""

    pad_id: int
    layout: Layout = "padded"
    completion_only: bool = True

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate([it["example"] for it in items], self.layout, self.pad_id,
                       prompt_labels=not self.completion_only)


def encode_sft(records: list[SFTRecord], tokenizer: Any, limits: Limits) -> ListDataset:
    return ListDataset([{"example": encode_example(tokenizer, messages(r), [r.response], limits)}
                        for r in records])


def limits_of(cfg: Any) -> Limits:
    return Limits(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)

"""Reference log-probs computed once (`wrpo ref-logps`) and stored beside the dataset.

πref is fixed during WRPO (it is Target-SFT), so log πref(y|x) of every response is computed in one
no-grad pass, and the trainer never loads a reference model: one model's memory and a third of the
forward compute are saved per step. The values depend on the tokenizer and the truncation settings; both
are stored in `<out>.meta.json` and checked by the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wrpo.engine.collate import EncodedExample, Limits, collate, encode_example
from wrpo.engine.common import model_dtype
from wrpo.engine.config import default_ref_path
from wrpo.engine.data import load_preferences, messages, record_responses, ref_meta, write_ref_logps
from wrpo.engine.logps import sequence_logps


def _encoded(records: list, tokenizer: Any, limits: Limits) -> list[tuple[str, str, EncodedExample]]:
    """(prompt_id, response name, one-response example) for every response of every record."""
    out = []
    for rec in records:
        for name, text in record_responses(rec).items():
            out.append((rec.prompt_id, name, encode_example(tokenizer, messages(rec), [text], limits)))
    return out


def _batches(items: list, size: int):
    # longest first: the padded layout wastes least, and an out-of-memory error comes at once
    order = sorted(items, key=lambda it: -(len(it[2].prompt_ids) + len(it[2].response_ids[0])))
    for i in range(0, len(order), size):
        yield order[i:i + size]


def compute_reference_logps(model_dir: Path, data_path: Path, out_path: Path | None = None, *,
                            max_length: int = 2048, max_prompt_length: int = 1024, batch_size: int = 8,
                            layout: str = "padded", precision: str = "auto",
                            attn_implementation: str = "sdpa", chunk_size: int = 1024) -> Path:
    """log πref(y|x) for every response of every quadruple in `data_path` → `out_path` (JSONL + meta).

    `out_path` defaults to `<data>.ref_logps.jsonl` beside the data. Use the same max_length and
    max_prompt_length as the WRPO run (checked there). Returns the path written.
    """
    from transformers import AutoModelForCausalLM

    from wrpo.engine.common import load_tokenizer

    out_path = Path(out_path) if out_path else default_ref_path(Path(data_path))
    tok, limits = load_tokenizer(Path(model_dir)), Limits(max_length, max_prompt_length)
    if _blank(Path(data_path)):  # an empty split (no held-out prompts: `dataset.evalSize: 0`, the default, or
        # a shard with no share of it): an empty file with its meta, which the trainer reads as "no eval data"
        write_ref_logps(out_path, [], {**ref_meta(tok, limits), "reference_model": str(model_dir), "records": 0})
        return out_path
    records = load_preferences(Path(data_path), ())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model_dtype(precision),
                                                 attn_implementation=attn_implementation).to(device).eval()
    rows: dict[str, dict[str, dict[str, float]]] = {r.prompt_id: {"logps": {}, "tokens": {}} for r in records}
    with torch.no_grad():
        for batch_items in _batches(_encoded(records, tok, limits), batch_size):
            batch = collate([it[2] for it in batch_items], layout, tok.pad_token_id)  # type: ignore[arg-type]
            batch = {k: v.to(device) for k, v in batch.items()}
            sums, counts = sequence_logps(model, batch, chunk_size)
            for (pid, name, _), s, n in zip(batch_items, sums.tolist(), counts.tolist(), strict=True):
                rows[pid]["logps"][name], rows[pid]["tokens"][name] = s, n
    write_ref_logps(out_path, [{"prompt_id": pid, **v} for pid, v in rows.items()],
                    {**ref_meta(tok, limits), "reference_model": str(model_dir), "records": len(records)})
    return out_path


def _blank(path: Path) -> bool:
    """The file exists and has no record (only blank lines); a missing file is load_preferences' error."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8") as fh:
        return not any(line.strip() for line in fh)

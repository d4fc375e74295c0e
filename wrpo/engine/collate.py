"""Tokenisation and collation of prompts and responses into one forward pass.

A prompt is a list of chat messages; it is rendered with the tokenizer's chat template and the generation
prompt, then tokenised *without* added special tokens (the template already holds BOS where the model
wants one, so nothing is doubled). Each response is tokenised on its own, as the sampler produced it after
that prompt, and ends with exactly one end-of-turn token (the tokenizer's EOS). Labels cover response
tokens only.

Truncation is per response: a prompt keeps its last `max_prompt_length` tokens (and its BOS), each response
keeps its first `max_length - len(prompt)` tokens (at most `max_response_length`), so a long source answer
never clips the others. A response cut short loses its EOS: the model must not learn to stop there.

Three layouts of the same sequences, with the same log-probs (tested):
- `padded`: one row per sequence, right-padded, with an attention mask — works with every attention kernel.
- `packed`: all sequences in one row, position ids restarting at 0 for each; transformers derives the
  per-sequence (varlen) attention from the position ids. No compute is spent on padding, but on kernels
  without varlen support (eager/SDPA) the block-diagonal mask costs O(N²) for N tokens in the batch.
- `shared`: shared-prompt packing, one row per example: the prompt once, then each of its responses, every
  response attending to the prompt and to itself (a 4-D boolean mask [B, 1, T, T]), position ids restarting
  at len(prompt) for each response, so every response sees exactly what it sees in a row of its own. A
  quadruple's prompt is encoded once for its three responses instead of three times.

Every layout names its prediction targets explicitly (`target_ids`, `target_positions`, `target_sequence`:
the token, the flat index `row·T + t` of the hidden state that predicts it, and its sequence), because in
the shared layout one position (the prompt's last token) predicts the first token of every response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE = -100
Layout = Literal["padded", "packed", "shared"]


@dataclass(frozen=True)
class Limits:
    """Token budgets. max_length bounds prompt + one response."""

    max_length: int = 2048
    max_prompt_length: int = 1024
    max_response_length: int | None = None

    def __post_init__(self):
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length must be in (0, max_length={self.max_length}), "
                             f"got {self.max_prompt_length}")


@dataclass(frozen=True)
class EncodedExample:
    """One prompt and its responses as token ids (responses in the order the loss expects them)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], max_prompt_length: int) -> list[int]:
    """Render `messages` with the chat template and the generation prompt; keep the end if too long."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_prompt_length:
        return ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos:  # keep BOS: the model has always seen one first
        return [bos] + ids[len(ids) - max_prompt_length + 1:]
    return ids[len(ids) - max_prompt_length:]


def encode_response(tokenizer: Any, text: str, budget: int) -> list[int]:
    """Token ids of one response + exactly one EOS (end of turn), cut to `budget` tokens.

    A trailing EOS already in the text is not doubled; a response cut by the budget ends without EOS.
    """
    eos_text, eos = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    return ids[:budget]


def encode_example(tokenizer: Any, messages: Sequence[dict[str, str]], responses: Sequence[str],
                   limits: Limits) -> EncodedExample:
    """Prompt ids plus each response's ids, truncated per response (see module docstring)."""
    prompt = encode_prompt(tokenizer, messages, limits.max_prompt_length)
    budget = limits.max_length - len(prompt)
    if limits.max_response_length is not None:
        budget = min(budget, limits.max_response_length)
    return EncodedExample(prompt, [encode_response(tokenizer, r, budget) for r in responses])


def _sequences(examples: Sequence[EncodedExample], prompt_labels: bool) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per sequence, example-major: sequence b·R + r is response r of example b.

    A sequence's first token is never a label (nothing predicts it; in a packed row the previous
    sequence's last token must not be trained to predict it)."""
    out = []
    for ex in examples:
        for resp in ex.response_ids:
            labels = (ex.prompt_ids if prompt_labels else [IGNORE] * len(ex.prompt_ids)) + resp
            out.append((ex.prompt_ids + resp, [IGNORE] + labels[1:]))
    return out


def _targets(rows: Sequence[Sequence[tuple[int, int, int]]], width: int) -> dict[str, Tensor]:
    """Flat target arrays from per-row (position predicting it, token, sequence) triples."""
    flat = [(r * width + p, tok, s) for r, row in enumerate(rows) for p, tok, s in row]
    cols = list(zip(*flat, strict=True)) if flat else [(), (), ()]
    return {"target_positions": torch.tensor(cols[0], dtype=torch.long),
            "target_ids": torch.tensor(cols[1], dtype=torch.long),
            "target_sequence": torch.tensor(cols[2], dtype=torch.long)}


def _row_targets(labels: Sequence[int], offset: int, seq: int) -> list[tuple[int, int, int]]:
    """Position t predicts token t+1: a label at index j is predicted from offset + j − 1."""
    return [(offset + j - 1, lab, seq) for j, lab in enumerate(labels) if lab != IGNORE]


def collate_padded(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int,
                   pad_to_multiple_of: int = 1) -> dict[str, Tensor]:
    """One right-padded row per sequence.

    input_ids, attention_mask, labels: [S, T]; sequence_index: [S, T] (row s is sequence s).
    """
    width = max(len(ids) for ids, _ in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for s, (ids, lab) in enumerate(seqs):
        input_ids[s, : len(ids)] = torch.tensor(ids)
        labels[s, : len(lab)] = torch.tensor(lab)
        mask[s, : len(ids)] = 1
    index = torch.arange(len(seqs)).unsqueeze(1).expand(-1, width)
    targets = _targets([_row_targets(lab, 0, s) for s, (_, lab) in enumerate(seqs)], width)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "sequence_index": index,
            **targets}


def collate_packed(seqs: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    """All sequences concatenated in one row, positions restarting at 0 per sequence, no attention mask.

    input_ids, position_ids, labels, sequence_index: [1, N] with N = Σ sequence lengths.
    """
    ids = [t for seq, _ in seqs for t in seq]
    labels = [t for _, lab in seqs for t in lab]
    positions = [p for seq, _ in seqs for p in range(len(seq))]
    index = [s for s, (seq, _) in enumerate(seqs) for _ in seq]
    starts = [0]
    for seq, _ in seqs[:-1]:
        starts.append(starts[-1] + len(seq))
    row = [t for s, (_, lab) in enumerate(seqs) for t in _row_targets(lab, starts[s], s)]
    return {"input_ids": _row(ids), "position_ids": _row(positions), "labels": _row(labels),
            "sequence_index": _row(index), **_targets([row], len(ids))}


def collate_shared(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, Tensor]:
    """One row per example: prompt, then its R responses, each attending to the prompt and to itself.

    input_ids, position_ids: [B, T]; attention_mask: [B, 1, T, T] boolean (True = may attend); segment:
    [B, T] (0 prompt, r+1 response r, −1 padding). Sequence b·R + r is response r of example b.
    A padding position attends to itself only (a query with nothing to attend to would give NaN).
    """
    lengths = [len(ex.prompt_ids) + sum(len(r) for r in ex.response_ids) for ex in examples]
    width = max(lengths)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    segment = torch.full((len(examples), width), -1, dtype=torch.long)
    rows = []
    for b, ex in enumerate(examples):
        n_prompt, start, row = len(ex.prompt_ids), len(ex.prompt_ids), []
        input_ids[b, :n_prompt] = torch.tensor(ex.prompt_ids)
        positions[b, :n_prompt] = torch.arange(n_prompt)
        segment[b, :n_prompt] = 0
        for r, resp in enumerate(ex.response_ids):
            end = start + len(resp)
            input_ids[b, start:end] = torch.tensor(resp)
            positions[b, start:end] = torch.arange(n_prompt, n_prompt + len(resp))
            segment[b, start:end] = r + 1
            seq = b * len(ex.response_ids) + r
            # token k of the response is predicted by token k−1 of it, its first token by the prompt's last
            row += [(n_prompt - 1 if k == 0 else start + k - 1, tok, seq) for k, tok in enumerate(resp)
                    if k or n_prompt]
            start = end
        rows.append(row)
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": shared_prompt_mask(segment),
            "segment": segment, **_targets(rows, width)}


def shared_prompt_mask(segment: Tensor) -> Tensor:
    """[B, T] segment ids (0 prompt, r+1 response r, −1 padding) → [B, 1, T, T] boolean attention mask."""
    q, k = segment.unsqueeze(2), segment.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    return (visible | torch.eye(width, dtype=torch.bool)).unsqueeze(1)


def _row(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.long).unsqueeze(0)  # (1, N)


def collate(examples: Sequence[EncodedExample], layout: Layout, pad_id: int,
            prompt_labels: bool = False, pad_to_multiple_of: int = 1) -> dict[str, Tensor]:
    """Every response of every example in one batch for one forward pass (see the layouts above).

    Adds `num_sequences` (S = B·R) and `responses_per_example` (R) as 0-d tensors.
    """
    counts = {len(ex.response_ids) for ex in examples}
    if len(counts) != 1:
        raise ValueError(f"every example needs the same number of responses, got {sorted(counts)}")
    if layout == "shared":
        if prompt_labels:
            raise ValueError("the shared layout trains responses only (prompt_labels needs padded or packed)")
        batch = collate_shared(examples, pad_id)
    else:
        seqs = _sequences(examples, prompt_labels)
        batch = collate_padded(seqs, pad_id, pad_to_multiple_of) if layout == "padded" else collate_packed(seqs)
    batch["num_sequences"] = torch.tensor(len(examples) * counts.pop())
    batch["responses_per_example"] = torch.tensor(len(examples[0].response_ids))
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keys of a collated batch that go into the model's forward."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}

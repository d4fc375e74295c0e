"""Tokenisation and collation on ChatML-like and Llama-3-like templates, with exact label spans; the
shared-prompt layout's positions, mask and targets by hand."""

from __future__ import annotations

import pytest
import torch

from wrpo.engine.collate import IGNORE, EncodedExample, Limits, collate, encode_example, encode_prompt
from wrpo.models.tiny import write_tiny_tokenizer

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]
RESPONSES = ["The capital of Spain is Madrid.", "Madrid.", "Paris is the capital of Spain."]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request):
    return write_tiny_tokenizer(style=request.param)


def test_prompt_is_the_rendered_template_without_doubled_bos(tok):
    ids = encode_prompt(tok, CHAT, max_prompt_length=1000)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == text
    if tok.bos_token is not None:  # Llama-3 style: the template writes BOS and the tokenizer would add one
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap we avoid
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_each_response_ends_with_one_eos_and_labels_are_exact(tok):
    ex = encode_example(tok, CHAT, RESPONSES, Limits(max_length=512, max_prompt_length=256))
    batch = collate([ex], "padded", pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 3 and int(batch["responses_per_example"]) == 3
    n_prompt = len(ex.prompt_ids)
    for r, text in enumerate(RESPONSES):
        resp = ex.response_ids[r]
        assert resp[-1] == tok.eos_token_id and resp.count(tok.eos_token_id) == 1
        assert tok.decode(resp) == text + tok.eos_token
        labels = batch["labels"][r]
        span = (labels != IGNORE).nonzero().flatten().tolist()
        assert span == list(range(n_prompt, n_prompt + len(resp)))  # exactly the response, nothing else
        assert labels[span].tolist() == resp
        assert batch["input_ids"][r, :n_prompt].tolist() == ex.prompt_ids
        assert batch["attention_mask"][r].sum().item() == n_prompt + len(resp)


def test_eos_already_in_the_text_is_not_doubled(tok):
    ex = encode_example(tok, CHAT, ["Madrid." + tok.eos_token], Limits(max_length=512, max_prompt_length=256))
    assert ex.response_ids[0].count(tok.eos_token_id) == 1


def test_truncation_is_per_response(tok):
    long = " ".join(["The capital of Spain is Madrid and it is a large city."] * 40)
    limits = Limits(max_length=120, max_prompt_length=60)
    ex = encode_example(tok, CHAT, [long, "Madrid.", "Paris."], limits)
    assert len(ex.prompt_ids) <= 60
    assert len(ex.prompt_ids) + len(ex.response_ids[0]) == 120  # the long one is cut to the budget ...
    assert ex.response_ids[0][-1] != tok.eos_token_id  # ... and does not pretend to end
    assert tok.decode(ex.response_ids[1]) == "Madrid." + tok.eos_token  # the others are untouched
    assert tok.decode(ex.response_ids[2]) == "Paris." + tok.eos_token


def test_long_prompt_keeps_its_end_and_bos(tok):
    chat = [{"role": "user", "content": "Tell me about the sea. " * 50 + "Now answer: why is the sky blue?"}]
    ids = encode_prompt(tok, chat, max_prompt_length=30)
    assert len(ids) == 30
    full = encode_prompt(tok, chat, max_prompt_length=10_000)
    if tok.bos_token is not None:
        assert ids[0] == tok.bos_token_id and ids[1:] == full[-29:]
    else:
        assert ids == full[-30:]
    assert tok.decode(ids).endswith(tok.decode(full[-8:]))  # the generation prompt survives


def test_response_budget_cap(tok):
    ex = encode_example(tok, CHAT, ["word " * 100], Limits(max_length=2048, max_prompt_length=512,
                                                            max_response_length=16))
    assert len(ex.response_ids[0]) == 16


def test_packed_and_padded_hold_the_same_sequences():
    examples = [EncodedExample([1, 2, 3], [[4, 5], [6], [7, 8, 9]]),
                EncodedExample([10], [[11], [12, 13], [14]])]
    padded = collate(examples, "padded", pad_id=0)
    packed = collate(examples, "packed", pad_id=0)
    assert padded["input_ids"].shape == (6, 6)
    assert packed["input_ids"].shape == (1, 5 + 4 + 6 + 2 + 3 + 2)
    assert "attention_mask" not in packed
    for s in range(6):
        row = padded["attention_mask"][s].bool()
        seg = packed["sequence_index"][0] == s
        assert padded["input_ids"][s][row].tolist() == packed["input_ids"][0][seg].tolist()
        assert padded["labels"][s][row].tolist() == packed["labels"][0][seg].tolist()
        assert packed["position_ids"][0][seg].tolist() == list(range(int(seg.sum())))
    assert padded["labels"][0].tolist() == [IGNORE] * 3 + [4, 5] + [IGNORE]


def test_prompt_labels_for_sft_and_padding_multiple():
    batch = collate([EncodedExample([1, 2], [[3, 4]])], "padded", pad_id=0, prompt_labels=True,
                    pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0, :4].tolist() == [IGNORE, 2, 3, 4]  # the first token is never predicted


def test_targets_of_padded_and_packed_are_the_labels_shifted():
    examples = [EncodedExample([1, 2, 3], [[4, 5], [6]])]
    for layout in ("padded", "packed"):
        b = collate(examples, layout, pad_id=0)
        flat_labels = b["labels"].flatten()
        assert b["target_ids"].tolist() == [4, 5, 6]
        assert flat_labels[b["target_positions"] + 1].tolist() == [4, 5, 6]  # predicted by the token before
        assert b["target_sequence"].tolist() == [0, 0, 1]


def test_shared_layout_by_hand():
    """Prompt [1, 2, 3], responses [4, 5] and [6]: one row 1 2 3 4 5 6 (+ padding to the longer row).
    Positions 0 1 2 | 3 4 | 3: each response continues the prompt as in a row of its own. Token 4 and token 6
    are both predicted by position 2 (the prompt's end), token 5 by position 3. Response 2 must not see
    response 1: row 5 of the mask attends to positions 0–2 and to itself only."""
    b = collate([EncodedExample([1, 2, 3], [[4, 5], [6]]), EncodedExample([7], [[8], [9, 10, 11]])], "shared",
                pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 3, 0]]
    assert b["target_ids"].tolist() == [4, 5, 6, 8, 9, 10, 11]
    assert b["target_positions"].tolist() == [2, 3, 2, 6 + 0, 6 + 0, 6 + 2, 6 + 3]
    assert b["target_sequence"].tolist() == [0, 0, 1, 2, 3, 3, 3]
    mask = b["attention_mask"]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0],
                                         [1, 1, 1, 1, 1, 0],
                                         [1, 1, 1, 0, 0, 1]]
    assert mask[1, 0, 5].int().tolist() == [0, 0, 0, 0, 0, 1]  # padding sees itself only (no NaN row)
    assert int(b["num_sequences"]) == 4 and int(b["responses_per_example"]) == 2


def test_shared_layout_refuses_prompt_labels():
    with pytest.raises(ValueError, match="prompt_labels"):
        collate([EncodedExample([1], [[2]])], "shared", pad_id=0, prompt_labels=True)


def test_uneven_response_counts_are_refused():
    with pytest.raises(ValueError, match="same number of responses"):
        collate([EncodedExample([1], [[2]]), EncodedExample([1], [[2], [3]])], "padded", pad_id=0)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_prompt_length"):
        Limits(max_length=100, max_prompt_length=100)
    assert torch.tensor(0).dim() == 0

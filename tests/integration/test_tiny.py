"""The tiny models of `wrpo tiny-models`: they load, template, generate to an end-of-turn, and are stable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from wrpo.models.tiny import MODEL_NAMES, write_tiny_models, write_tiny_tokenizer

pytestmark = pytest.mark.integration

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folders_and_idempotence(tiny_models: Path):
    assert sorted(p.name for p in tiny_models.iterdir()) == sorted(MODEL_NAMES)
    before = {n: _digest(tiny_models / n) for n in MODEL_NAMES}
    write_tiny_models(tiny_models)  # already there: nothing is rewritten
    assert {n: _digest(tiny_models / n) for n in MODEL_NAMES} == before
    for n in MODEL_NAMES:
        assert (tiny_models / n / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["target", "source-qwen", "source-llama"])
def test_causal_lm_loads_templates_and_stops(tiny_models: Path, name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / name)
    model = AutoModelForCausalLM.from_pretrained(tiny_models / name)
    assert model.dtype == torch.float32
    assert model.config.head_dim >= 32 and model.config.max_position_embeddings == 2048
    assert model.generation_config.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.count("Why is the sky blue?") == 1
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, num_return_sequences=4)  # the saved generation config: sampling, 128 new
    new = out[:, enc["input_ids"].shape[1]:]
    ended = [row.tolist().index(tok.eos_token_id) for row in new if tok.eos_token_id in row.tolist()]
    assert ended, "sampling should end a turn with the end-of-turn token"
    for row in new:  # nothing but padding after the end of the turn
        ids = row.tolist()
        if tok.eos_token_id in ids:
            assert set(ids[ids.index(tok.eos_token_id) + 1:]) <= {tok.pad_token_id, tok.eos_token_id}


def test_vocabularies_differ_between_families(tiny_models: Path):
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(tiny_models / "target")
    llama = AutoTokenizer.from_pretrained(tiny_models / "source-llama")
    assert len(qwen) != len(llama)
    assert qwen.eos_token == "<|im_end|>" and llama.eos_token == "<|eot_id|>"
    assert AutoTokenizer.from_pretrained(tiny_models / "source-qwen").get_vocab() == qwen.get_vocab()


def test_reward_model_scores_a_batch(tiny_models: Path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    texts = [tok.apply_chat_template([*CHAT, {"role": "assistant", "content": a}], tokenize=False)
             for a in ("Scattering.", "Because sunlight is scattered by the air, blue the most.")]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**enc).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_write_tiny_tokenizer_round_trips(tmp_path: Path, style: str):
    from transformers import AutoTokenizer

    write_tiny_tokenizer(tmp_path, style=style)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "Plants make food through photosynthesis, 123 times."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n" if style == "chatml"
                             else "<|start_header_id|>assistant<|end_header_id|>\n\n")

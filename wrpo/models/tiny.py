"""Tiny models for tests and examples, made offline (there is no model hub in CI).

`write_tiny_models(root)` writes four folders under `root` (names in `MODEL_NAMES`):

- `target`        Qwen2ForCausalLM, ChatML-like template, the model that WRPO trains.
- `source-qwen`   Qwen2ForCausalLM, same tokenizer as the target, a different size.
- `source-llama`  LlamaForCausalLM, larger, Llama-3-like template and a *different* tokenizer and
                  vocabulary size (implicit fusion needs no vocabulary alignment).
- `reward`        LlamaForSequenceClassification with one label (a scalar reward), Llama-3-like template.

Each folder loads with `AutoModelForCausalLM` (or `AutoModelForSequenceClassification`) and `AutoTokenizer`,
holds float32 safetensors, a tokenizer with a chat template and a generation config whose EOS is the
end-of-turn token. All heads are 32 wide (vLLM's CPU backend needs head_dim >= 32). The causal LMs get a
few dozen steps of training on the packaged corpus so that sampling ends turns instead of babbling.
Writing is idempotent: a finished folder (marked by `.complete`) is left alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

MODEL_NAMES: tuple[str, ...] = ("target", "source-qwen", "source-llama", "reward")
TemplateStyle = Literal["chatml", "llama3"]
SEED = 1234
_DONE = ".complete"

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class _TokenizerStyle:
    specials: tuple[str, ...]
    bos: str | None
    eos: str  # the end-of-turn token: generation stops here
    pad: str
    template: str
    add_bos: bool  # a post-processor prepends BOS when add_special_tokens=True (as Llama-3's does)


STYLES: dict[str, _TokenizerStyle] = {
    "chatml": _TokenizerStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                              "<|endoftext|>", CHATML_TEMPLATE, add_bos=False),
    "llama3": _TokenizerStyle(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                               "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>",
                              "<|end_of_text|>", LLAMA3_TEMPLATE, add_bos=True),
}


def corpus_text() -> str:
    """The small English corpus shipped in the package (question/answer paragraphs)."""
    return resources.files("wrpo.models").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")


def corpus_pairs() -> list[tuple[str, str]]:
    """(question, answer) pairs of the corpus: blocks separated by blank lines, first line the question."""
    pairs = []
    for block in corpus_text().strip().split("\n\n"):
        question, _, answer = block.strip().partition("\n")
        pairs.append((question.strip(), answer.strip()))
    return pairs


def write_tiny_tokenizer(out_dir: Path | None = None, style: TemplateStyle = "chatml",
                         vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on the packaged corpus and wrap it with a chat template.

    `style="chatml"` gives Qwen-like `<|im_start|>role ... <|im_end|>` turns, no BOS, EOS `<|im_end|>`;
    `style="llama3"` gives Llama-3-like header tokens, BOS `<|begin_of_text|>` added by the template *and*
    by the post-processor (so a naive encode of the rendered prompt doubles it), EOS `<|eot_id|>`.
    Returns a `PreTrainedTokenizerFast`; saves it to `out_dir` when given.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    st = STYLES[style]
    tok = Tokenizer(models.BPE())
    if style == "chatml":  # exactly what transformers' Qwen2Tokenizer rebuilds from vocab + merges
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(st.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    if st.add_bos:
        bos_id = tok.token_to_id(st.bos)
        tok.post_processor = TemplateProcessing(
            single=f"{st.bos} $A", pair=f"{st.bos} $A {st.bos} $B", special_tokens=[(st.bos, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=st.bos, eos_token=st.eos,
                                   pad_token=st.pad, model_max_length=2048)
    fast.chat_template = st.template
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


@dataclass(frozen=True)
class _ModelSpec:
    arch: Literal["qwen2", "llama"]
    style: TemplateStyle
    vocab_size: int
    hidden: int
    layers: int
    heads: int  # hidden / heads = 32 = head_dim
    kv_heads: int
    reward: bool = False


_SPECS: dict[str, _ModelSpec] = {
    "target": _ModelSpec("qwen2", "chatml", 1000, 64, 2, 2, 1),
    "source-qwen": _ModelSpec("qwen2", "chatml", 1000, 96, 2, 3, 1),
    "source-llama": _ModelSpec("llama", "llama3", 900, 128, 3, 4, 2),
    "reward": _ModelSpec("llama", "llama3", 900, 64, 2, 2, 1, reward=True),
}


def _config(spec: _ModelSpec, tok):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=spec.hidden, intermediate_size=spec.hidden * 2,
                  num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
                  max_position_embeddings=2048, tie_word_embeddings=True, dtype="float32",
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if spec.arch == "qwen2":
        return Qwen2Config(**common)
    if spec.reward:
        return LlamaConfig(**common, num_labels=1)
    return LlamaConfig(**common)


def _chat_examples(tok) -> list[list[int]]:
    """Token ids of the corpus as one-turn chats: user asks, assistant answers, end-of-turn."""
    out = []
    for question, answer in corpus_pairs():
        msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def _pretrain(model, tok, steps: int, seed: int) -> None:
    """Some AdamW steps on the corpus chats so that generation resembles text and ends turns."""
    import torch

    examples = _chat_examples(tok)
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e), 1
    labels = ids.masked_fill(mask == 0, -100)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(examples), generator=gen)[:8]
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _write_one(name: str, out: Path, seed: int, pretrain_steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    spec = _SPECS[name]
    tok = write_tiny_tokenizer(out, spec.style, spec.vocab_size)
    cfg = _config(spec, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same bytes for the same seed, whatever the core count
        try:
            auto = AutoModelForSequenceClassification if spec.reward else AutoModelForCausalLM
            model = auto.from_config(cfg, dtype=torch.float32)
            if not spec.reward and pretrain_steps:
                _pretrain(model, tok, pretrain_steps, seed)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(str(out), safe_serialization=True)
    if not spec.reward:
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.8,
                         top_p=0.95, max_new_tokens=128).save_pretrained(str(out))


def write_tiny_models(root: Path, seed: int = SEED, pretrain_steps: int = 80,
                      names: tuple[str, ...] = MODEL_NAMES) -> dict[str, Path]:
    """Write the tiny models under `root` (one folder per name in MODEL_NAMES); return name -> folder.

    A folder that already holds a finished model is kept as it is. Each model is written to a temporary
    sibling first and renamed into place, so concurrent writers and interrupted runs never leave half a
    model behind.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, name in enumerate(names):
        final = root / name
        paths[name] = final
        if (final / _DONE).exists():
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            _write_one(name, tmp, seed + i, pretrain_steps)
            (tmp / _DONE).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths

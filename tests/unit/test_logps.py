"""Memory-light log-probs equal the naive full log-softmax; packed and padded layouts agree."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from wrpo.engine.collate import EncodedExample, collate
from wrpo.engine.logps import example_logps, sequence_logps, token_logps_from_hidden


def _model(arch: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()


def _examples() -> list[EncodedExample]:
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(1, 97, (n,), generator=g).tolist()

    return [EncodedExample(ids(7), [ids(5), ids(9), ids(2)]),
            EncodedExample(ids(3), [ids(11), ids(4), ids(6)])]


def _naive(model, examples: list[EncodedExample]) -> torch.Tensor:
    """One sequence at a time, full log_softmax over the vocabulary: Σ over response tokens."""
    out = []
    for ex in examples:
        for resp in ex.response_ids:
            ids = torch.tensor([ex.prompt_ids + resp])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T−1, V)
            targets = ids[0, 1:]
            per_token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(ex.prompt_ids) - 1:]
            out.append(per_token.sum())
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_layouts_equal_the_naive_computation(arch: str, layout: str):
    model, examples = _model(arch), _examples()
    with torch.no_grad():
        expected = _naive(model, examples)
        sums, counts = sequence_logps(model, collate(examples, layout, pad_id=0), chunk_size=4)
        plain, _ = sequence_logps(model, collate(examples, layout, pad_id=0), selective=False)
    assert_close(sums, expected, atol=1e-5, rtol=1e-5)
    assert_close(plain, expected, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [len(r) for ex in examples for r in ex.response_ids]


def test_packed_and_padded_gradients_agree():
    model, examples = _model("qwen2"), _examples()
    grads = []
    for layout in ("padded", "packed"):
        model.zero_grad()
        logps, _ = example_logps(model, collate(examples, layout, pad_id=0), chunk_size=5)
        assert logps.shape == (2, 3)
        (logps * torch.tensor([[1.0, -0.5, 0.25], [0.3, 2.0, -1.0]])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_chunked_head_matches_full_log_softmax_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    ours = token_logps_from_hidden(hidden, targets, head, chunk_size=5)
    (g_ours,) = torch.autograd.grad(ours.sum(), hidden)
    full = head(hidden).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    assert_close(ours, full)
    assert_close(g_ours, g_full)

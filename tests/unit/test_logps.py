"""Memory-light log-probs equal the naive full log-softmax in every layout (padded, packed, shared-prompt);
the head is called equally often on every rank when asked (ZeRO-3); the shared layout falls back cleanly.

Everything runs in float64, so that the comparisons hold on any CPU, thread count and ATEN_CPU_CAPABILITY.
Pure float64 sides differ in summation order only, by at most 2·n·u·κ relative with n < 10^3 terms in the
longest chain of sums (2 layers of width 64, 20 positions, a 97-token logsumexp), u = 2^-53 and κ ≤ 10^3:
below 2.3·10^-10, hence TOL64 = 1e-9. But transformers keeps float32 islands in a float64 model: RoPE's
cos/sin (computed in float32) and eager attention's softmax (float32), so layouts that feed positions or
masks differently (shared, padded) differ at float32's unit roundoff u32 = 2^-24: each such value is
rounded once and enters a result through ≤ 2 layers of a few products, relative ≤ c·u32 with c ≤ 10^2:
MODEL_REL = 100·2^-24 ≈ 6·10^-6 (measured: ≤ 5·10^-8). Gradients are compared norm-wise (an element near 0
has no meaningful relative error).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from wrpo.engine.collate import EncodedExample, collate
from wrpo.engine.logps import example_logps, sequence_logps, supports_shared_prompt, token_logps_from_hidden

TOL64 = {"rtol": 1e-9, "atol": 1e-9}  # the bounds derived in the module docstring
MODEL_REL = 100 * 2**-24


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _model(arch: str, attn: str = "sdpa", **config):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=256, pad_token_id=0, **config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float64).eval()


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
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)  # (T−1, V)
            targets = ids[0, 1:]
            per_token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[len(ex.prompt_ids) - 1:]
            out.append(per_token.sum())
    return torch.stack(out)


@pytest.mark.parametrize(("arch", "attn"), [("qwen2", "sdpa"), ("llama", "sdpa"), ("llama", "eager")])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_layouts_equal_the_naive_computation(arch: str, attn: str, layout: str):
    """The shared layout reads each response's first token off the prompt's last position and keeps the
    responses of one row from seeing each other: equal to one sequence per forward."""
    model, examples = _model(arch, attn), _examples()
    with torch.no_grad():
        expected = _naive(model, examples)
        sums, counts = sequence_logps(model, collate(examples, layout, pad_id=0), chunk_size=4)
        plain, _ = sequence_logps(model, collate(examples, layout, pad_id=0), selective=False)
    assert sums.dtype == torch.float64
    assert_close(sums, expected, rtol=MODEL_REL, atol=0)
    assert_close(plain, expected, rtol=MODEL_REL, atol=0)
    assert counts.tolist() == [len(r) for ex in examples for r in ex.response_ids]


def test_layouts_give_the_same_gradients():
    model, examples = _model("qwen2"), _examples()
    grads = []
    for layout in ("padded", "packed", "shared"):
        model.zero_grad()
        logps, _ = example_logps(model, collate(examples, layout, pad_id=0), chunk_size=5)
        assert logps.shape == (2, 3)
        (logps * torch.tensor([[1.0, -0.5, 0.25], [0.3, 2.0, -1.0]], dtype=torch.float64)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert _norm_rel(grads[1], grads[0]) < MODEL_REL and _norm_rel(grads[2], grads[0]) < MODEL_REL


def test_chunked_head_matches_full_log_softmax_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    hidden = torch.randn(23, 16, requires_grad=True, dtype=torch.float64)
    targets = torch.randint(0, 50, (23,))
    ours, _ = token_logps_from_hidden(hidden, targets, head, chunk_size=5)
    (g_ours,) = torch.autograd.grad(ours.sum(), hidden)
    full = head(hidden).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    assert_close(ours, full, **TOL64)
    assert_close(g_ours, g_full, **TOL64)


@pytest.mark.parametrize("n", [23, 0])
def test_extra_head_calls_run_forward_and_backward_without_changing_anything(n: int):
    """`calls` pads a rank's chunk count to every rank's maximum (ZeRO-3 gathers the head per call): 8
    calls in the forward and, through the checkpointed chunks, 8 again in the backward — also on a rank
    with no response token — while values and gradients stay those of the 5 (or 0) real chunks."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False, dtype=torch.float64)
    calls = []
    head.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    hidden = torch.randn(n, 16, requires_grad=True, dtype=torch.float64)
    targets = torch.randint(0, 50, (n,))
    plain, anchor0 = token_logps_from_hidden(hidden, targets, head, chunk_size=5)
    (g_plain,) = torch.autograd.grad(plain.sum() + anchor0, hidden, allow_unused=True)
    calls.clear()
    padded, anchor = token_logps_from_hidden(hidden, targets, head, chunk_size=5, calls=8)
    assert len(calls) == 8 and anchor.item() == 0.0
    (g_padded,) = torch.autograd.grad(padded.sum() + anchor, hidden)
    assert len(calls) == 16  # every call recomputed in the backward pass
    assert_close(padded, plain, **TOL64)
    if n:
        assert_close(g_padded, g_plain, **TOL64)


def test_sequence_logps_equal_calls_without_a_process_group():
    """Outside torch.distributed the agreed chunk count is the rank's own: same values as before."""
    model, examples = _model("qwen2"), _examples()
    batch = collate(examples, "shared", pad_id=0)
    with torch.no_grad():
        a, _ = sequence_logps(model, batch, chunk_size=4)
        b, _ = sequence_logps(model, batch, chunk_size=4, same_calls_on_all_ranks=True)
    assert_close(a, b, **TOL64)


def test_shared_prompt_support_and_its_fallbacks():
    assert supports_shared_prompt(_model("qwen2")) is None
    assert supports_shared_prompt(_model("llama", "eager")) is None
    assert "sliding-window" in supports_shared_prompt(_model("qwen2", use_sliding_window=True, sliding_window=16))
    model = _model("llama")
    model.config._attn_implementation = "flash_attention_2"
    assert "no 4-D mask" in supports_shared_prompt(model)

"""Per-response log-probs without a full-vocabulary fp32 log-softmax over the whole batch.

The model runs once with `logits_to_keep` set to no position (so its own LM head does no work); a forward
hook on the decoder keeps the final hidden states. Only positions whose next token is a response label
(about a third of a DPO batch, less with long prompts) go through the LM head, in chunks of `chunk_size`
tokens, each chunk under activation checkpointing: peak memory for the head is one chunk's
[chunk, V] fp32 logits instead of [S, T, V], and prompt positions cost nothing.

    log π(y_t | x, y_<t) = z[y_t] − logsumexp(z),  z = W·h_{t−1}      (per response token)
    log π(y | x) = Σ_t log π(y_t | x, y_<t)                            (summed per sequence)

Models whose logits are more than `lm_head(h)` (soft-capping, logit scaling) take the plain path: the
model's own logits, then the same chunked gather.

Under ZeRO-3 every call of the head gathers its weight from all ranks, so all ranks must call it equally
often although their batches hold different numbers of response tokens: the trainer asks for
`same_calls_on_all_ranks`, the chunk count is agreed by one all-reduce (max) and ranks with fewer chunks
call the head on a zero row that takes part in the backward pass too (docs/training.md, "Distributed").
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from wrpo.engine.collate import model_inputs

_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def unwrap(model: Any) -> Any:
    """The transformers model inside DDP / DeepSpeed / accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def supports_selective(model: Any) -> bool:
    """True when logits are exactly `lm_head(final hidden state)`, so the head may be applied by us."""
    inner = unwrap(model)
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    return inner.get_output_embeddings() is not None and \
        all(getattr(config, name, None) in (None, 1.0) for name in _SCALED_LOGITS)


def _wide(x: Tensor) -> Tensor:
    """At least fp32 (bf16 logits are upcast; fp64 ones, `precision: fp64`, stay fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _chunk_logps(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> Tensor:
    logits = _wide(head(hidden))  # (n, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (n,)


def _head_call(h: Tensor, t: Tensor, head: torch.nn.Module) -> Tensor:
    if torch.is_grad_enabled() and h.requires_grad:
        return checkpoint(_chunk_logps, h, t, head, use_reentrant=False)
    return _chunk_logps(h, t, head)


def num_chunks(n: int, chunk_size: int) -> int:
    return -(-n // chunk_size)


def chunks_on_every_rank(n: int, chunk_size: int) -> int:
    """The largest chunk count of any rank (one all-reduce): what every rank must call the head for."""
    import torch.distributed as dist

    count = torch.tensor([num_chunks(n, chunk_size)], dtype=torch.long)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def token_logps_from_hidden(hidden: Tensor, targets: Tensor, head: torch.nn.Module, chunk_size: int = 1024,
                            calls: int | None = None) -> tuple[Tensor, Tensor]:
    """log-softmax(head(hidden))[targets], chunk by chunk: hidden [n, H], targets [n] → ([n], anchor).

    `calls` (≥ the chunk count) makes exactly that many head calls, forward and backward: under ZeRO-3 each
    call gathers the head's weight from all ranks, so every rank must make the same number of them
    (`chunks_on_every_rank`). The extra calls run on a zero row tied to `hidden`; `anchor` is their
    contribution times 0 (a 0-d tensor): add it to the result so that backward runs through them too.
    """
    parts = [_head_call(h, t, head) for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size),
                                                        strict=True)]
    anchor = _wide(hidden.new_zeros(()))
    for _ in range(len(parts), calls or 0):
        dummy = hidden[:1].sum(0, keepdim=True) * 0  # (1, H), part of the graph even when n = 0
        anchor = anchor + _head_call(dummy, targets.new_zeros(1), head).sum() * 0
    logps = torch.cat(parts) if parts else _wide(hidden.new_zeros(0))
    return logps, anchor


def token_logps_from_logits(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """The same from precomputed logits [n, V] (the plain path), without an [n, V] fp32 copy at once."""
    parts = [_wide(lg).gather(-1, t.unsqueeze(-1)).squeeze(-1) - _wide(lg).logsumexp(-1)
             for lg, t in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True)]
    return torch.cat(parts) if parts else _wide(logits.new_zeros(0))


def attention_implementation(model: Any) -> str:
    return getattr(unwrap(model).config, "_attn_implementation", None) or "eager"


def _forward_inputs(model: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model inputs; a 4-D boolean mask (shared layout) becomes additive for kernels that add it (eager)."""
    inputs = model_inputs(batch)
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and attention_implementation(model) != "sdpa":
        dtype = unwrap(model).get_input_embeddings().weight.dtype
        inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    return inputs


def final_hidden_states(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Run `model` (possibly wrapped) on the batch; return the decoder's last hidden states [rows, T, H]."""
    captured: dict[str, Tensor] = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = unwrap(model).get_decoder().register_forward_hook(grab)
    try:
        nothing = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
        model(**_forward_inputs(model, batch), logits_to_keep=nothing, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]


def sequence_logps(model: Any, batch: dict[str, Tensor], chunk_size: int = 1024,
                   selective: bool | None = None, same_calls_on_all_ranks: bool = False) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response lengths per sequence: ([S] float32, [S] long).

    `batch` is a collated batch (`wrpo.engine.collate.collate`, any layout): `target_ids` are the tokens
    scored, `target_positions` the flat index of the hidden state predicting each, `target_sequence` which
    of the S sequences it belongs to. `same_calls_on_all_ranks`: the head is called the same number of
    times on every rank (ZeRO-3, see `token_logps_from_hidden`).
    """
    targets, seq = batch["target_ids"], batch["target_sequence"]  # (n,)
    positions = batch["target_positions"]
    if selective is None:
        selective = supports_selective(model)
    anchor = None
    if selective:
        hidden = final_hidden_states(model, batch)
        hidden = hidden.flatten(0, 1)[positions]  # (n, H)
        calls = chunks_on_every_rank(len(targets), chunk_size) if same_calls_on_all_ranks else None
        token_logps, anchor = token_logps_from_hidden(hidden, targets, unwrap(model).get_output_embeddings(),
                                                      chunk_size, calls)
    else:
        logits = model(**_forward_inputs(model, batch), use_cache=False).logits
        token_logps = token_logps_from_logits(logits.flatten(0, 1)[positions], targets, chunk_size)  # (n,)
    num = int(batch["num_sequences"])
    sums = token_logps.new_zeros(num).index_add(0, seq, token_logps)  # (S,)
    if anchor is not None:
        sums = sums + anchor
    counts = torch.bincount(seq, minlength=num)  # (S,)
    return sums, counts


def example_logps(model: Any, batch: dict[str, Tensor], chunk_size: int = 1024,
                  selective: bool | None = None, same_calls_on_all_ranks: bool = False) -> tuple[Tensor, Tensor]:
    """`sequence_logps` reshaped per example: ([B, R] summed log-probs, [B, R] lengths)."""
    sums, counts = sequence_logps(model, batch, chunk_size, selective, same_calls_on_all_ranks)
    r = int(batch["responses_per_example"])
    return sums.view(-1, r), counts.view(-1, r)


def supports_shared_prompt(model: Any) -> str | None:
    """None when the shared-prompt layout is exact for `model`, else why not (the caller falls back).

    It needs a kernel that takes an arbitrary 4-D mask (SDPA or eager: flash attention and flex attention
    take none), no sliding-window layers (a custom mask replaces the model's window), a text-only decoder,
    and a forward that takes position ids.
    """
    inner = unwrap(model)
    config = inner.config
    kernel = attention_implementation(model)
    if kernel not in ("sdpa", "eager"):
        return f"attention kernel {kernel} takes no 4-D mask"
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        return "not a text-only model"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    if "position_ids" not in inspect.signature(inner.forward).parameters:
        return "its forward takes no position ids"
    return None

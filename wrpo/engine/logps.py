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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from wrpo.engine.collate import IGNORE, model_inputs

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


def _chunk_logps(hidden: Tensor, targets: Tensor, head: torch.nn.Module) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)  # (n,)


def token_logps_from_hidden(hidden: Tensor, targets: Tensor, head: torch.nn.Module,
                            chunk_size: int = 1024) -> Tensor:
    """log-softmax(head(hidden))[targets], chunk by chunk: hidden [n, H], targets [n] → [n]."""
    parts = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logps, h, t, head, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, t, head))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def token_logps_from_logits(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """The same from precomputed logits [n, V] (the plain path), without an [n, V] fp32 copy at once."""
    parts = [lg.float().gather(-1, t.unsqueeze(-1)).squeeze(-1) - lg.float().logsumexp(-1)
             for lg, t in zip(logits.split(chunk_size), targets.split(chunk_size), strict=True)]
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def final_hidden_states(model: Any, batch: dict[str, Tensor]) -> Tensor:
    """Run `model` (possibly wrapped) on the batch; return the decoder's last hidden states [rows, T, H]."""
    captured: dict[str, Tensor] = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = unwrap(model).get_decoder().register_forward_hook(grab)
    try:
        nothing = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
        model(**model_inputs(batch), logits_to_keep=nothing, use_cache=False)
    finally:
        handle.remove()
    return captured["h"]


def sequence_logps(model: Any, batch: dict[str, Tensor], chunk_size: int = 1024,
                   selective: bool | None = None) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response lengths per sequence: ([S] float32, [S] long).

    `batch` is a collated batch (`wrpo.engine.collate.collate`): labels mark response tokens, sequence_index says
    which of the S sequences each position belongs to (rows for `padded`, segments for `packed`).
    """
    labels = batch["labels"][:, 1:]  # (rows, T−1): position t predicts token t+1
    mask = labels != IGNORE
    targets, seq = labels[mask], batch["sequence_index"][:, 1:][mask]  # (n,)
    if selective is None:
        selective = supports_selective(model)
    if selective:
        hidden = final_hidden_states(model, batch)[:, :-1][mask]  # (n, H)
        token_logps = token_logps_from_hidden(hidden, targets, unwrap(model).get_output_embeddings(),
                                              chunk_size)
    else:
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1][mask]  # (n, V)
        token_logps = token_logps_from_logits(logits, targets, chunk_size)
    num = int(batch["num_sequences"])
    sums = token_logps.new_zeros(num).index_add(0, seq, token_logps)  # (S,)
    counts = torch.bincount(seq, minlength=num)  # (S,)
    return sums, counts


def example_logps(model: Any, batch: dict[str, Tensor], chunk_size: int = 1024,
                  selective: bool | None = None) -> tuple[Tensor, Tensor]:
    """`sequence_logps` reshaped per example: ([B, R] summed log-probs, [B, R] lengths)."""
    sums, counts = sequence_logps(model, batch, chunk_size, selective)
    r = int(batch["responses_per_example"])
    return sums.view(-1, r), counts.view(-1, r)

"""Preference losses as pure functions of per-response log-probs (no model, trainer, step or device).

Vocabulary: `policy_*` are log πθ(y|x), `reference_*` are log πref(y|x), both summed over the response
tokens. Chosen responses are a `[B, K]` tensor whose column 0 is the source answer y_ws (Eq. 6) and
column 1 the target's best answer y_wt; columns 2.. are further source answers (top-k, beyond the
paper). Rejected responses are `[B, M]`: column 0 the target's worst answer y_l, column 1 (Eq. 9) the
source's worst answer y_ls.

Every objective is one weighted margin h, put through the objective's link (Table 5):

    h = Σ_k w_k·r(x, y_w,k) − Σ_m v_m·r(x, y_l,m)                     (Eq. 5 generalised)
    dpo:   L = −(1−ε)·log σ(h) − ε·log σ(−h),   r = β·log πθ/πref     (Eq. 6 with ε = 0; cDPO smoothing)
    ipo:   L = (h − 1/(2τ))²,                     r = log πθ/πref       (Table 5, WRPO_IPO)
    simpo: L = −(1−ε)·log σ(h − γ) − ε·log σ(γ − h),  r = β/|y|·log πθ  (Table 5, WRPO_SimPO)

WRPO is w = (α, 1−α), v = (1); Eq. 9 adds y_ls with v = (1−α, α); plain DPO is w = (1), v = (1).
The functions return per-example losses; the trainer reduces and scales them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Objective = Literal["dpo", "ipo", "simpo"]


@dataclass(frozen=True)
class ResponseLogps:
    """Sequence log-probs of a batch's responses under one model.

    chosen:          [B, K] Σ_t log π(y_t | x, y_<t) per chosen response (column 0 y_ws, column 1 y_wt).
    rejected:        [B, M] the same for rejected responses (column 0 y_l, column 1 y_ls).
    chosen_tokens:   [B, K] response lengths |y| in tokens (SimPO's length normaliser), or None.
    rejected_tokens: [B, M] likewise.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    def mean_per_token(self) -> ResponseLogps:
        """Length-normalised log-probs (1/|y|)·log π(y|x), as SimPO uses them."""
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("length-normalised log-probs need chosen_tokens and rejected_tokens")
        return ResponseLogps(self.chosen / self.chosen_tokens.clamp(min=1),
                             self.rejected / self.rejected_tokens.clamp(min=1),
                             self.chosen_tokens, self.rejected_tokens)


@dataclass(frozen=True)
class PreferenceLoss:
    """What a preference loss returns.

    losses:           [B] per-example loss (not reduced).
    margin:           [B] the weighted reward margin h (before γ and the link); detached.
    chosen_rewards:   [B, K] internal rewards r(x, y) of the chosen responses; detached.
    rejected_rewards: [B, M] internal rewards of the rejected responses; detached.
    """

    losses: Tensor
    margin: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _weights(w: Tensor | list[float] | tuple[float, ...], like: Tensor) -> Tensor:
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.shape[-1] != like.shape[-1]:
        raise ValueError(f"{w.shape[-1]} weights for {like.shape[-1]} responses")
    return w


def internal_rewards(policy: ResponseLogps, reference: ResponseLogps | None, objective: Objective,
                     beta: float) -> tuple[Tensor, Tensor]:
    """r(x, y) for every response: ([B, K], [B, M]).

    dpo: β·(log πθ − log πref) (Eq. 1);  ipo: log πθ − log πref;  simpo: β·log πθ / |y| (no reference).
    """
    if objective == "simpo":
        normed = policy.mean_per_token()
        return beta * normed.chosen, beta * normed.rejected
    if reference is None:
        raise ValueError(f"objective '{objective}' needs reference log-probs")
    scale = beta if objective == "dpo" else 1.0
    return (scale * (policy.chosen - reference.chosen),
            scale * (policy.rejected - reference.rejected))


def _sigmoid_loss(logits: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): DPO's link, conservative (cDPO) when ε > 0."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def weighted_preference_loss(
    policy: ResponseLogps,
    reference: ResponseLogps | None,
    chosen_weights: Tensor | list[float] | tuple[float, ...],
    rejected_weights: Tensor | list[float] | tuple[float, ...],
    objective: Objective = "dpo",
    beta: float = 0.01,
    gamma: float = 0.0,
    tau: float = 0.01,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """The general weighted-reward loss: h = Σ_k w_k·r(y_w,k) − Σ_m v_m·r(y_l,m) through the link.

    chosen_weights [K] (or [B, K]) are w, rejected_weights [M] (or [B, M]) are v; for the paper's
    forms use `wrpo_loss`. β scales DPO and SimPO rewards, γ is SimPO's margin, τ IPO's regulariser,
    ε (`label_smoothing`) flips labels with that probability for the sigmoid links.
    """
    chosen_r, rejected_r = internal_rewards(policy, reference, objective, beta)
    margin = (chosen_r * _weights(chosen_weights, chosen_r)).sum(-1) \
        - (rejected_r * _weights(rejected_weights, rejected_r)).sum(-1)  # (B,)
    match objective:
        case "dpo":
            losses = _sigmoid_loss(margin, label_smoothing)
        case "simpo":
            losses = _sigmoid_loss(margin - gamma, label_smoothing)
        case "ipo":
            losses = (margin - 1 / (2 * tau)) ** 2
        case _:
            raise ValueError(f"unknown objective '{objective}' (dpo, ipo or simpo)")
    return PreferenceLoss(losses, margin.detach(), chosen_r.detach(), rejected_r.detach())


def wrpo_weights(alpha: float, num_chosen: int = 2, source_shares: list[float] | None = None) -> list[float]:
    """Weights of the chosen columns [y_ws, y_wt, extra sources...] for fusion coefficient α (Eq. 5).

    The source side gets α in total, split by `source_shares` (default: equally) over column 0 and
    columns 2.., and y_wt gets 1 − α. With num_chosen = 2 this is the paper's (α, 1 − α).
    """
    if num_chosen < 2:
        raise ValueError("WRPO needs the source answer and the target answer (num_chosen >= 2)")
    n_sources = num_chosen - 1
    shares = source_shares or [1.0 / n_sources] * n_sources
    if len(shares) != n_sources or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"source_shares must be {n_sources} numbers summing to 1, got {shares}")
    return [alpha * shares[0], 1.0 - alpha] + [alpha * s for s in shares[1:]]


def wrpo_loss(policy: ResponseLogps, reference: ResponseLogps | None, alpha: float,
              objective: Objective = "dpo", beta: float = 0.01, gamma: float = 0.0, tau: float = 0.01,
              label_smoothing: float = 0.0, source_shares: list[float] | None = None) -> PreferenceLoss:
    """WRPO over DPO (Eq. 6), IPO or SimPO (Table 5); with a second rejected column y_ls, Eq. 9.

    policy.chosen is [B, K ≥ 2] (y_ws, y_wt, extra source answers); policy.rejected is [B, 1] (y_l) or
    [B, 2] (y_l, y_ls), the latter weighted (1 − α, α) as in Eq. 9.
    """
    chosen_w = wrpo_weights(alpha, policy.chosen.shape[-1], source_shares)
    match policy.rejected.shape[-1]:
        case 1:
            rejected_w = [1.0]
        case 2:
            rejected_w = [1.0 - alpha, alpha]
        case m:
            raise ValueError(f"WRPO takes y_l and optionally y_ls as rejected responses, got {m}")
    return weighted_preference_loss(policy, reference, chosen_w, rejected_w, objective, beta, gamma, tau,
                                     label_smoothing)


def _pair(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor | None = None,
          rejected_tokens: Tensor | None = None) -> ResponseLogps:
    """[B] tensors of one chosen and one rejected response as [B, 1] columns."""
    tokens = [None if n is None else n.unsqueeze(-1) for n in (chosen_tokens, rejected_tokens)]
    return ResponseLogps(chosen.unsqueeze(-1), rejected.unsqueeze(-1), *tokens)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO on pairs (Table 5): −log σ(β·log πθ(y_w)/πref(y_w) − β·log πθ(y_l)/πref(y_l)). Inputs [B]."""
    return weighted_preference_loss(_pair(policy_chosen, policy_rejected),
                                    _pair(reference_chosen, reference_rejected), [1.0], [1.0], "dpo",
                                    beta=beta, label_smoothing=label_smoothing)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor,
             reference_rejected: Tensor, tau: float = 0.01) -> PreferenceLoss:
    """IPO on pairs (Table 5): (log πθ(y_w)/πref(y_w) − log πθ(y_l)/πref(y_l) − 1/(2τ))². Inputs [B]."""
    return weighted_preference_loss(_pair(policy_chosen, policy_rejected),
                                    _pair(reference_chosen, reference_rejected), [1.0], [1.0], "ipo", tau=tau)


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
               beta: float = 10.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO on pairs (Table 5): −log σ(β/|y_w|·log πθ(y_w) − β/|y_l|·log πθ(y_l) − γ). Inputs [B]."""
    return weighted_preference_loss(_pair(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens),
                                    None, [1.0], [1.0], "simpo", beta=beta, gamma=gamma,
                                    label_smoothing=label_smoothing)


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                   chosen_names: tuple[str, ...] = ("chosen_source", "chosen_target")) -> dict[str, Tensor]:
    """Batch means of the internal rewards, margins and accuracies named in docs/architecture.md ("Records").

    chosen_rewards [B, K] with columns named by `chosen_names`, rejected_rewards [B, M] (column 0 y_l).
    Accuracies compare per example ([B] against [B], never a broadcast [B, B]): the hybrid accuracy is
    the share of r(y_ws) > r(y_l) (Fig. 5), the on-policy one of r(y_wt) > r(y_l).
    """
    if chosen_rewards.dim() != 2 or rejected_rewards.dim() != 2 or \
            chosen_rewards.shape[0] != rejected_rewards.shape[0]:
        raise ValueError(f"expected [B, K] and [B, M], got {tuple(chosen_rewards.shape)} and "
                         f"{tuple(rejected_rewards.shape)}")
    rejected = rejected_rewards[:, 0]  # (B,)
    out = {"rewards/rejected": rejected.mean()}
    margin_names = {"chosen_source": "hybrid", "chosen_target": "on_policy"}
    for k, name in enumerate(chosen_names[: chosen_rewards.shape[1]]):
        chosen = chosen_rewards[:, k]  # (B,)
        out[f"rewards/{name}"] = chosen.mean()
        if name in margin_names:
            out[f"margins/{margin_names[name]}"] = (chosen - rejected).mean()
            out[f"accuracy/{margin_names[name]}"] = (chosen > rejected).float().mean()
    return out

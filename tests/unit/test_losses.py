"""The preference losses against hand-derived values (Table 5, Eq. 6, 8, 9) and their limit cases.

All in float64 (`t`): each value takes < 20 operations, so its rounding error is below 20·u·κ ≈ 10^-14
(u = 2^-53, κ ≤ 10^2) on any CPU; the tolerances used (torch's float64 default 1e-7, and 1e-6) are far above
that and far below any formula error."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from wrpo.engine.losses import (
    ResponseLogps,
    dpo_loss,
    ipo_loss,
    reward_metrics,
    simpo_loss,
    weighted_preference_loss,
    wrpo_loss,
    wrpo_weights,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^−x)."""
    return math.log1p(math.exp(-x))


def test_dpo_by_hand():
    """β = 0.5; chosen: πθ −1, πref −2 → r_w = 0.5; rejected: πθ −3, πref −2 → r_l = −0.5.
    h = 1, L = −log σ(1) = log(1 + e^−1)."""
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert_close(out.losses, t(softplus(1.0)))
    assert_close(out.chosen_rewards, t(0.5).view(1, 1))
    assert_close(out.rejected_rewards, t(-0.5).view(1, 1))
    assert_close(out.margin, t(1.0))


def test_dpo_label_smoothing_by_hand():
    """Same batch, ε = 0.2: L = 0.8·(−log σ(1)) + 0.2·(−log σ(−1))."""
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5, label_smoothing=0.2)
    assert_close(out.losses, t(0.8 * softplus(1.0) + 0.2 * softplus(-1.0)))


@pytest.mark.parametrize(("tau", "expected"), [(0.25, 0.0), (0.5, 1.0), (1.0, 2.25)])
def test_ipo_by_hand(tau: float, expected: float):
    """Log-ratios: chosen −1 − (−2) = 1, rejected −3 − (−2) = −1, so h = 2 (IPO has no β).
    L = (2 − 1/(2τ))²: τ = 0.25 → 0; τ = 0.5 → 1; τ = 1 → 1.5² = 2.25."""
    out = ipo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), tau=tau)
    assert_close(out.losses, t(expected))


def test_simpo_by_hand():
    """πθ(y_w) = −4 over 2 tokens → −2; πθ(y_l) = −9 over 3 tokens → −3; β = 2 → r_w = −4, r_l = −6.
    h = 2, γ = 1: L = −log σ(2 − 1) = log(1 + e^−1)."""
    out = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=1.0)
    assert_close(out.losses, t(softplus(1.0)))
    assert_close(out.chosen_rewards, t(-4.0).view(1, 1))
    assert_close(out.rejected_rewards, t(-6.0).view(1, 1))


def _quad(ws: float, wt: float, lose: float, ls: float | None = None) -> ResponseLogps:
    rejected = [lose] if ls is None else [lose, ls]
    return ResponseLogps(t(ws, wt).view(1, 2), t(*rejected).view(1, -1), t(2.0, 4.0).view(1, 2),
                         t(*([5.0] if ls is None else [5.0, 1.0])).view(1, -1))


def test_wrpo_dpo_eq6_by_hand():
    """α = 0.25, β = 1. r_ws = −1 − (−3) = 2, r_wt = −2 − (−2) = 0, r_l = −5 − (−4) = −1.
    h = 0.25·2 + 0.75·0 − (−1) = 1.5 (Eq. 6); L = log(1 + e^−1.5)."""
    out = wrpo_loss(_quad(-1, -2, -5), _quad(-3, -2, -4), alpha=0.25, beta=1.0)
    assert_close(out.losses, t(softplus(1.5)))
    assert_close(out.chosen_rewards, t(2.0, 0.0).view(1, 2))
    assert_close(out.margin, t(1.5))


def test_wrpo_eq9_by_hand():
    """Eq. 9 with y_ls: α = 0.25, β = 1, r_ws = 2, r_wt = 0, r_l = −1, r_ls = −1 − (−3) = 2.
    h = 0.25·2 + 0.75·0 − 0.75·(−1) − 0.25·2 = 0.75; L = log(1 + e^−0.75)."""
    out = wrpo_loss(_quad(-1, -2, -5, -1), _quad(-3, -2, -4, -3), alpha=0.25, beta=1.0)
    assert_close(out.losses, t(softplus(0.75)))


def test_wrpo_ipo_by_hand():
    """Table 5 WRPO_IPO, α = 0.25, τ = 0.5: h = 0.25·2 + 0.75·0 + 1 = 1.5; L = (1.5 − 1)² = 0.25."""
    out = wrpo_loss(_quad(-1, -2, -5), _quad(-3, -2, -4), alpha=0.25, objective="ipo", tau=0.5)
    assert_close(out.losses, t(0.25))


def test_wrpo_simpo_by_hand():
    """Table 5 WRPO_SimPO, α = 0.5, β = 2, γ = 0.5. Lengths: y_ws 2, y_wt 4, y_l 5 tokens.
    πθ: y_ws −2 → r = 2·(−1) = −2; y_wt −2 → 2·(−0.5) = −1; y_l −5 → 2·(−1) = −2.
    h = 0.5·(−2) + 0.5·(−1) − (−2) = 0.5; L = −log σ(0.5 − 0.5) = log 2."""
    out = wrpo_loss(_quad(-2, -2, -5), None, alpha=0.5, objective="simpo", beta=2.0, gamma=0.5)
    assert_close(out.losses, t(math.log(2.0)))
    assert_close(out.margin, t(0.5))


def _random_quads(batch: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    policy = (-10 * torch.rand(batch, 3, generator=g, dtype=torch.float64)).requires_grad_()
    reference = -10 * torch.rand(batch, 3, generator=g, dtype=torch.float64)
    return policy, reference


@pytest.mark.parametrize(("alpha", "column"), [(0.0, 1), (1.0, 0)])
def test_wrpo_limits_equal_dpo(alpha: float, column: int):
    """α = 0 is DPO on (y_wt, y_l); α = 1 is DPO on (y_ws, y_l): losses and gradients to 1e-6."""
    policy, reference = _random_quads()
    beta = 0.1
    ours = wrpo_loss(ResponseLogps(policy[:, :2], policy[:, 2:]),
                     ResponseLogps(reference[:, :2], reference[:, 2:]), alpha=alpha, beta=beta)
    (grad_ours,) = torch.autograd.grad(ours.losses.sum(), policy)
    dpo = dpo_loss(policy[:, column], policy[:, 2], reference[:, column], reference[:, 2], beta=beta)
    (grad_dpo,) = torch.autograd.grad(dpo.losses.sum(), policy)
    assert_close(ours.losses, dpo.losses, atol=1e-6, rtol=0)
    assert_close(grad_ours, grad_dpo, atol=1e-6, rtol=0)


def test_wrpo_gradient_matches_eq8():
    """Eq. 8: ∂L/∂log πθ(y_ws) = −β·σ(r_l − α·r_ws − (1−α)·r_wt)·α, for y_wt the same with (1−α),
    and ∂L/∂log πθ(y_l) = +β·σ(r_l − α·r_ws − (1−α)·r_wt)."""
    policy, reference = _random_quads(batch=7, seed=3)
    alpha, beta = 0.3, 0.5
    out = wrpo_loss(ResponseLogps(policy[:, :2], policy[:, 2:]),
                    ResponseLogps(reference[:, :2], reference[:, 2:]), alpha=alpha, beta=beta)
    (grad,) = torch.autograd.grad(out.losses.sum(), policy)
    r = beta * (policy.detach() - reference)
    weight = torch.sigmoid(r[:, 2] - alpha * r[:, 0] - (1 - alpha) * r[:, 1])
    expected = torch.stack([-beta * weight * alpha, -beta * weight * (1 - alpha), beta * weight], dim=1)
    assert_close(grad, expected, atol=1e-12, rtol=1e-9)


def test_topk_sources_closed_form():
    """K = 3 chosen (y_ws, y_wt, a second source answer), shares (0.75, 0.25), α = 0.4, β = 1:
    weights (0.3, 0.6, 0.1). r = (1, 2, 3), r_l = 0 → h = 0.3 + 1.2 + 0.3 = 1.8."""
    assert wrpo_weights(0.4, 3, [0.75, 0.25]) == pytest.approx([0.3, 0.6, 0.1])
    policy = ResponseLogps(t(1.0, 2.0, 3.0).view(1, 3), t(0.0).view(1, 1))
    zero = ResponseLogps(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    out = wrpo_loss(policy, zero, alpha=0.4, beta=1.0, source_shares=[0.75, 0.25])
    assert_close(out.margin, t(1.8))
    assert_close(out.losses, t(softplus(1.8)))


def test_per_example_weights_broadcast():
    """Weights may be given per example, [B, K]."""
    policy, reference = _random_quads(batch=2)
    p = ResponseLogps(policy[:, :2].detach(), policy[:, 2:].detach())
    r = ResponseLogps(reference[:, :2], reference[:, 2:])
    per_example = weighted_preference_loss(p, r, t(0.2, 0.8, 0.2, 0.8).view(2, 2), [1.0], beta=0.1)
    shared = weighted_preference_loss(p, r, [0.2, 0.8], [1.0], beta=0.1)
    assert_close(per_example.losses, shared.losses)


def test_bad_arguments():
    with pytest.raises(ValueError, match="source answer"):
        wrpo_weights(0.1, 1)
    with pytest.raises(ValueError, match="summing to 1"):
        wrpo_weights(0.1, 3, [0.5, 0.6])
    with pytest.raises(ValueError, match="reference"):
        wrpo_loss(_quad(-1, -2, -3), None, alpha=0.1, objective="dpo")
    with pytest.raises(ValueError, match="weights"):
        weighted_preference_loss(_quad(-1, -2, -3), _quad(-1, -2, -3), [1.0], [1.0])
    with pytest.raises(ValueError, match="unknown objective"):
        weighted_preference_loss(_quad(-1, -2, -3), _quad(-1, -2, -3), [0.5, 0.5], [1.0], "kto")  # type: ignore[arg-type]


def test_reward_metrics_are_per_example():
    """B = 4: r_ws = (1, 1, 1, −1), r_wt = (0, 0, −2, 0), r_l = (0, 2, 0, 0).
    hybrid: r_ws > r_l for examples 0 and 2 → 0.5 (a [B] vs [B, 1] broadcast would compare every r_ws with
    every r_l: a 4×4 table, 9/16 = 0.5625); on-policy: r_wt > r_l for none → 0;
    margins/hybrid = mean(1, −1, 1, −1) = 0."""
    chosen = t(1, 0, 1, 0, 1, -2, -1, 0).view(4, 2)
    rejected = t(0, 2, 0, 0).view(4, 1)
    m = reward_metrics(chosen, rejected)
    assert m["accuracy/hybrid"].item() == 0.5
    assert (chosen[:, 0] > rejected).float().mean().item() == 0.5625  # the reference code's bug
    assert m["accuracy/on_policy"].item() == 0.0
    assert m["margins/hybrid"].item() == 0.0
    assert m["margins/on_policy"].item() == pytest.approx(-1.0)
    assert m["rewards/rejected"].item() == 0.5
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        reward_metrics(chosen[:, 0], rejected)


def test_reward_metrics_for_one_chosen_column():
    """A plain DPO baseline on y_wt only reports the on-policy side."""
    m = reward_metrics(t(1, 2).view(2, 1), t(0, 3).view(2, 1), chosen_names=("chosen_target",))
    assert set(m) == {"rewards/rejected", "rewards/chosen_target", "margins/on_policy", "accuracy/on_policy"}
    assert m["accuracy/on_policy"].item() == 0.5

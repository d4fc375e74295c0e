"""Win rates, bootstrap CIs and the length-controlled win rate (wrpo.eval.stats) against hand-computed values."""

from __future__ import annotations

import math

import pytest

from wrpo.eval.stats import (
    bootstrap_ci,
    compare,
    fit_glm,
    length_controlled_win_rate,
    length_feature,
    points_from_scores,
)


def test_points_and_win_rate_from_fixed_scores():
    pts = points_from_scores([3.0, 2.0, 1.0, 1.0, 0.5], [1.0, 2.0, 2.0, 1.0, -1.0])
    assert pts == [1.0, 0.5, 0.0, 0.5, 1.0]
    c = compare(pts)
    assert (c.n, c.wins, c.ties, c.losses) == (5, 2, 2, 1)
    assert c.win_rate == pytest.approx(3.0 / 5.0)  # (1 + .5 + 0 + .5 + 1) / 5


def test_bootstrap_ci_matches_the_binomial_quantiles():
    # 8 wins, 8 losses: a resampled mean is Binomial(16, 1/2)/16. P(X<=3) = 0.0106 < 2.5% < P(X<=4) = 0.0384,
    # so the 2.5% quantile is 4/16, and by symmetry the 97.5% quantile is 12/16 (a 90% interval would be
    # [5/16, 11/16]: P(X<=4) < 5% < P(X<=5) = 0.1051).
    for seed in (0, 1, 2):
        assert bootstrap_ci([1.0] * 8 + [0.0] * 8, samples=4000, seed=seed) == pytest.approx((0.25, 0.75))
    assert bootstrap_ci([1.0] * 8 + [0.0] * 8, samples=4000, level=0.9) == pytest.approx((5 / 16, 11 / 16))
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)  # nothing to resample but wins
    assert bootstrap_ci([1.0, 0.0], seed=3) == bootstrap_ci([1.0, 0.0], seed=3)  # reproducible


def test_lc_win_rate_removes_a_length_advantage():
    # Longer than the baseline on 4 prompts (wins 3 of them), shorter on 2 (wins 1): with Δ = ±5 the length
    # term is ±c, and the unpenalised fit solves θ + φc = logit(3/4) = ln 3, θ − φc = logit(1/2) = 0,
    # so θ = ln(3)/2 and the LC win rate σ(θ) = √3/(1+√3) = 0.6340, below the raw 4/6.
    points = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    model_len, base_len = [10, 10, 10, 10, 0, 0], [5] * 6
    theta, phi = fit_glm(points, length_feature(model_len, base_len), c=None)
    assert theta == pytest.approx(math.log(3) / 2, abs=1e-9)
    exact = math.sqrt(3) / (1 + math.sqrt(3))
    assert length_controlled_win_rate(points, model_len, base_len, c=None) == pytest.approx(exact, abs=1e-9)
    penalised = length_controlled_win_rate(points, model_len, base_len)  # the default C = 100
    assert 0.5 < penalised < exact and penalised == pytest.approx(exact, abs=0.01)
    assert compare(points, model_len, base_len).lc_win_rate == pytest.approx(penalised)


def test_lc_win_rate_keeps_a_win_rate_that_length_does_not_explain():
    # 2 of 3 won both when longer and when shorter: φ = 0, θ = logit(2/3) = ln 2, LC = 2/3 = the raw rate
    points = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    lens = [9, 9, 9, 1, 1, 1]
    assert length_controlled_win_rate(points, lens, [5] * 6, c=None) == pytest.approx(2 / 3, abs=1e-9)
    # ties count as half a win; equal lengths leave only the intercept: logit((1 + .5 + .5 + 0)/4) = 0
    assert length_controlled_win_rate([1.0, 0.5, 0.5, 0.0], [4] * 4, [4] * 4, c=None) == pytest.approx(0.5)


def test_length_feature_is_tanh_of_the_standardised_difference():
    x = length_feature([3, 5, 7], [5, 5, 5])  # Δ = -2, 0, 2; sd (ddof=1) = 2
    assert list(x) == pytest.approx([math.tanh(-1.0), 0.0, math.tanh(1.0)])
    assert list(length_feature([5, 5], [3, 3])) == [0.0, 0.0]  # no variation: nothing to regress out


def test_unparsed_points_are_left_out_and_counted():
    c = compare([1.0, None, 0.0, None, 0.5], inconsistent=1)
    assert (c.n, c.unparsed, c.inconsistent) == (3, 2, 1)
    assert c.win_rate == pytest.approx(0.5)
    empty = compare([None, None])
    assert empty.win_rate is None and empty.ci is None and empty.unparsed == 2

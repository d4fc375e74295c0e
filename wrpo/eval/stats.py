"""Win rates, bootstrap confidence intervals and the length-controlled win rate (docs/eval.md, "Statistics").

A comparison of a model with a baseline is a list of per-prompt points: 1 (the model wins), 0.5 (tie) or
0 (the baseline wins). The win rate is their mean; its 95% confidence interval is the percentile bootstrap
over prompts (resampled with replacement, a fixed seed, so a run's figures are reproducible).

The length-controlled (LC) win rate is AlpacaEval 2's GLM (Dubois et al., 2024, "Length-Controlled
AlpacaEval"): a logistic regression of the preference on an intercept θ and the length term
tanh(Δ/sd(Δ)), Δ the per-prompt difference of answer lengths (characters), fitted with the preference as a
probability (ties 0.5); the LC win rate is its prediction at Δ = 0, σ(θ). AlpacaEval's own formula also
has an instruction-difficulty term estimated from its 805 leaderboard instructions, which does not exist
for other prompts; without it this is the library's `length_controlled_minimal` GLM. We fit it here, with
an L2 penalty |β|²/(2C), C = 100, and Newton steps, rather than through the `alpaca-eval` package: see
docs/eval.md for why the package does not fit (its import needs `pkg_resources`, gone from setuptools
81+, and its LC entry point downloads AlpacaEval's own data from the Hugging Face hub on every call).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LC_C = 100.0  # inverse penalty strength (the library's C when it does not cross-validate)


def points_from_scores(model: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """1 where the model's score is higher, 0.5 where equal, 0 where lower (aligned per prompt)."""
    if len(model) != len(baseline):
        raise ValueError(f"{len(model)} model scores but {len(baseline)} baseline scores")
    return [1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model, baseline, strict=True)]


def bootstrap_ci(points: Sequence[float], samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `points` (resampling prompts with replacement)."""
    x = np.asarray(points, dtype=float)
    if x.size == 0:
        raise ValueError("no points")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def length_feature(len_model: Sequence[float], len_baseline: Sequence[float]) -> np.ndarray:
    """tanh(Δ / sd(Δ)) per prompt, Δ = model length − baseline length (sd with ddof=1, as pandas)."""
    delta = np.asarray(len_model, dtype=float) - np.asarray(len_baseline, dtype=float)
    sd = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    if not math.isfinite(sd) or sd == 0.0:
        return np.zeros_like(delta)  # no length variation to regress out
    return np.tanh(delta / sd)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def fit_glm(y: Sequence[float], x: Sequence[float], c: float | None = LC_C) -> np.ndarray:
    """(θ, φ) minimising −Σ[y log σ(z) + (1−y) log(1−σ(z))] + |β|²/(2c), z = θ + φx (c=None: no penalty).

    Newton steps with step halving; y may be probabilities (ties 0.5)."""
    yv, xv = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    design = np.stack([np.ones_like(xv), xv], axis=1)  # (n, 2)
    ridge = 0.0 if c is None else 1.0 / c

    def loss(beta: np.ndarray) -> float:
        z = design @ beta
        nll = np.sum(yv * np.logaddexp(0.0, -z) + (1.0 - yv) * np.logaddexp(0.0, z))
        return float(nll + 0.5 * ridge * beta @ beta)

    beta = np.zeros(2)
    current = loss(beta)
    for _ in range(200):
        p = _sigmoid(design @ beta)
        grad = design.T @ (p - yv) + ridge * beta
        hess = (design * (p * (1.0 - p))[:, None]).T @ design + ridge * np.eye(2)
        hess += 1e-12 * np.eye(2)  # x ≡ 0 leaves φ unidentified without a penalty
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-10:
            candidate = beta - t * step
            value = loss(candidate)
            if value <= current:
                break
            t /= 2.0
        else:
            break
        beta, moved, current = candidate, float(np.abs(t * step).max()), value
        if moved < 1e-12:
            break
    return beta


def length_controlled_win_rate(points: Sequence[float], len_model: Sequence[float],
                               len_baseline: Sequence[float], c: float | None = LC_C) -> float:
    """AlpacaEval 2's LC win rate in [0, 1] (see the module docstring)."""
    theta, _ = fit_glm(points, length_feature(len_model, len_baseline), c)
    return float(_sigmoid(np.asarray(theta)))


@dataclass(frozen=True)
class Comparison:
    """A model against a baseline over n prompts (win rates in [0, 1])."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float | None
    ci: tuple[float, float] | None
    lc_win_rate: float | None = None
    unparsed: int = 0  # LLM judge: prompts without a usable verdict (left out of n)
    inconsistent: int = 0  # LLM judge: the two orders disagreed (counted as ties)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = list(self.ci) if self.ci else None
        return out


def compare(points: Sequence[float | None], len_model: Sequence[float] | None = None,
            len_baseline: Sequence[float] | None = None, samples: int = 1000, seed: int = 0,
            inconsistent: int = 0) -> Comparison:
    """Win rate, bootstrap CI and (with lengths) the LC win rate; None points (unparsed) are left out."""
    keep = [i for i, p in enumerate(points) if p is not None]
    pts = [float(points[i]) for i in keep]  # type: ignore[arg-type]
    unparsed = len(points) - len(keep)
    if not pts:
        return Comparison(0, 0, 0, 0, None, None, None, unparsed, inconsistent)
    lc = None
    if len_model is not None and len_baseline is not None:
        lc = length_controlled_win_rate(pts, [len_model[i] for i in keep], [len_baseline[i] for i in keep])
    return Comparison(len(pts), sum(p == 1.0 for p in pts), sum(p == 0.5 for p in pts), sum(p == 0.0 for p in pts),
                      float(np.mean(pts)), bootstrap_ci(pts, samples, seed), lc, unparsed, inconsistent)

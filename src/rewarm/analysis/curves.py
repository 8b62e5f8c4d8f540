"""Forecast the end of one run from the start of its eval curve.

    L(D) = E + A·(D + D₀)^(−α),   α > 0, D₀ ≥ 0

fitted by least squares to the evals after warmup that a run has written by a fraction `at` of
its tokens, then read at the run's last token count: the number a user needs to decide whether
to keep paying for a run. A falls below zero for a curve that rises towards E — the upstream loss
of a continual run (forgetting) — so one form serves adaptation and forgetting alike.
Interval: residual bootstrap (the fitted curve plus resampled residuals, refitted).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from rewarm.analysis.fitting import best_of_starts
from rewarm.errors import UserError

MIN_POINTS = 5  # one more than the curve's 4 parameters, so the residuals say something about the noise


def curve(theta: np.ndarray, d) -> np.ndarray:
    e, a, log_alpha, log_d0 = theta
    return e + a * (np.asarray(d, dtype=np.float64) + np.exp(log_d0)) ** (-np.exp(log_alpha))


def _fit(d: np.ndarray, loss: np.ndarray, starts) -> np.ndarray:
    return best_of_starts(lambda theta: curve(theta, d), loss, starts)[0]


def _starts(d: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """A grid around the data: E below/above the last loss, A of both signs, several α and D₀."""
    span = max(float(np.ptp(loss)), 1e-3)
    last, scale = float(loss[-1]), float(d.max())
    out = []
    for e_off, sign, alpha, d0 in itertools.product((-span, 0.0, span), (1.0, -1.0), (0.3, 1.0), (0.01, 0.3)):
        d0_tokens = d0 * scale
        a = sign * span * (scale + d0_tokens) ** alpha
        out.append(np.array([last + (e_off if sign > 0 else -e_off), a, np.log(alpha), np.log(d0_tokens)]))
    return out


@dataclass
class CurveForecast:
    theta: np.ndarray
    tokens_seen: float      # the last token count the fit saw
    points: int
    boot: np.ndarray

    def predict(self, tokens: float) -> float:
        return float(curve(self.theta, tokens))

    def interval(self, tokens: float, level: float = 0.9) -> tuple[float, float]:
        preds = np.array([curve(t, tokens) for t in self.boot])
        preds = preds[np.isfinite(preds)]
        lo, hi = np.percentile(preds, [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)


def forecast(tokens, loss, bootstrap: int = 100, seed: int = 0) -> CurveForecast:
    """Fit the curve to (tokens, loss) points and bootstrap its residuals."""
    d, y = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(d) < MIN_POINTS:
        raise UserError(f"an early-curve forecast needs at least {MIN_POINTS} evals after warmup in the fitted part "
                        f"of the run, got {len(d)}. Evaluate more often early on (eval.interval, or "
                        f"eval.interval_warmup with eval.dense_until), or forecast from a later point (--at).")
    if not np.all(np.isfinite(y)):
        raise UserError("the eval curve holds non-finite losses; a diverged stretch cannot be forecast.")
    theta = _fit(d, y, _starts(d, y))
    fitted = curve(theta, d)
    resid = y - fitted
    rng = np.random.default_rng(seed)
    boot = [_fit(d, fitted + rng.choice(resid, len(resid), replace=True), [theta]) for _ in range(bootstrap)]
    return CurveForecast(theta, float(d.max()), len(d), np.array(boot))

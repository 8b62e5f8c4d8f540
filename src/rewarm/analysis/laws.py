"""Scaling laws fitted to the final losses of small runs, with bootstrap intervals.

Two laws of the final held-out loss L of a run with N parameters trained on D tokens:

- over-training (Gadre et al. 2024, eq. 4):  L(C, M) = E + (a·M^η + b·M^(−η))·C^(−η)
  with compute C = 6·N·D and token multiplier M = D/N (Chinchilla-optimal is M ≈ 20; over-trained
  runs have M ≫ 20). At fixed M it is a power law in C with one exponent η, which is what lets a
  few small runs predict a run with ~300× the compute.
- Chinchilla (Hoffmann et al. 2022):  L(N, D) = E + A·N^(−α) + B·D^(−β).

N is the **non-embedding** parameter count (`params_non_embedding` in a run's start event: no
input embedding, no untied output head, as Pythia counts): at the sizes that fit on a CPU the
embedding tables are most of the model, and counting them bends the law (Kaplan et al. 2020). Use one count throughout; `rewarm forecast` always uses this one.

Fitting: least squares on log L (relative errors, as both papers), from a grid of starting points,
keeping the best. Positive scale parameters are fitted as logs, so every start is feasible.
Intervals: bootstrap over runs (resample the runs with replacement, refit, take percentiles).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from rewarm.analysis.fitting import best_of_starts
from rewarm.errors import UserError


@dataclass(frozen=True)
class Law:
    name: str
    params: tuple[str, ...]          # the fitted parameters, in order (log_* are logs of positive scales)
    formula: str

    def __call__(self, theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return _FORMS[self.name](theta, np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64))

    def starts(self) -> list[np.ndarray]:
        return [np.array(s, dtype=np.float64) for s in itertools.product(*_GRIDS[self.name])]

    def readable(self, theta: np.ndarray) -> dict[str, float]:
        """Parameters as the papers write them (E, a, b, η / E, A, α, B, β)."""
        out = {}
        for name, value in zip(self.params, theta):
            out[name[4:] if name.startswith("log_") else name] = float(np.exp(value) if name.startswith("log_") else value)
        return out


def _overtrain(theta, n, d):
    log_e, log_a, log_b, eta = theta
    c, m = 6.0 * n * d, d / n
    return np.exp(log_e) + (np.exp(log_a) * m ** eta + np.exp(log_b) * m ** (-eta)) * c ** (-eta)


def _chinchilla(theta, n, d):
    log_e, log_a, alpha, log_b, beta = theta
    return np.exp(log_e) + np.exp(log_a) * n ** (-alpha) + np.exp(log_b) * d ** (-beta)


_FORMS = {"overtrain": _overtrain, "chinchilla": _chinchilla}
_GRIDS = {
    "overtrain": ([np.log(0.5), np.log(2.0)], [np.log(10.0), np.log(1e3)], [np.log(10.0), np.log(1e3)], [0.1, 0.3]),
    "chinchilla": ([np.log(0.5), np.log(2.0)], [np.log(10.0), np.log(1e3)], [0.2, 0.5], [np.log(10.0), np.log(1e3)], [0.2, 0.5]),
}
LAWS = {
    "overtrain": Law("overtrain", ("log_E", "log_a", "log_b", "eta"), "L = E + (a·M^η + b·M^−η)·C^−η, C = 6ND, M = D/N"),
    "chinchilla": Law("chinchilla", ("log_E", "log_A", "alpha", "log_B", "beta"), "L = E + A·N^−α + B·D^−β"),
}


def check_points(law: Law, n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise UserError("the runs' parameter counts, token counts and losses differ in number.")
    if len(loss) <= len(law.params):
        raise UserError(f"the {law.name} law has {len(law.params)} parameters and needs more runs than that to fit "
                        f"(got {len(loss)}). Add pilot runs (`rewarm forecast grid` writes a sweep of them).")
    if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
        raise UserError(f"every loss must be a positive number to fit a law in log space, got {loss.tolist()}.")
    if np.any(n <= 0) or np.any(d <= 0):
        raise UserError("every run needs a positive parameter count and token count.")
    return n, d, loss


def _best_fit(law: Law, n, d, loss, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Least squares on log L (relative errors)."""
    return best_of_starts(lambda theta: np.log(np.maximum(law(theta, n, d), 1e-12)), np.log(loss), starts,
                          max_nfev=2000)


@dataclass
class Fit:
    law: Law
    theta: np.ndarray
    rms_log_error: float                 # root-mean-square of log(pred / measured) over the runs
    boot: np.ndarray                     # bootstrap parameter vectors, one row per resample

    def predict(self, n, d) -> np.ndarray:
        return self.law(self.theta, n, d)

    def interval(self, n: float, d: float, level: float = 0.9) -> tuple[float, float]:
        """Percentile interval of the bootstrap predictions; (nan, nan) when too few resamples had
        enough distinct runs to refit (a law fitted to barely more runs than it has parameters)."""
        preds = np.array([self.law(t, n, d) for t in self.boot], dtype=np.float64)
        preds = preds[np.isfinite(preds)]
        if len(preds) < 10:
            return math.nan, math.nan
        lo, hi = np.percentile(preds, [50 * (1 - level), 50 * (1 + level)])
        return float(lo), float(hi)

    def to_dict(self) -> dict:
        return {"law": self.law.name, "formula": self.law.formula, "theta": self.theta.tolist(),
                "params": self.law.readable(self.theta), "rms_log_error": self.rms_log_error,
                "bootstrap": self.boot.tolist()}

    @classmethod
    def from_dict(cls, raw: dict) -> "Fit":
        law = LAWS[raw["law"]]
        return cls(law, np.array(raw["theta"]), float(raw["rms_log_error"]), np.array(raw["bootstrap"]).reshape(-1, len(law.params)))


def fit(law: Law, n, d, loss, bootstrap: int = 200, seed: int = 0) -> Fit:
    """The best fit from the grid of starts, and `bootstrap` refits on runs resampled with replacement
    (each started from the full fit, then from the grid if that lands worse than the grid's best)."""
    n, d, loss = check_points(law, n, d, loss)
    theta, cost = _best_fit(law, n, d, loss, law.starts())
    rms = float(np.sqrt(2 * cost / len(loss)))
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(20 * bootstrap):  # a resample with too few distinct runs cannot pin the law: draw again
        if len(boot) == bootstrap:
            break
        idx = rng.integers(0, len(loss), len(loss))
        if len(np.unique(idx)) <= len(law.params):
            continue
        t, _ = _best_fit(law, n[idx], d[idx], loss[idx], [theta])
        boot.append(t)
    return Fit(law, theta, rms, np.array(boot).reshape(-1, len(law.params)))

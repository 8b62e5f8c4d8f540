"""Downstream error from held-out loss (Gadre et al. 2024, eq. 5):

    Err(L) = ε − k·exp(−γ·L)

Err is the top-1 error averaged over the tasks, L the held-out loss of the same weights. As the
loss falls the error falls from ε towards ε − k·exp(−γ·L); chance-level error is the plateau a
model sits on until its loss is low enough. Fitted by least squares over every (loss, error)
pair the runs recorded (each downstream result with the eval at the same step), so a law
predicted loss turns into a predicted error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewarm.analysis.fitting import best_of_starts
from rewarm.errors import UserError


def error_curve(theta: np.ndarray, loss) -> np.ndarray:
    eps, log_k, gamma = theta
    return eps - np.exp(log_k) * np.exp(-gamma * np.asarray(loss, dtype=np.float64))


@dataclass
class ErrorFit:
    theta: np.ndarray
    rms_error: float
    points: int

    def predict(self, loss: float) -> float:
        return float(error_curve(self.theta, loss))

    def to_dict(self) -> dict:
        eps, log_k, gamma = self.theta
        return {"formula": "Err = ε − k·exp(−γ·L)", "theta": self.theta.tolist(),
                "params": {"epsilon": float(eps), "k": float(np.exp(log_k)), "gamma": float(gamma)},
                "rms_error": self.rms_error, "points": self.points}

    @classmethod
    def from_dict(cls, raw: dict) -> "ErrorFit":
        return cls(np.array(raw["theta"]), float(raw["rms_error"]), int(raw["points"]))


def fit_error(loss, error) -> ErrorFit:
    x, y = np.asarray(loss, dtype=np.float64), np.asarray(error, dtype=np.float64)
    if len(x) <= 3:
        raise UserError(f"loss → error needs more than 3 (loss, error) pairs to fit its 3 parameters, got {len(x)}. "
                        "Score downstream tasks at several points of several runs (eval.downstream.every).")
    if np.any(~np.isfinite(x)) or np.any(~np.isfinite(y)) or np.any((y < 0) | (y > 1)):
        raise UserError("losses must be finite and errors in [0, 1] to fit loss → error.")

    starts = []
    for gamma in (0.5, 1.0, 2.0, 4.0):
        for eps in (float(y.max()), 1.0):
            k0 = max(eps - float(y.min()), 1e-3) * np.exp(gamma * float(x.min()))
            starts.append(np.array([eps, np.log(k0), gamma]))
    best, cost = best_of_starts(lambda theta: error_curve(theta, x), y, starts)
    return ErrorFit(best, float(np.sqrt(2 * cost / len(x))), len(x))

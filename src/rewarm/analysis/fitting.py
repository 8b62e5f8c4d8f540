"""One multi-start least-squares fit, shared by the laws, the early-curve forecast and loss → error."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from scipy.optimize import least_squares


def best_of_starts(model: Callable[[np.ndarray], np.ndarray], target: np.ndarray, starts: Iterable[np.ndarray],
                   max_nfev: int = 4000) -> tuple[np.ndarray, float]:
    """(θ, cost) of the best Levenberg–Marquardt fit of model(θ) to `target` over the starting points;
    a non-finite prediction counts as a large residual, so a bad start loses instead of crashing."""
    def residual(theta):
        with np.errstate(over="ignore", invalid="ignore"):
            r = model(theta) - target
        return np.where(np.isfinite(r), r, 1e3)

    best, cost = None, np.inf
    for x0 in starts:
        sol = least_squares(residual, np.asarray(x0, dtype=np.float64), method="lm", max_nfev=max_nfev)
        if sol.cost < cost:
            best, cost = sol.x, sol.cost
    return best, float(cost)

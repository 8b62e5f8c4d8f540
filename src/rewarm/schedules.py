"""Learning-rate schedules as pure functions of the step (no optimizer state).

`build_schedule(spec, total_steps)` returns `lr(step)`. Every schedule starts with a
linear warmup from `warmup_start_lr` to `max_lr` over W steps:

    lr(t) = warmup_start_lr + (max_lr - warmup_start_lr) * t / W      for t < W

and then follows the decay formula in its docstring with t' = t - W, T' = T - W
(T = total steps). Being pure functions, they resume exactly and plot without training.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from rewarm.config import ScheduleConfig, _build, parse_override, warmup_steps
from rewarm.errors import UserError, did_you_mean

Schedule = Callable[[int], float]


def _with_warmup(decay: Callable[[int, int], float], s: Any, total: int) -> Schedule:
    W = warmup_steps(s.warmup, total)

    def lr(step: int) -> float:
        if step < W:
            return s.warmup_start_lr + (s.max_lr - s.warmup_start_lr) * step / W
        return decay(step - W, max(total - W, 1))

    return lr


def constant(s: Any, total: int) -> Schedule:
    """lr = max_lr after warmup (the papers' constant-LR baseline uses e.g. 3e-5)."""
    return _with_warmup(lambda t, T: s.max_lr, s, total)


def cosine(s: Any, total: int) -> Schedule:
    """lr = min + (max - min)/2 * (1 + cos(pi * t'/T'))  (Ibrahim et al. 2024, Eq. 2); min at t' = T'."""
    def decay(t: int, T: int) -> float:
        p = min(t / T, 1.0)
        return s.min_lr + (s.max_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * p))

    return _with_warmup(decay, s, total)


def cosine_neox_clipped(s: Any, total: int) -> Schedule:
    """lr = max(max/2 * (1 + cos(pi * t'/T')), min): GPT-NeoX's old cosine, decaying toward 0
    and clipped at min_lr. With min = 0.1 max it flattens at ~80% of training, as in
    Gupta et al. 2023 ("reaches the minimum learning rate at 240B tokens" of 300B)."""
    def decay(t: int, T: int) -> float:
        p = min(t / T, 1.0)
        return max(s.max_lr * 0.5 * (1 + math.cos(math.pi * p)), s.min_lr)

    return _with_warmup(decay, s, total)


def linear(s: Any, total: int) -> Schedule:
    """lr = max - (max - min) * t'/T'."""
    return _with_warmup(lambda t, T: s.max_lr - (s.max_lr - s.min_lr) * min(t / T, 1.0), s, total)


def inverse_sqrt(s: Any, total: int) -> Schedule:
    """lr = max(max * sqrt(W / (W + t')), min)  with W = max(warmup steps, 1): continuous at the
    end of warmup, decays as 1/sqrt(step), floored at min_lr."""
    W = max(warmup_steps(s.warmup, total), 1)
    return _with_warmup(lambda t, T: max(s.max_lr * math.sqrt(W / (W + t)), s.min_lr), s, total)


def wsd(s: Any, total: int) -> Schedule:
    """Warmup-stable-decay (Hägele et al. 2024): max_lr until the last `decay_fraction` of all
    steps, then with p = progress through that cooldown in [0, 1]:
    linear: min + (max - min)(1 - p); 1-sqrt: min + (max - min)(1 - sqrt(p));
    cosine: min + (max - min)(1 + cos(pi p))/2."""
    D = max(int(round(s.decay_fraction * total)), 1)
    start = total - D
    shape = {
        "linear": lambda p: 1 - p,
        "1-sqrt": lambda p: 1 - math.sqrt(p),
        "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),
    }[s.decay_shape]
    W = warmup_steps(s.warmup, total)

    def decay(t: int, T: int) -> float:
        step = t + W
        if step < start:
            return s.max_lr
        p = min((step - start) / D, 1.0)
        return s.min_lr + (s.max_lr - s.min_lr) * shape(p)

    return _with_warmup(decay, s, total)


def infinite(s: Any, total: int) -> Schedule:
    """Ibrahim et al. 2024's "infinite" schedule, in four phases over steps:
    warmup (to max_lr) -> cooldown to const_lr until `cooldown_fraction`*T, with x the
    progress through the cooldown:
        cosine:   const + (max - const)(1 + cos(pi x))/2
        inv_sqrt: max + (const - max) h(x)/h(1),  h(x) = 1/sqrt(1 + alpha x) - 1
    -> constant const_lr until `constant_fraction`*T -> exponential anneal over the
    remaining S steps: const * (min/const)^(s/S), ending at min_lr."""
    W = warmup_steps(s.warmup, total)
    cool_end = int(round(s.cooldown_fraction * total))
    const_end = int(round(s.constant_fraction * total))
    alpha = s.timescale

    def h(x: float) -> float:
        return 1 / math.sqrt(1 + alpha * x) - 1

    def decay(t: int, T: int) -> float:
        step = t + W
        if step < cool_end:
            x = (step - W) / max(cool_end - W, 1)
            if s.cooldown_shape == "cosine":
                return s.const_lr + (s.max_lr - s.const_lr) * 0.5 * (1 + math.cos(math.pi * x))
            return s.max_lr + (s.const_lr - s.max_lr) * h(x) / h(1)
        if step < const_end:
            return s.const_lr
        S = max(total - const_end, 1)
        frac = min((step - const_end) / S, 1.0)
        return s.const_lr * (s.min_lr / s.const_lr) ** frac if s.const_lr > 0 else 0.0

    return _with_warmup(decay, s, total)


def repeated_cosine(s: Any, total: int) -> Schedule:
    """`num_cycles` equal cycles, each a linear warmup (the same warmup spec applied to the
    cycle length) followed by a cosine decay to min_lr: the naive "re-warm every time new
    data arrives" baseline of Ibrahim et al. 2024. The first cycle warms up from
    warmup_start_lr; every later one re-warms from min_lr, where the previous one ended (as the
    authors' code does), not from 0."""
    import dataclasses

    n = max(int(s.num_cycles), 1)
    cycle = max(total // n, 1)
    first = cosine(s, cycle)
    later = cosine(dataclasses.replace(s, warmup_start_lr=s.min_lr), cycle)

    def lr(step: int) -> float:
        k = min(step // cycle, n - 1)
        return (first if k == 0 else later)(min(step - cycle * k, cycle))

    return lr


# every name config.SCHEDULE_NAMES declares (config validates against that list; a test checks they agree)
SCHEDULES: dict[str, Callable[[Any, int], Schedule]] = {
    "constant": constant,
    "cosine": cosine,
    "cosine_neox_clipped": cosine_neox_clipped,
    "linear": linear,
    "inverse_sqrt": inverse_sqrt,
    "wsd": wsd,
    "infinite": infinite,
    "repeated_cosine": repeated_cosine,
}


def build_schedule(spec: Any, total_steps: int) -> Schedule:
    """`spec` is a ScheduleConfig (or anything with its fields); returns lr(step)."""
    return SCHEDULES[spec.name](spec, total_steps)


def parse_spec(text: str) -> Any:
    """`cosine:max_lr=3e-4,warmup=0.01` -> ScheduleConfig, for `rewarm schedule plot`."""
    name, _, rest = text.partition(":")
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule `{name}`{did_you_mean(name, SCHEDULES)}. Choose one of: {', '.join(SCHEDULES)}.")
    raw: dict = {"name": name}
    for item in filter(None, rest.split(",")):
        path, value = parse_override(item)
        raw[".".join(path)] = value
    return _build(ScheduleConfig, raw, "schedule")


# The schedules the two papers compare, as `rewarm schedule plot --papers` draws them.
PAPERS_SET = [
    *(f"cosine:max_lr={lr},min_lr={float(lr) / 10:.3g},warmup=0.01" for lr in ("1.5e-4", "3e-4", "6e-4")),
    *(f"cosine:max_lr=3e-4,min_lr=3e-5,warmup={w}" for w in ("0", "0.005", "0.02")),
    "constant:max_lr=3e-5,warmup=0",
    "cosine_neox_clipped:max_lr=3e-4,min_lr=3e-5,warmup=0.01",
    "wsd:max_lr=3e-4,min_lr=3e-5,warmup=0.01,decay_fraction=0.2,decay_shape=1-sqrt",
    "infinite:max_lr=3e-4,min_lr=3e-5,const_lr=1.65e-4,warmup=0.01,cooldown_fraction=0.6,constant_fraction=0.85",
]

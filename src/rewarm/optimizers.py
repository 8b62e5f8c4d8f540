"""`optimizer.name`: a small registry of optimizers, the seam that optimizers beyond AdamW plug into.

An entry is a builder `build(model, param_groups, cfg, dist) -> torch.optim.Optimizer` (the model is
the wrapped one, so an optimizer that does its own communication can install a DDP hook) and an
optional `check(cfg)` that validates `optimizer.options` up front, raising UserError. Subpackages
register on `import rewarm`; the core only looks names up here.

What the loop offers an optimizer, besides `step()`: before each step it sets `lr` and `run_step`
(the run's step index, which the LR schedule also reads) in every param group; after the step, a
dict from the optimizer's `step_metrics()` (if it has one) goes into the train event.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rewarm.errors import UserError, did_you_mean


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[..., Any]
    check: Callable[[Any], None] | None = None


_REGISTRY: dict[str, OptimizerEntry] = {}


def register(name: str, build: Callable[..., Any], check: Callable[[Any], None] | None = None) -> None:
    _REGISTRY[name] = OptimizerEntry(build, check)


def names() -> list[str]:
    return sorted(_REGISTRY)


def entry(name: str) -> OptimizerEntry:
    if name not in _REGISTRY:
        raise UserError(f"`optimizer.name: {name}` is not a known optimizer{did_you_mean(name, names())}. "
                        f"Known: {', '.join(names())}.")
    return _REGISTRY[name]


def check(cfg: Any) -> None:
    """Validate `optimizer.name` and its `optimizer.options` before anything runs."""
    e = entry(cfg.optimizer.name)
    if e.check is not None:
        e.check(cfg)
    elif cfg.optimizer.options:
        raise UserError(f"`optimizer.options` {cfg.optimizer.options} given, but `{cfg.optimizer.name}` takes none; "
                        f"AdamW's settings are optimizer.betas / eps / weight_decay.")


def build(model: Any, param_groups: list[dict], cfg: Any, dist: Any) -> Any:
    return entry(cfg.optimizer.name).build(model, param_groups, cfg, dist)


def _build_adamw(model: Any, param_groups: list[dict], cfg: Any, dist: Any) -> Any:
    import torch

    # fused AdamW (one kernel over all parameters; 4x faster than foreach on CPU, measured in
    # benchmarks/) except under FSDP, whose sharded DTensor parameters take the foreach path
    fused = not (dist.active and cfg.distributed.strategy == "fsdp")
    return torch.optim.AdamW(param_groups, lr=cfg.schedule.max_lr, betas=tuple(cfg.optimizer.betas),
                             eps=cfg.optimizer.eps, **({"fused": True} if fused else {"foreach": True}))


register("adamw", _build_adamw)

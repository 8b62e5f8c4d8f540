"""Loss terms beyond next-token cross-entropy that need more than the model's own outputs (the
loss-term seam), e.g. self-distillation to the initial model on replay rows.

A term is registered by a subpackage on `import rewarm` with `enabled(cfg)`, `check(cfg)` (up-front
validation) and `backward(st, windows, sources) -> dict | None`: given this rank's rows of the step
and each row's source id, it runs its own forward and backward — with gradient sync off, before the
step's micro-batches, so its gradients are accumulated locally and exchanged with the main ones on
the last micro-batch — and returns numbers for the train event. The core never imports the terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class LossTerm:
    enabled: Callable[[Any], bool]
    backward: Callable[[Any, Any, Any], dict | None]
    check: Callable[[Any], None] | None = None


_REGISTRY: dict[str, LossTerm] = {}


def register(name: str, enabled: Callable[[Any], bool], backward: Callable[[Any, Any, Any], dict | None],
             check: Callable[[Any], None] | None = None) -> None:
    _REGISTRY[name] = LossTerm(enabled, backward, check)


def check(cfg: Any) -> None:
    for term in _REGISTRY.values():
        if term.enabled(cfg) and term.check is not None:
            term.check(cfg)


def active(cfg: Any) -> list[LossTerm]:
    return [t for t in _REGISTRY.values() if t.enabled(cfg)]

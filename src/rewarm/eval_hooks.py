"""`eval.<name>` hooks: what runs at each eval besides the held-out losses (the eval-hook seam).

A hook is registered by a subpackage on `import rewarm` with
- `enabled(cfg) -> bool`: whether this run's config turns it on;
- `check(cfg)`: validation before anything runs (raise UserError);
- `run(st, metrics) -> str | None`: called on every rank after each eval (step 0 included); it
  writes its own metrics event and returns None, or an alarm action the loop carries out:
  "stop" (end the run like a divergence) or "rollback" (the divergence rollback).
The config keys themselves live in `config.EvalConfig`, so they are typed and documented like
every other key; the core never imports the hooks' code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class EvalHook:
    enabled: Callable[[Any], bool]
    run: Callable[[Any, Any], str | None]
    check: Callable[[Any], None] | None = None


_REGISTRY: dict[str, EvalHook] = {}


def register(name: str, enabled: Callable[[Any], bool], run: Callable[[Any, Any], str | None],
             check: Callable[[Any], None] | None = None) -> None:
    _REGISTRY[name] = EvalHook(enabled, run, check)


def check(cfg: Any) -> None:
    for hook in _REGISTRY.values():
        if hook.enabled(cfg) and hook.check is not None:
            hook.check(cfg)


def run_all(st: Any, metrics: Any) -> list[tuple[str, str]]:
    """Every enabled hook, in registration order; the (name, action) alarms they raised."""
    alarms = []
    for name, hook in _REGISTRY.items():
        if hook.enabled(st.cfg):
            action = hook.run(st, metrics)
            if action:
                alarms.append((name, action))
    return alarms

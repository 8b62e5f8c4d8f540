"""Where downstream results go: `downstream.json` next to the model, and a `downstream`
event in the run's metrics.jsonl when the model belongs to a run (so the report plots it)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rewarm import atomic, checkpoint
from rewarm.errors import UserError
from rewarm.rundir import MetricsWriter, RunDir

log = logging.getLogger(__name__)


def run_context(model_dir: Path) -> tuple[RunDir, int, int] | None:
    """(run, step, tokens) when `model_dir` is a run's final/ or one of its checkpoints/step_N, else None."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name == "final" and (model_dir.parent / "summary.json").is_file():
        run = RunDir(model_dir.parent)
        summary = json.loads(run.summary.read_text())
        return run, int(summary["steps"]), int(summary["tokens"])
    if (checkpoint.step_of(model_dir) is not None and model_dir.parent.name == "checkpoints"
            and (model_dir.parent.parent / "config.yaml").is_file()):
        state = checkpoint.load_trainer_state(model_dir)
        return RunDir(model_dir.parent.parent), state.step, state.tokens
    return None


def event(step: int, tokens: int, tasks: dict[str, Any], settings: dict[str, Any], source: str) -> dict[str, Any]:
    return {"event": "downstream", "step": step, "tokens": tokens, "source": source, **settings, "tasks": tasks}


def record(model_dir: Path, results: dict[str, Any], settings: dict[str, Any], out: Path | None = None,
           ctx: tuple[RunDir, int, int] | None = None) -> Path:
    """Write `out` (default MODEL_DIR/downstream.json) atomically; add the event to the run's log if
    the model belongs to a run that is not training right now (a live run owns its log).
    `ctx` is `run_context(model_dir)` taken before scoring: a live run may prune the checkpoint
    meanwhile, and then the results go to the run directory instead of being lost. Without it, the
    context is read now."""
    ctx = ctx if ctx is not None else run_context(model_dir)
    step, tokens = (ctx[1], ctx[2]) if ctx else (None, None)
    if out:
        out = Path(out)
    elif Path(model_dir).is_dir() or ctx is None:
        out = Path(model_dir) / "downstream.json"
    else:
        out = ctx[0].path / f"downstream_step_{step:06d}.json"
        log.warning("%s was deleted while it was scored (pruned by its run); results go to %s", model_dir, out)
    doc = {"model": str(model_dir), "step": step, "tokens": tokens, **settings, "tasks": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, doc)
    if ctx:
        run = ctx[0]
        try:
            run.acquire_lock()  # a live run owns its log; holding the lock keeps one from starting meanwhile
        except UserError:
            log.warning("run %s is in use by process %s: not adding to its metrics.jsonl (results are in %s)",
                        run.path, run.lock_holder(), out)
            return out
        try:
            writer = MetricsWriter(run.metrics)
            writer.write(event(step, tokens, results, settings, "standalone"))
            writer.close()
        finally:
            run.release_lock()
    return out

"""Checkpoints that are either complete or ignored.

`checkpoints/step_000400/` is a plain HF model directory (config.json, model.safetensors,
tokenizer files: usable as `model.path` for another run) plus `trainer_state.pt`
(optimizer, step, tokens, RNG) and `manifest.json` (size + sha256 of every file).
It is written under a temporary name and renamed; the manifest is written last, so a
directory without a valid manifest is an interrupted write and is skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from rewarm import atomic
from rewarm.errors import DiskFull
from rewarm.state import TrainerState, restore_rng

__all__ = ["DiskFull", "TrainerState", "save", "verify", "load_latest", "load_trainer_state", "prune", "step_of", "restore"]

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_of(path: Path) -> int | None:
    """N for a directory named step_N (a checkpoint), else None."""
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_size(model: torch.nn.Module) -> int:
    """Weights + two AdamW moments, +10% for tokenizer, config and pickling."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(weights * 3 * 1.1)


def save(root: Path, model: torch.nn.Module, tokenizer, state: TrainerState, state_dict: dict | None = None) -> Path:
    """Write checkpoints/step_N (N = state.step) atomically; returns its path. Checks free space first."""
    step = state.step
    root.mkdir(parents=True, exist_ok=True)
    atomic.require_free(root, expected_size(model), f"checkpoint step {step}",
                        " (or lower checkpoint.keep_last), then --resume; earlier checkpoints are intact")
    final = step_dir(root, step)
    tmp = atomic.temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state.to_dict(), tmp / TRAINER_STATE)
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        atomic.write_json(tmp / MANIFEST, manifest)
    except Exception as exc:  # ENOSPC arrives as OSError, torch's RuntimeError or safetensors' own error
        atomic.fail_if_disk_full(exc, tmp, f"checkpoint step {step} in {root}",
                                 " with --resume (earlier checkpoints are intact)")
        raise
    return atomic.commit(tmp, final)


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    mf = path / MANIFEST
    if not mf.is_file():
        return "no manifest (interrupted write)"
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        return "manifest is not valid JSON"
    if TRAINER_STATE not in manifest.get("files", {}):
        return "no trainer state"
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {info['size']}"
        if _sha256(f) != info["sha256"]:
            return f"{name} does not match its hash"
    return None


def list_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def load_latest(root: Path, before: int | None = None) -> tuple[Path, TrainerState] | None:
    """Newest intact checkpoint (path, trainer_state) — older than step `before` if given —
    skipping broken ones with a warning."""
    for step, path in reversed(list_steps(root)):
        if before is not None and step >= before:
            continue
        problem = verify(path)
        if problem:
            log.warning("skipping checkpoint %s: %s", path, problem)
            continue
        return path, load_trainer_state(path)
    return None


def load_trainer_state(path: Path) -> TrainerState:
    return TrainerState.from_dict(torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True))


def prune(root: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete periodic checkpoints beyond the newest `keep_last`, except pinned steps."""
    steps = list_steps(root)
    removable = [(s, p) for s, p in steps if s not in keep_steps]
    for s, p in removable[: max(len(removable) - keep_last, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    atomic.remove_stale_temps(root, ".step_*.tmp-*")  # interrupted writes, never a live writer's


def restore(path: Path, state: TrainerState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d,
            weights: bool = True) -> None:
    """Back to a saved point, for resume and rollback alike: the checkpoint's weights into the
    live (maybe DDP/FSDP-wrapped) model, its optimizer moments, and its RNG states. The counters
    (step, bad steps, LR scale) are the caller's to take from `state`: a rollback keeps its own.
    `weights=False` when the model was just built from `path` (resume): not read twice."""
    from rewarm import distributed
    from rewarm.model import load_pretrained

    if weights:
        distributed.load_model_state(model, load_pretrained(str(path)).state_dict(), d)
    distributed.load_optimizer_state(model, optimizer, state.optimizer, d)
    restore_rng(state.rng)

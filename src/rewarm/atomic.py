"""Files that are either whole or absent: write under a temporary name, fsync, rename.

Every file a later run trusts (checkpoints, final/, summary.json, config.yaml, shards'
meta.json, metrics rewritten on resume) goes through `commit`, the one place that renames
into place: a crash at any moment leaves the old file or the new one, never half of one.
Temporary names start with a dot and carry the writer's pid (`.NAME.tmp-PID`), so an
interrupted write is recognisable and never mistaken for the real thing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable


def temp_path(path: str | Path) -> Path:
    """The hidden, per-process temporary name that `path` is written under."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> Path:
    """Rename the fully written `tmp` (a file or a directory) to `final`, durably: the data
    is fsynced first, an older `final` directory is removed, and the parent directory is
    fsynced after the rename so the new name survives a power cut."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_path(p)
        if final.is_dir():
            shutil.rmtree(final)
    else:
        _fsync_path(tmp)
    os.replace(tmp, final)
    try:
        _fsync_path(final.parent)
    except OSError:  # some filesystems refuse to fsync a directory; the rename itself is atomic
        pass
    return final


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        return commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line."""
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))

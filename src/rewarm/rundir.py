"""The run directory: paths, the append-only metrics log, the lock, reading runs back."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from rewarm.errors import UserError

log = logging.getLogger(__name__)


class RunDir:
    """runs/<name>/: config.yaml, metrics.jsonl, checkpoints/, final/, summary.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.summary = self.path / "summary.json"
        self.lock = self.path / ".lock"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def has_started(self) -> bool:
        return self.metrics.exists() or self.checkpoints.exists()

    def acquire_lock(self) -> None:
        """One process per run directory; a lock left by a dead process is taken over."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"cannot write the run directory {self.path}: {exc.strerror or exc}. "
                            f"Choose a writable `out_dir`.") from None
        if self.lock.exists():
            holder = self.lock_holder()
            if holder and holder != os.getpid():
                raise UserError(
                    f"run directory {self.path} is in use by process {holder}. Wait for it to finish, "
                    f"or stop it; a lock from a dead process is taken over automatically."
                )
            log.warning("taking over stale lock left by a dead process on %s", self.path)
        self.lock.write_text(str(os.getpid()))

    def lock_holder(self) -> int | None:
        """The pid of the live process that holds this run's lock, if any."""
        try:
            pid = int(self.lock.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid and pid_alive(pid) else None

    def release_lock(self) -> None:
        try:
            if self.lock.read_text().strip() == str(os.getpid()):
                self.lock.unlink()
        except FileNotFoundError:
            pass

    def read_metrics(self) -> list[dict]:
        return list(iter_metrics(self.metrics))

    def truncate_metrics_after(self, step: int) -> None:
        """On resume / rollback: drop events logged after the checkpoint's step (they will be
        redone), keeping rollback events as the run's history."""
        if not self.metrics.exists():
            return
        kept = [e for e in iter_metrics(self.metrics) if e.get("step", 0) <= step or e.get("event") == "rollback"]
        write_jsonl_atomic(self.metrics, kept)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written to a temporary name and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def iter_metrics(path: Path) -> Iterator[dict]:
    """Events of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.warning("ignoring a torn line in %s", path)


class MetricsWriter:
    """Append one JSON object per line, flushed at once so a crash loses at most the line being written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._fh = open(path, "a") if enabled else None

    def reopen(self) -> None:
        """After the file was rewritten (truncated on rollback), append to the new one."""
        self.close()
        self._fh = open(self.path, "a") if self.enabled else None

    def write(self, event: dict[str, Any]) -> None:
        if self._fh:
            self._fh.write(json.dumps(event) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None

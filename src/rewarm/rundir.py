"""The run directory: paths, the append-only metrics log, the lock, reading runs back."""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from rewarm import atomic
from rewarm.errors import DiskFull, UserError

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
        self.marker = self.path / ".rewarm-run"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def has_started(self) -> bool:
        """Anything here that a run would write (a user's own config.yaml or final/ counts too)."""
        return any(p.exists() for p in (self.metrics, self.checkpoints, self.config, self.summary, self.final))

    def is_run(self) -> bool:
        """A directory rewarm made (its marker, or a metrics log that opens with a start event)."""
        if self.marker.is_file():
            return True
        first = next(iter_metrics(self.metrics), None)
        return bool(first and first.get("event") == "start")

    def is_finished(self) -> bool:
        """summary.json is there and is one rewarm wrote at the end of a run."""
        try:
            return json.loads(self.summary.read_text()).get("status") == "completed"
        except (OSError, ValueError, AttributeError):
            return False

    def acquire_lock(self) -> None:
        """One process per run directory, for the life of the run: an exclusive `flock` on `.lock`
        (atomic: of two processes starting together exactly one wins; the kernel drops it when
        the holder dies, so a lock left by a killed run never blocks the next one)."""
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot write the run directory {self.path}: {exc.strerror or exc}. "
                                f"Choose a writable `out_dir`.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_pid(self.lock)
                raise UserError(
                    f"run directory {self.path} is in use by process {holder or '(unknown)'}. Wait for it to finish, "
                    f"or stop it; a lock from a dead process is taken over automatically."
                ) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock).st_ino:
                    break  # we hold the lock on the file that is at the path now
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder unlinked it while we opened it: try again on the new file
        previous = _read_pid(self.lock)
        if previous and previous != os.getpid():
            log.warning("taking over stale lock left by process %d (no longer running) on %s", previous, self.path)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as exc:
            self.lock.unlink(missing_ok=True)
            os.close(fd)
            if atomic.is_disk_full(exc):
                raise DiskFull(f"disk full: cannot even write the lock file of {self.path}. Free space, then start again.") from None
            raise UserError(f"cannot write the run directory {self.path}: {exc.strerror or exc}.") from None
        self._lock_fd = fd

    def lock_holder(self) -> int | None:
        """The pid of the live process that holds this run's lock, if any."""
        if getattr(self, "_lock_fd", None) is not None:
            return os.getpid()
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(self.lock) or -1
        finally:
            os.close(fd)  # closing drops the probe's own shared lock
        return None

    def release_lock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is None:
            return
        self._lock_fd = None
        self.lock.unlink(missing_ok=True)  # unlink first: a new holder then creates a fresh file
        os.close(fd)

    def read_metrics(self) -> list[dict]:
        return list(iter_metrics(self.metrics))

    def truncate_metrics_after(self, step: int) -> None:
        """On resume / rollback: drop events logged after the checkpoint's step (they will be
        redone), keeping rollback events as the run's history."""
        if not self.metrics.exists():
            return
        kept = [e for e in iter_metrics(self.metrics) if e.get("step", 0) <= step or e.get("event") == "rollback"]
        atomic.write_jsonl(self.metrics, kept)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (FileNotFoundError, ValueError):
        return None


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

    def __init__(self, path: Path, enabled: bool = True, sinks: list | None = None):
        self.path = path
        self.enabled = enabled
        self.sinks = sinks or []  # live views (TensorBoard, W&B) that get a copy of each event
        self._fh = open(path, "a") if enabled else None

    def reopen(self) -> None:
        """After the file was rewritten (truncated on rollback), append to the new one (the live views go on)."""
        if self._fh:
            self._fh.close()
        self._fh = open(self.path, "a") if self.enabled else None

    def write(self, event: dict[str, Any]) -> None:
        if self._fh:
            try:
                self._fh.write(json.dumps(event) + "\n")
                self._fh.flush()
            except OSError as exc:
                if atomic.is_disk_full(exc):  # a torn last line is ignored by readers; the checkpoints are intact
                    raise DiskFull(f"disk full while appending to {self.path}. Free space, then --resume.") from None
                raise
            for sink in self.sinks:
                sink.log(event)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []

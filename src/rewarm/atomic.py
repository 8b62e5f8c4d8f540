"""Files that are either whole or absent: write under a temporary name, fsync, rename.

Every file a later run trusts (checkpoints, final/, summary.json, config.yaml, shards'
meta.json, metrics rewritten on resume) goes through `commit`, the one place that renames
into place: a crash at any moment leaves the old file or the new one, never half of one.
Temporary names start with a dot and carry the writer's pid (`.NAME.tmp-PID`), so an
interrupted write is recognisable and never mistaken for the real thing.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from rewarm.errors import DiskFull, RewarmError, UserError

# A full disk surfaces as OSError(ENOSPC) from Python, but as RuntimeError from torch.save's C++
# writer and as SafetensorError from safetensors; these are the words they use.
_DISK_FULL_WORDS = ("no space left on device", "os error 28", "errno 28", "code: 28", "storagefull",
                    "disk quota exceeded", "file write failed")


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
    old = None
    if tmp.is_dir():
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_path(p)
        if final.is_dir():  # a directory cannot be renamed over a full one: set the old one aside first
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
    else:
        _fsync_path(tmp)
    os.replace(tmp, final)
    try:
        _fsync_path(final.parent)
    except OSError:  # some filesystems refuse to fsync a directory; the rename itself is atomic
        pass
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """Whether `exc` (of any type, or anything in its chain) means the disk or quota is full; if the
    message does not say, a filesystem at `where` with under 1 MiB free counts as full."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(seen).lower() for w in _DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if where is not None:
        try:
            return shutil.disk_usage(_existing_parent(Path(where))).free < (1 << 20)
        except OSError:
            return False
    return False


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def remove(path: Path) -> None:
    """Delete a partial write, file or directory, ignoring what is already gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fail_if_disk_full(exc: BaseException, partial: Path, what: str, hint: str = "") -> None:
    """After a failed write: remove the partial `partial`, and if the disk is full raise DiskFull
    (exit 4) saying so; otherwise return and let the caller re-raise the original error."""
    # with no word of it in the message, a nearly full disk explains only write errors, not e.g. a bug
    writeish = isinstance(exc, (OSError, RuntimeError)) or "Safetensor" in type(exc).__name__
    full = not isinstance(exc, RewarmError) and is_disk_full(exc, partial if writeish else None)
    remove(partial)
    if full:
        raise DiskFull(f"disk full while writing {what}; the partial write was removed. Free space, then run the "
                       f"same command again{hint}.") from None


def require_free(directory: Path, need: int, what: str, hint: str = "") -> None:
    """DiskFull (exit 4) before writing `what` when `directory` has less than `need` bytes free."""
    free = shutil.disk_usage(_existing_parent(Path(directory))).free
    if free < need:
        raise DiskFull(f"not enough disk space for {what} in {directory}: need ~{need / 1e6:.1f} MB, "
                       f"{free / 1e6:.1f} MB free. Free space{hint}.")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a temp name's owner may still be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, pattern: str | None = None) -> None:
    """Delete temporary files/dirs (`.X.tmp-PID`, and `.X.old-PID` set aside by `commit`) left in
    `directory` by writers that are no longer running (never a live process's: its pid is in the name)."""
    import itertools

    if not directory.is_dir():
        return
    found = directory.glob(pattern) if pattern else itertools.chain(directory.glob(".*.tmp-*"), directory.glob(".*.old-*"))
    for p in list(found):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove(p)


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        return commit(tmp, path)
    except Exception as exc:
        fail_if_disk_full(exc, tmp, str(path))
        raise


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line."""
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def check_output(path: str | Path, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output file named on the command line, checked before any work: not a directory, a known
    suffix when the writer needs one (plots), and a parent that exists or can be made."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} `{p}` is a directory; give a file name (e.g. {p / ('out' + (suffixes or ('.json',))[0])}).")
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(f"{flag} `{p}`: the file type is taken from its extension; use one of {', '.join(suffixes)}.")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} `{p}`: cannot create its directory ({exc.strerror or exc}). Choose a writable path.") from None
    return p

"""Errors that end a command with a known exit code and a message for people.

The CLI turns every `RewarmError` into its message on stderr and its `exit_code`, with no
traceback; anything else is a bug and keeps its traceback.

| class | exit | meaning |
|---|---|---|
| `UserError` | 2 | the input is wrong (a config typo, a missing directory, a data/model mismatch); the message says how to fix it |
| `Diverged` | 3 | too many non-finite steps in a row and no rollback left to try |
| `DiskFull` | 4 | not enough space for a checkpoint; earlier checkpoints are intact |
| `Preempted` | 143 | SIGTERM/SIGINT: a checkpoint was written; `--resume` continues from it |
"""
from __future__ import annotations

import difflib
from typing import Iterable

USER_ERROR_EXIT = 2


class RewarmError(Exception):
    """A known way for a command to end early; `exit_code` is what the CLI returns."""

    exit_code = 1


class UserError(RewarmError):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = USER_ERROR_EXIT


class Diverged(RewarmError):
    """Too many non-finite steps in a row (and no rollback left to try)."""

    exit_code = 3


class DiskFull(RewarmError):
    """Not enough space for a checkpoint; the previous checkpoints are untouched."""

    exit_code = 4


class Preempted(RewarmError):
    """SIGTERM/SIGINT arrived: a checkpoint was written; resume continues from it."""

    exit_code = 143  # 128 + SIGTERM


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest option, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""

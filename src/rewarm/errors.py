"""User-facing errors: the CLI turns these into a one-paragraph message and exit code 2.

Anything the user can fix (a typo in a config, a missing directory, a data/model
mismatch) raises `UserError`; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = USER_ERROR_EXIT


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest option, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""

"""Read token shards written by `rewarm prepare`: memmaps, windows, tokenizer checks.

A window is `seq_len + 1` consecutive tokens: inputs are the first `seq_len`, targets
the last `seq_len` (labels are shifted, logits never are). Consecutive windows share
one token, so every token is a target exactly once per epoch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rewarm.errors import UserError


class TokenShards:
    """A prepared directory: `meta.json` + `train.bin` / `val.bin` as read-only memmaps."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise UserError(f"data directory {self.path} does not exist. Create it with `rewarm prepare INPUTS -o {self.path} --tokenizer TOK`.")
        if not meta_path.is_file():
            raise UserError(f"{self.path} has no meta.json: it was not written by `rewarm prepare` (or preparation did not finish). Re-run `rewarm prepare`.")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is corrupted (not JSON). Re-run `rewarm prepare --overwrite`.") from None
        self.dtype = np.dtype(self.meta["dtype"])
        self._cache: dict[str, np.ndarray] = {}

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def tokenizer_path(self) -> str:
        return self.meta["tokenizer"]["path"]

    def split(self, name: str) -> np.ndarray:
        """The token ids of `train` or `val` (a memmap; nothing is read until sliced)."""
        if name not in self._cache:
            f = self.path / f"{name}.bin"
            expected = self.meta[name]["tokens"]
            if not f.is_file() or f.stat().st_size != expected * self.dtype.itemsize:
                raise UserError(f"{f} is missing or truncated (meta.json expects {expected} tokens). Re-run `rewarm prepare --overwrite`.")
            self._cache[name] = np.memmap(f, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)
        return self._cache[name]

    def num_windows(self, name: str, seq_len: int) -> int:
        return max((len(self.split(name)) - 1) // seq_len, 0)

    def window(self, name: str, index: int, seq_len: int) -> np.ndarray:
        start = index * seq_len
        return self.split(name)[start : start + seq_len + 1]

    def check_compatible(self, tokenizer_fp: str, model_vocab: int, label: str) -> None:
        """Refuse shards that the model would read with another tokenizer or out of range."""
        if self.fingerprint != tokenizer_fp:
            raise UserError(
                f"data `{label}` ({self.path}) was tokenized with a different tokenizer "
                f"(fingerprint {self.fingerprint}, the run's tokenizer is {tokenizer_fp}; shards say "
                f"`{self.meta['tokenizer']['name']}`). Re-run `rewarm prepare` with the run's tokenizer, or set `tokenizer:`."
            )
        max_id = self.meta.get("max_token_id", -1)
        if max_id >= model_vocab:
            raise UserError(
                f"data `{label}` holds token id {max_id} but the model's vocab has {model_vocab} entries. "
                f"Use a model whose vocab covers the tokenizer (model.vocab_size) or re-prepare the data."
            )

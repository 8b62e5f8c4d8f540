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
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{meta_path} is corrupted (not JSON). Re-run `rewarm prepare --overwrite`.") from None
        check_meta(self.meta, meta_path)
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
        max_id = max(self.meta.get("max_token_id", -1), *(self.max_id(name) for name in ("train", "val")))
        if max_id >= model_vocab:
            raise UserError(
                f"data `{label}` holds token id {max_id} but the model's vocab has {model_vocab} entries. "
                f"Use a model whose vocab covers the tokenizer (model.vocab_size) or re-prepare the data."
            )

    def max_id(self, name: str) -> int:
        """The largest id actually stored in `name`.bin (not just what meta.json claims): read once,
        vectorised over the memmap in 64M-token blocks, then cached beside the shards keyed by the
        file's size and mtime (a shard edited or rewritten is read again)."""
        f = self.path / f"{name}.bin"
        ids = self.split(name)
        if len(ids) == 0:
            return -1
        st = f.stat()
        key = f"{name}:{st.st_size}:{st.st_mtime_ns}"
        cache_file = self.path / ".max_ids.json"
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return int(cache[key])
        block = 1 << 26
        value = max(int(ids[i : i + block].max()) for i in range(0, len(ids), block))
        try:
            from rewarm import atomic

            atomic.write_json(cache_file, {**{k: v for k, v in cache.items() if not k.startswith(name + ":")}, key: value})
        except OSError:
            pass  # read-only data: the check just runs again next time
        return value


META_FIELDS = {"format_version": int, "dtype": str, "tokenizer": dict, "train": dict, "val": dict}


def check_meta(meta: object, where: Path) -> None:
    """meta.json must be one `rewarm prepare` wrote (format_version 1): the fields the reader uses,
    with the right types and a token dtype it knows."""
    redo = "Re-run `rewarm prepare --overwrite` on the original text."
    if not isinstance(meta, dict):
        raise UserError(f"{where} is not a rewarm shard description (not a JSON object). {redo}")
    for key, tp in META_FIELDS.items():
        if not isinstance(meta.get(key), tp):
            raise UserError(f"{where} is not a rewarm shard description: `{key}` is missing or not a {tp.__name__} "
                            f"(was it written by another tool, e.g. nanoGPT's prepare.py?). {redo}")
    if meta["format_version"] != 1:
        raise UserError(f"{where} has format_version {meta['format_version']}; this rewarm reads version 1. {redo}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise UserError(f"{where}: dtype `{meta['dtype']}` is not a token dtype rewarm writes (uint16, uint32). {redo}")
    if not isinstance(meta["tokenizer"].get("fingerprint"), str):
        raise UserError(f"{where} has no tokenizer fingerprint, so the tokenizer it was made with is unknown. {redo}")
    for key in ("name", "path"):
        if not isinstance(meta["tokenizer"].get(key), str):
            raise UserError(f"{where}: `tokenizer.{key}` is missing or not text. {redo}")
    if "max_token_id" in meta and (not isinstance(meta["max_token_id"], int) or isinstance(meta["max_token_id"], bool)):
        raise UserError(f"{where}: `max_token_id` must be an integer, got {meta['max_token_id']!r}. {redo}")
    for split in ("train", "val"):
        if not isinstance(meta[split].get("tokens"), int):
            raise UserError(f"{where}: `{split}.tokens` is missing. {redo}")

"""Text -> token shards (`train.bin`, `val.bin`, `meta.json`), streaming, bounded memory.

Pass 1 tokenizes documents in batches (the Rust tokenizer uses both cores) and appends
their ids, each followed by EOS, to one temporary file, with a small per-document index
(split hash, start, length) on disk. Pass 2 decides the split *by document* from a
hash of (seed, text) — so the split does not depend on input order and duplicated
documents land on the same side — and copies the ids into train.bin / val.bin. The
whole output directory is built under a temporary name and renamed at the end.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from rewarm import atomic
from rewarm.data.sources import LargeTextFile, ReadStats, cut_piece, expand_inputs, file_documents, hf_dataset_documents
from rewarm.errors import UserError
from rewarm.tokenizer import fingerprint, load_tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BATCH_CHARS = 1_000_000  # text per tokenizer call: bounds memory whatever the corpus or document size
COPY_TOKENS = 8_000_000  # tokens copied per step of pass 2


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _doc_pieces(doc: "str | LargeTextFile") -> Iterator[str]:
    """A document as pieces of at most PIECE_CHARS, cut at newlines, so one tokenizer call stays small."""
    if isinstance(doc, LargeTextFile):
        yield from doc.pieces()
        return
    rest = doc
    while rest:
        piece, rest = cut_piece(rest)
        yield piece


def _input_signature(files: list[Path], hf_dataset: str | None) -> list:
    sig = [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files]
    if hf_dataset:
        sig.append(["hf", hf_dataset])
    return sig


def prepare(
    inputs: list[str],
    tokenizer: str,
    out_dir: str | Path,
    *,
    hf_dataset: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    val_fraction: float | None = 0.01,
    val_tokens: int | None = None,
    seed: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` (and/or an HF dataset) into `out_dir`; returns meta.json's content."""
    out = Path(out_dir)
    if not inputs and not hf_dataset:
        raise UserError("no inputs: give files, directories or globs, or --hf-dataset NAME[:CONFIG].")
    if val_tokens is not None:
        val_fraction = None
        if val_tokens < 0:
            raise UserError(f"--val-tokens must be >= 0, got {val_tokens}.")
    elif val_fraction is None or not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a directory. Choose a directory for -o.")
    if out.is_dir() and overwrite and any(out.iterdir()) and _read_meta(out / "meta.json") is None:
        raise UserError(f"--overwrite would delete {out}, which is not a directory written by `rewarm prepare` "
                        f"(no valid meta.json). Choose another -o, or empty it yourself.")
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs) if inputs else []
    if inputs and not files and not hf_dataset:
        raise UserError(f"inputs {inputs} contain no files.")
    vocab = len(tok)
    dtype = token_dtype(vocab)
    settings = {
        "inputs": _input_signature(files, hf_dataset),
        "hf_split": hf_split if hf_dataset else None,
        "text_field": text_field,
        "tokenizer_fingerprint": fingerprint(tok),
        "val_fraction": val_fraction,
        "val_tokens": val_tokens,
        "seed": seed,
        "strict": strict,
    }
    args_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta_path = out / "meta.json"
    if out.exists() and not overwrite:
        existing = _read_meta(meta_path)
        if existing is not None and existing.get("args_key") == args_key:
            log.info("%s is already prepared with these arguments; nothing to do (--overwrite to redo)", out)
            return existing
        raise UserError(f"{out} already exists (prepared from other arguments). Pass --overwrite to replace it, or choose another output directory.")

    tmp = atomic.temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot write the output {out}: {exc.strerror or exc}. Choose a writable -o.") from None
    t0 = time.time()
    try:
        stats = ReadStats()
        docs: Iterator[str] = file_documents(files, text_field, stats, strict)
        if hf_dataset:
            docs = itertools.chain(docs, hf_dataset_documents(hf_dataset, hf_split, text_field, stats))
        n_tokens, max_id = _tokenize_all(docs, tok, dtype, tmp, seed, stats, progress, total_bytes=sum(f.stat().st_size for f in files))
        if stats.documents == 0:
            raise UserError(
                f"no usable documents in the inputs (skipped: {stats.skipped}). "
                f"Check the paths, the --text-field, and that the files are UTF-8 text."
            )
        counts = _split(tmp, dtype, seed, val_fraction, val_tokens)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {
                "name": str(tokenizer),
                "path": str(Path(tokenizer).resolve()) if Path(tokenizer).exists() else str(tokenizer),
                "fingerprint": fingerprint(tok),
                "vocab_size": vocab,
                "eos_token_id": tok.eos_token_id,
            },
            "dtype": dtype.name,
            "max_token_id": max_id,
            "train": counts["train"],
            "val": counts["val"],
            "sources": [str(f) for f in files] + ([f"hf:{hf_dataset}[{hf_split}]"] if hf_dataset else []),
            "text_field": text_field,
            "split": {"seed": seed, "val_fraction": val_fraction, "val_tokens": val_tokens, "by": "document"},
            "skipped": stats.skipped,
            "bytes_read": stats.bytes,
            "seconds": round(time.time() - t0, 2),
            "args_key": args_key,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        atomic.commit(tmp, out)
    except Exception as exc:  # a full disk surfaces as OSError or numpy's own errors
        atomic.fail_if_disk_full(exc, tmp, f"the shards {out}")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    skipped = {k: v for k, v in meta["skipped"].items() if v}
    if skipped:
        log.warning("skipped documents: %s (use --strict to fail instead)", skipped)
    return meta



def _read_meta(path: Path) -> dict | None:
    """An existing output's meta.json, or None if it is missing or not a valid one."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "format_version" in meta else None


def _tokenize_all(docs, tok, dtype, tmp: Path, seed: int, stats: ReadStats, progress: bool, total_bytes: int):
    """Pass 1: ids of every document (+EOS) into all.tmp; index rows (key, start, length) into index.tmp.

    Pieces of documents (a long document is several) are queued until BATCH_CHARS characters, then
    encoded in one call and written at once: memory is bounded by the batch, not by any document."""
    eos = tok.eos_token_id
    backend = tok.backend_tokenizer
    # encode_batch_fast skips character offsets: faster and far smaller per token
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    counts = {"tokens": 0, "max_id": -1, "doc_start": 0}
    bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    queue: list[tuple[str, int | None]] = []  # (piece, split key if it is its document's last piece)

    def flush(out_ids, out_idx) -> None:
        encodings = encode([piece for piece, _ in queue], add_special_tokens=False)
        ids_out, rows = [], []
        for (piece, key), enc in zip(queue, encodings):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if key is not None:
                ids = np.append(ids, eos)
            ids_out.append(ids)
            counts["tokens"] += len(ids)
            if key is not None:
                start = counts["doc_start"]
                rows.append((key >> 1, start, counts["tokens"] - start))  # >>1 keeps the key in int64
                counts["doc_start"] = counts["tokens"]
        ids = np.concatenate(ids_out)
        if len(ids):
            counts["max_id"] = max(counts["max_id"], int(ids.max()))
        out_ids.write(ids.astype(dtype).tobytes())
        if rows:
            out_idx.write(np.asarray(rows, dtype=np.int64).tobytes())
        bar.update(sum(len(p.encode("utf-8")) for p, _ in queue) if total_bytes else len(rows))
        bar.set_postfix(tokens=counts["tokens"])
        queue.clear()

    with open(tmp / "all.tmp", "wb") as out_ids, open(tmp / "index.tmp", "wb") as out_idx:
        chars = 0
        for doc in docs:
            hasher = hashlib.blake2b(digest_size=8, key=str(seed).encode())
            pieces = _doc_pieces(doc)
            piece = next(pieces, None)
            while piece is not None:
                hasher.update(piece.encode("utf-8"))
                following = next(pieces, None)
                key = int.from_bytes(hasher.digest(), "little") if following is None else None
                queue.append((piece, key))
                chars += len(piece)
                if chars >= BATCH_CHARS:
                    flush(out_ids, out_idx)
                    chars = 0
                piece = following
        if queue:
            flush(out_ids, out_idx)
    bar.close()
    return counts["tokens"], counts["max_id"]


def _split(tmp: Path, dtype: np.dtype, seed: int, val_fraction: float | None, val_tokens: int | None) -> dict:
    """Pass 2: choose validation documents by hash and copy ids into train.bin / val.bin."""
    index = np.fromfile(tmp / "index.tmp", dtype=np.int64).reshape(-1, 3)
    keys, starts, lengths = index[:, 0], index[:, 1], index[:, 2]
    if val_tokens is not None:
        order = np.argsort(keys, kind="stable")
        cum = np.cumsum(lengths[order])
        take = int(np.searchsorted(cum, val_tokens, side="left")) + 1 if val_tokens > 0 else 0
        is_val = np.zeros(len(keys), dtype=bool)
        is_val[order[:take]] = True
    else:
        is_val = keys < int(val_fraction * 2**63)
        if val_fraction > 0 and not is_val.any() and len(keys) > 1:
            is_val[np.argmin(keys)] = True  # a tiny corpus still gets one validation document
    if is_val.all():
        raise UserError(
            f"all {len(keys)} documents went to validation, leaving nothing to train on. "
            f"Lower --val-tokens / --val-fraction or add more documents."
        )
    all_ids = np.memmap(tmp / "all.tmp", dtype=dtype, mode="r") if starts.size and lengths.sum() else np.zeros(0, dtype)
    counts = {}
    with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val:
        # consecutive documents bound for the same file are one contiguous range of all.tmp: copy each
        # range in blocks of COPY_TOKENS, so memory stays flat however long one document is
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1, [len(keys)]])
        for first, stop in zip(bounds[:-1], bounds[1:]):
            out = f_val if is_val[first] else f_train
            lo, hi = int(starts[first]), int(starts[stop - 1] + lengths[stop - 1])
            for pos in range(lo, hi, COPY_TOKENS):
                out.write(np.asarray(all_ids[pos : min(pos + COPY_TOKENS, hi)]).tobytes())
    for name, sel in (("train", ~is_val), ("val", is_val)):
        counts[name] = {"tokens": int(lengths[sel].sum()), "documents": int(sel.sum())}
    del all_ids
    os.remove(tmp / "all.tmp")
    os.remove(tmp / "index.tmp")
    return counts

"""Read documents from files, directories, globs, JSONL, Parquet and HF datasets.

One document = one plain-text file, one JSONL record, one Parquet row or one dataset
row. Everything streams: a plain-text file above `LARGE_FILE_BYTES` is never read whole but
handed on as a `LargeTextFile`, whose newline-aligned pieces are read one at a time, so memory
stays flat whatever the size of one document.
"""
from __future__ import annotations

import codecs
import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rewarm.errors import UserError

log = logging.getLogger(__name__)

SKIP_DIRS = {".git", "__pycache__", ".venv", "node_modules", ".hg", ".svn"}
LARGE_FILE_BYTES = 4 << 20  # plain-text files above this are streamed in pieces
PIECE_CHARS = 500_000  # the longest piece of one document handed to the tokenizer at once
READ_BYTES = 1 << 20


class LargeTextFile:
    """One document too large to hold as a string: its text, in newline-aligned pieces of at most
    PIECE_CHARS characters (UTF-8 already checked, so reading it again cannot fail on decoding)."""

    def __init__(self, path: Path, nbytes: int):
        self.path, self.nbytes = path, nbytes

    def pieces(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")()
        buf = ""
        with open(self.path, "rb") as fh:
            for raw in iter(lambda: fh.read(READ_BYTES), b""):
                buf += decoder.decode(raw)
                while len(buf) >= PIECE_CHARS:
                    piece, buf = cut_piece(buf)
                    yield piece
        buf += decoder.decode(b"", final=True)
        while buf:
            piece, buf = cut_piece(buf)
            yield piece


def cut_piece(text: str) -> tuple[str, str]:
    """(head, rest): head is at most PIECE_CHARS long and ends at a newline where there is one."""
    if len(text) <= PIECE_CHARS:
        return text, ""
    nl = text.rfind("\n", 0, PIECE_CHARS)
    end = nl + 1 if nl > 0 else PIECE_CHARS
    return text[:end], text[end:]


def texts(docs) -> Iterator[str]:
    """Documents as strings, a large file as its pieces (for consumers that need no document bounds)."""
    for doc in docs:
        if isinstance(doc, LargeTextFile):
            yield from doc.pieces()
        else:
            yield doc


@dataclass
class ReadStats:
    """What was read and what was skipped (reported, stored in meta.json)."""

    documents: int = 0
    bytes: int = 0
    skipped: dict = field(default_factory=lambda: {"non_utf8": 0, "binary": 0, "empty": 0, "not_text": 0})


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, directories (recursive) and glob patterns -> a sorted, de-duplicated file list."""
    files: list[Path] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
                files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
        else:
            matched = sorted(glob.glob(spec, recursive=True))
            if not matched:
                raise UserError(f"input `{spec}` matches no file or directory. Check the path or quote the glob.")
            files.extend(Path(m) for m in matched if Path(m).is_file())
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decode(raw: bytes, where: str, stats: ReadStats, strict: bool) -> str | None:
    if b"\x00" in raw[:8192]:
        stats.skipped["binary"] += 1
        if strict:
            raise UserError(f"{where} looks binary (NUL bytes). Remove it from the inputs or drop --strict to skip it.")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        stats.skipped["non_utf8"] += 1
        if strict:
            raise UserError(
                f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start}). "
                f"Re-encode it as UTF-8, or drop --strict to skip such documents with a count."
            ) from None
        return None


def _text(value, where: str, text_field: str, stats: ReadStats, strict: bool) -> str | None:
    """A record's text field if it is a string; null, numbers, lists and bytes are skipped with a
    count (never tokenized as their Python repr), or refused under --strict."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # JSON can carry lone surrogates (\\ud800) that no UTF-8 text holds
            return value
        except UnicodeEncodeError:
            stats.skipped["non_utf8"] += 1
            if strict:
                raise UserError(f"{where}: field `{text_field}` holds a lone surrogate, which is not UTF-8 text. "
                                f"Fix the record, or drop --strict to skip it with a count.") from None
            return None
    stats.skipped["not_text"] += 1
    if strict:
        raise UserError(f"{where}: field `{text_field}` is {type(value).__name__} ({str(value)[:40]!r}), not text. "
                        f"Fix the record, choose another --text-field, or drop --strict to skip such records with a count.")
    return None


def _emit(text: str | None, stats: ReadStats) -> Iterator[str]:
    if text is None:
        return
    if not text.strip():
        stats.skipped["empty"] += 1
        return
    stats.documents += 1
    yield text


def _jsonl_docs(path: Path, text_field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            stats.bytes += len(raw)
            if not raw.strip():
                continue
            line = _decode(raw, f"{path}:{lineno}", stats, strict)
            if line is None:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno} is not valid JSON ({exc.msg}). Fix or remove that line.") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = list(record) if isinstance(record, dict) else []
                raise UserError(
                    f"{path}:{lineno} has no field `{text_field}` (fields: {keys}). "
                    f"Choose the text field with --text-field."
                )
            yield from _emit(_text(record[text_field], f"{path}:{lineno}", text_field, stats, strict), stats)


def _parquet_docs(path: Path, text_field: str, stats: ReadStats, strict: bool) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]}). "
                        f"Rename it if it is text/JSONL, or remove it from the inputs.") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column `{text_field}` (columns: {pf.schema_arrow.names}). Use --text-field.")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            text = _text(value, f"{path} row {row}", text_field, stats, strict)
            if text is not None:
                stats.bytes += len(text.encode("utf-8"))
            yield from _emit(text, stats)


def file_documents(files: list[Path], text_field: str, stats: ReadStats, strict: bool = False) -> Iterator[str]:
    """Documents from a list of files, by extension: .jsonl/.ndjson, .parquet, else plain text."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_docs(path, text_field, stats, strict)
        elif suffix == ".parquet":
            yield from _parquet_docs(path, text_field, stats, strict)
        elif path.stat().st_size > LARGE_FILE_BYTES:
            yield from _large_file(path, stats, strict)
        else:
            raw = path.read_bytes()
            stats.bytes += len(raw)
            yield from _emit(_decode(raw, str(path), stats, strict), stats)


def _large_file(path: Path, stats: ReadStats, strict: bool) -> Iterator[LargeTextFile]:
    """Check a big file in one streaming pass (binary? UTF-8? only whitespace?) before any of it is used."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, has_text = 0, False
    with open(path, "rb") as fh:
        for raw in iter(lambda: fh.read(READ_BYTES), b""):
            if size == 0 and b"\x00" in raw[:8192]:
                _decode(raw[:8192], str(path), stats, strict)  # counts it as binary (or refuses under --strict)
                return
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as exc:
                exc.start += size
                stats.skipped["non_utf8"] += 1
                if strict:
                    raise UserError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}). Re-encode it as "
                                    f"UTF-8, or drop --strict to skip such documents with a count.") from None
                return
            size += len(raw)
            has_text = has_text or bool(text.strip())
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        stats.skipped["non_utf8"] += 1
        if strict:
            raise UserError(f"{path} is not valid UTF-8 (it ends inside a character).") from None
        return
    stats.bytes += size
    if not has_text:
        stats.skipped["empty"] += 1
        return
    stats.documents += 1
    yield LargeTextFile(path, size)


def hf_dataset_documents(spec: str, split: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Rows of an HF dataset `NAME[:CONFIG]`, streamed. A local directory saved with
    `save_to_disk` is read with `load_from_disk`; anything else goes to `load_dataset`
    (hub ids for online users, or a local data directory)."""
    import datasets

    name, _, config = spec.partition(":")
    local = Path(name)
    try:
        if local.is_dir() and any((local / f).exists() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as exc:
        raise UserError(f"could not load HF dataset `{spec}` split `{split}`: {str(exc).splitlines()[0]}") from None
    for row in ds:
        if text_field not in row:
            raise UserError(f"HF dataset `{spec}` has no field `{text_field}` (fields: {list(row)}). Use --text-field.")
        text = _text(row[text_field], f"HF dataset `{spec}`", text_field, stats, False)
        if text is not None:
            stats.bytes += len(text.encode("utf-8"))
        yield from _emit(text, stats)


def limit_chars(docs: Iterator[str], max_chars: int) -> Iterator[str]:
    """At most `max_chars` characters of the documents (the last one cut), e.g. a tokenizer sample."""
    seen = 0
    for doc in texts(docs):
        if seen >= max_chars:
            return
        yield doc[: max_chars - seen]
        seen += len(doc)

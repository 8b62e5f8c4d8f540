"""The retrieval database (`rewarm retrieval build`): a prepared training split cut into chunks of
m tokens; chunk j's value is its neighbour, the 2m tokens [j·m, j·m + 2m) (the chunk and its
continuation, RETRO's [N, F]); its key is a frozen embedding of the chunk alone (faiss) or its
BM25 terms.

Documents: `rewarm prepare` ends every document with EOS, so the document of token t is the number
of EOS tokens before it. Each chunk records the documents its own tokens and its neighbour span
(`doc_lo`, `doc_mid`, `doc_hi`), so a retriever can drop neighbours from the documents of the
sequence it is predicting. A hash of every chunk's tokens finds training chunks again at query time.

Layout of the directory (written under a temporary name, renamed when complete; meta.json last):
    meta.json      format, chunk, tokenizer, keys (embed model + layer | bm25), index type
    tokens.bin     the covered tokens (n·m + m), in the shards' dtype: neighbour j = tokens[j·m : j·m+2m]
    docs.npy       (n, 3) int64: document of the chunk's first token, last token, neighbour's last token
    hashes.npy     (n, 2) uint64/int64: chunk-token hash, chunk id, sorted by hash
    index.faiss    keys (flat: exact L2 on unit vectors; ivfpq: IVF + product quantisation) | bm25/
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rewarm import atomic
from rewarm.data.shards import TokenShards
from rewarm.errors import UserError

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked is not news to users
logging.getLogger("bm25s").setLevel(logging.WARNING)

FORMAT_VERSION = 1
IVF_ABOVE = 200_000  # chunks: an exact flat index up to here (`--index auto`), IVF-PQ above
IVF_MIN = 1_000  # chunks IVF-PQ needs at least to train its quantisers (256 codes per sub-quantiser)
INDEX_TYPES = ("auto", "flat", "ivfpq")


def chunk_hashes(chunks: np.ndarray) -> np.ndarray:
    """(n, m) token ids → (n,) int64 hashes of each row's ids (as int64, so dtypes agree)."""
    rows = np.ascontiguousarray(np.asarray(chunks, dtype=np.int64))
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little", signed=True)
                     for r in rows], dtype=np.int64)


def bm25_terms(chunks: np.ndarray) -> list[list[str]]:
    """Token ids as BM25 terms: the tokenizer already made the words."""
    return [[f"t{int(t)}" for t in row] for row in np.asarray(chunks)]


@dataclass
class BuildResult:
    path: Path
    chunks: int
    seconds: float
    bytes: int
    index: str


def is_database(path: Path) -> bool:
    """Whether `path` is a directory this module wrote (what --overwrite may replace)."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "chunk" in meta and "keys" in meta and (Path(path) / "tokens.bin").is_file()


def _chunk_documents(tokens: np.ndarray, n: int, chunk: int, eos: int, block: int = 1 << 16) -> np.ndarray:
    """(n, 3): the document (EOS tokens strictly before) of each chunk's first token, last token and
    its neighbour's last token. Block by block: memory holds one block of tokens, not the corpus."""
    docs = np.empty((n, 3), dtype=np.int64)
    before = 0  # EOS tokens before the current block
    for i in range(0, n, block):
        j = min(n, i + block)
        span = np.asarray(tokens[i * chunk : j * chunk + chunk]) == eos  # + the last chunk's continuation
        cum = np.concatenate([[0], np.cumsum(span, dtype=np.int64)])  # cum[t] = EOS before offset t
        starts = (np.arange(i, j, dtype=np.int64) - i) * chunk
        docs[i:j] = before + np.stack([cum[starts], cum[starts + chunk - 1], cum[starts + 2 * chunk - 1]], axis=1)
        before += int(span[: (j - i) * chunk].sum())
    return docs


def _build_faiss(keys: np.ndarray, kind: str, progress: bool) -> tuple[object, dict]:
    import faiss

    n, dim = keys.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
        info = {"type": "flat"}
    else:
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
        m = next(d for d in (dim // 2, dim // 4, dim // 8, dim // 16, 1) if d >= 1 and dim % d == 0)
        m = max(1, min(m, 64))
        while dim % m:
            m -= 1
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8)
        sample = keys[np.linspace(0, n - 1, min(n, max(256 * 39, nlist * 64)), dtype=np.int64)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = min(nlist, 32)
        info = {"type": "ivfpq", "nlist": nlist, "subquantizers": m, "bits": 8, "nprobe": index.nprobe}
    for i in tqdm(range(0, n, 65536), desc="indexing", unit="block", disable=not progress):
        index.add(np.ascontiguousarray(keys[i : i + 65536], dtype=np.float32))
    return index, info


def build(shards_dir: str | Path, out: str | Path, *, chunk: int = 64, embed: str | None = None,
          layer: int | None = None, bm25: bool = False, index: str = "auto", max_chunks: int | None = None,
          overwrite: bool = False, progress: bool = True, batch: int = 64) -> BuildResult:
    """Cut `shards_dir`'s train split into chunks and index them (see the module docstring)."""
    start = time.perf_counter()
    out = Path(out)
    if chunk < 2:
        raise UserError(f"--chunk must be at least 2 tokens (RETRO uses 64), got {chunk}.")
    if bool(embed) == bool(bm25):
        raise UserError("choose the keys: `--embed MODEL_DIR [--layer L]` (frozen decoder embeddings) or `--bm25`.")
    if index not in INDEX_TYPES:
        raise UserError(f"--index must be one of {', '.join(INDEX_TYPES)}, got {index!r}.")
    if bm25 and index != "auto":
        raise UserError("--index chooses the faiss index of embedding keys; BM25 keeps its own. Drop --index.")
    if max_chunks is not None and max_chunks < 2:
        raise UserError(f"--max-chunks must be at least 2, got {max_chunks}.")
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists. Choose another -o, or pass --overwrite to rebuild it.")
    if out.exists() and not is_database(out):
        raise UserError(f"--overwrite would delete {out}, which is not a retrieval database rewarm built. "
                        f"Choose another -o.")
    shards = TokenShards(shards_dir)
    tokens = shards.split("train")
    n = (len(tokens) - chunk) // chunk  # every chunk has a full continuation
    if max_chunks is not None:
        n = min(n, int(max_chunks))
    if n < 1:
        raise UserError(f"{shards_dir}'s train split has {len(tokens)} tokens: fewer than two chunks of {chunk}. "
                        f"Use a larger corpus or a smaller --chunk.")
    from rewarm.tokenizer import load_tokenizer

    tok = load_tokenizer(shards.tokenizer_path)
    if tok.eos_token_id is None:
        raise UserError(f"the shards' tokenizer ({shards.tokenizer_path}) has no EOS token: documents cannot be told apart.")
    embedder = None
    if embed:
        from rewarm.retro.embed import ChunkEmbedder
        from rewarm.tokenizer import fingerprint

        key_tok = load_tokenizer(embed)
        if fingerprint(key_tok) != shards.fingerprint:
            raise UserError(f"--embed {embed} uses another tokenizer than {shards_dir} (fingerprints "
                            f"{fingerprint(key_tok)} vs {shards.fingerprint}): the key model must read the shards' ids.")
        embedder = ChunkEmbedder(embed, layer)
    kind = index if index != "auto" else ("flat" if n <= IVF_ABOVE else "ivfpq")
    if kind == "ivfpq" and n < IVF_MIN:
        raise UserError(f"--index ivfpq needs at least {IVF_MIN:,} chunks to train its quantisers; this database "
                        f"has {n:,}. Use --index flat (exact, and fast at this size).")

    covered = n * chunk + chunk
    tmp = atomic.temp_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out.parent, f".{out.name}.tmp-*")  # what a killed build left behind
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    block = 65536
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            for i in range(0, covered, block * chunk):
                f.write(np.asarray(tokens[i : min(covered, i + block * chunk)]).tobytes())
        np.save(tmp / "docs.npy", _chunk_documents(tokens, n, chunk, tok.eos_token_id))
        flat = np.memmap(tmp / "tokens.bin", dtype=shards.dtype, mode="r")
        hashes = np.empty(n, dtype=np.int64)
        for i in range(0, n, block):
            rows = np.asarray(flat[i * chunk : min(n, i + block) * chunk]).reshape(-1, chunk)
            hashes[i : i + len(rows)] = chunk_hashes(rows)
        order = np.argsort(hashes, kind="stable")
        np.save(tmp / "hashes.npy", np.stack([hashes[order], order.astype(np.int64)], axis=1))
        meta: dict = {"format_version": FORMAT_VERSION, "chunk": chunk, "neighbour_len": 2 * chunk, "chunks": n,
                      "dtype": shards.dtype.name, "eos_token_id": int(tok.eos_token_id),
                      "tokenizer": dict(shards.meta["tokenizer"]),
                      "source": {"path": str(Path(shards_dir).resolve()), "train_tokens": int(len(tokens)),
                                 "covered_tokens": int(covered)}}
        if embedder is not None:
            keys = np.lib.format.open_memmap(tmp / "keys.tmp.npy", mode="w+", dtype=np.float32, shape=(n, embedder.dim))
            bar = tqdm(total=n, desc="embedding chunks", unit="chunk", disable=not progress)
            for i in range(0, n, 1024):
                rows = np.asarray(flat[i * chunk : min(n, i + 1024) * chunk]).reshape(-1, chunk)
                keys[i : i + len(rows)] = embedder(rows, batch=batch)
                bar.update(len(rows))
            bar.close()
            keys.flush()
            import faiss

            idx, info = _build_faiss(keys, kind, progress)
            faiss.write_index(idx, str(tmp / "index.faiss"))
            del keys
            (tmp / "keys.tmp.npy").unlink()
            meta["keys"] = {"kind": "embed", "model": str(Path(embed).resolve()) if Path(embed).exists() else embed,
                            "layer": embedder.layer, "dim": embedder.dim}
            meta["index"] = info
        else:
            import bm25s

            retriever = bm25s.BM25()
            terms = []
            for i in range(0, n, block):
                rows = np.asarray(flat[i * chunk : min(n, i + block) * chunk]).reshape(-1, chunk)
                terms.extend(bm25_terms(rows))
            retriever.index(terms, show_progress=progress)
            retriever.save(str(tmp / "bm25"), show_progress=False)
            meta["keys"] = {"kind": "bm25"}
            meta["index"] = {"type": "bm25"}
        del flat
        meta["build_seconds"] = round(time.perf_counter() - start, 2)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        meta["bytes"] = size
        atomic.write_json(tmp / "meta.json", meta)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        atomic.commit(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        atomic.fail_if_disk_full(exc, tmp, "the retrieval database")
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out, n, time.perf_counter() - start, size, meta["index"]["type"])


class RetrievalDB:
    """A built database, opened read-only: neighbours by chunk id, documents, the key index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{self.path} is not a retrieval database (no meta.json; an interrupted build leaves none). "
                            f"Build it with `rewarm retrieval build SHARDS -o {self.path} --embed MODEL | --bm25`.")
        rebuild = f"Rebuild it with `rewarm retrieval build ... -o {self.path} --overwrite`."
        try:
            self.meta = json.loads(meta_path.read_text())
            if not isinstance(self.meta, dict):
                raise ValueError("not a mapping")
            if self.meta.get("format_version") != FORMAT_VERSION:
                raise UserError(f"{self.path} was written by another rewarm version (format "
                                f"{self.meta.get('format_version')}, expected {FORMAT_VERSION}). {rebuild}")
            self.chunk, self.n = int(self.meta["chunk"]), int(self.meta["chunks"])
            self.meta["tokenizer"]["fingerprint"], self.meta["keys"]["kind"]  # noqa: B018 (present, or KeyError)
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")
            if len(self.tokens) != self.n * self.chunk + self.chunk:
                raise ValueError(f"tokens.bin holds {len(self.tokens)} tokens, meta.json says "
                                 f"{self.n * self.chunk + self.chunk}")
            self.docs = np.load(self.path / "docs.npy")
            hashes = np.load(self.path / "hashes.npy")
            if self.docs.shape != (self.n, 3) or hashes.shape != (self.n, 2):
                raise ValueError("docs.npy / hashes.npy do not match meta.json")
            index_file = self.path / ("bm25" if self.meta["keys"]["kind"] == "bm25" else "index.faiss")
            if not index_file.exists():
                raise ValueError(f"{index_file.name} is missing")
            if self.meta["keys"]["kind"] == "embed" and not Path(self.meta["keys"]["model"]).exists():
                raise UserError(f"the key model of {self.path} ({self.meta['keys']['model']}) is gone: queries must be "
                                f"keyed by the model that keyed the database. Restore it, or {rebuild[0].lower()}{rebuild[1:]}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{self.path} is a damaged retrieval database ({type(exc).__name__}: {exc}). {rebuild}") from None
        self.hash_keys, self.hash_ids = hashes[:, 0], hashes[:, 1]
        self._index = None

    @property
    def identity(self) -> str:
        """A short id of this build (its meta.json): a database rebuilt at the same path gets another."""
        return hashlib.blake2b((self.path / "meta.json").read_bytes(), digest_size=8).hexdigest()

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    @property
    def keys(self) -> dict:
        return self.meta["keys"]

    def check_tokenizer(self, tokenizer_fp: str, who: str) -> None:
        if tokenizer_fp != self.fingerprint:
            raise UserError(f"retrieval database {self.path} was built with another tokenizer (fingerprint "
                            f"{self.fingerprint}, `{self.meta['tokenizer'].get('name')}`) than {who} ({tokenizer_fp}). "
                            f"Build the database from shards prepared with {who}'s tokenizer.")

    def index(self):
        """The key index, loaded on first use (faiss or BM25)."""
        if self._index is None:
            if self.keys["kind"] == "bm25":
                import bm25s

                self._index = bm25s.BM25.load(str(self.path / "bm25"), show_progress=False)
            else:
                import faiss
                import torch

                faiss.omp_set_num_threads(max(1, torch.get_num_threads()))  # the run's thread budget, not every core
                self._index = faiss.read_index(str(self.path / "index.faiss"))
                if "nprobe" in self.meta["index"]:
                    self._index.nprobe = int(self.meta["index"]["nprobe"])
        return self._index

    def neighbours(self, ids: np.ndarray) -> np.ndarray:
        """(…,) chunk ids → (…, 2m) tokens: each chunk followed by its continuation; id −1 (no
        admissible neighbour) → 2m EOS tokens, which carry no text."""
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.maximum(ids, 0)[..., None] * self.chunk + np.arange(2 * self.chunk)
        out = np.asarray(self.tokens[offsets.reshape(-1)]).reshape(*ids.shape, 2 * self.chunk).astype(np.int64)
        out[ids < 0] = int(self.meta["eos_token_id"])
        return out

    def find(self, hashes: np.ndarray) -> list[np.ndarray]:
        """For each query hash, the ids of the database chunks with exactly those tokens."""
        lo = np.searchsorted(self.hash_keys, hashes, side="left")
        hi = np.searchsorted(self.hash_keys, hashes, side="right")
        return [self.hash_ids[a:b] for a, b in zip(lo, hi)]

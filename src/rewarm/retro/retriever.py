"""Chunks of a batch → their k nearest neighbours in a retrieval database.

Same-document exclusion (RETRO: "neighbours from the same document as the training sequence are
filtered out"): every chunk of a row is looked up in the database by the hash of its tokens; the
documents of those found chunks (a training window is made of database chunks when seq_len is a
multiple of the chunk length) are the row's documents, and a neighbour whose span [chunk,
continuation] touches one of them is skipped — otherwise the model would learn to copy the very
text it predicts. As in RETRO the rule is per training sequence, so which neighbours a chunk may
not use depends on the documents later in its window (during training only). Held-out rows are not
in the database, so nothing is excluded for them. When every candidate is excluded (a database
that is mostly the row's own documents) the neighbour is 2m EOS tokens, never the row's text.

Results are cached per (chunk hash, row documents), so repeated windows (epochs, evaluation at
every interval, generation that re-reads its prefix) query the index once. Deterministic: faiss
search on CPU and BM25 scores do not depend on the batch.
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch

from rewarm.retro.database import RetrievalDB, bm25_terms, chunk_hashes

OVERFETCH = 8  # extra candidates per query so that excluded ones can be replaced


class Retriever:
    def __init__(self, db: RetrievalDB | str, k: int = 2, exclude_same_doc: bool = True, cache_size: int = 200_000,
                 embedder=None):
        self.db = db if isinstance(db, RetrievalDB) else RetrievalDB(db)
        self.k, self.exclude_same_doc = int(k), bool(exclude_same_doc)
        if not 1 <= self.k <= self.db.n:
            raise ValueError(f"retrieval k must be between 1 and the database's {self.db.n} chunks, got {k}")
        self._embedder = embedder
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self.stats = {"queries": 0, "cache_hits": 0, "search_seconds": 0.0, "excluded": 0}

    @property
    def chunk(self) -> int:
        return self.db.chunk

    def embedder(self):
        if self._embedder is None and self.db.keys["kind"] == "embed":
            from rewarm.retro.embed import ChunkEmbedder

            self._embedder = ChunkEmbedder(self.db.keys["model"], self.db.keys["layer"])
        return self._embedder

    def _row_documents(self, hashes: np.ndarray) -> tuple[tuple[int, int], ...]:
        """Document intervals [lo, hi] of the database chunks found in one row."""
        spans = set()
        for ids in self.db.find(hashes):
            for j in ids[:16]:  # a boilerplate chunk can repeat in many documents: a few are enough
                d = self.db.docs[j]
                spans.add((int(d[0]), int(d[2])))
        return tuple(sorted(spans))

    def _search(self, chunks: np.ndarray, want: int) -> np.ndarray:
        """(n, m) chunks → (n, want) candidate chunk ids, best first."""
        want = min(want, self.db.n)
        if self.db.keys["kind"] == "bm25":
            index = self.db.index()
            vocab = index.vocab_dict if hasattr(index, "vocab_dict") else None
            queries = bm25_terms(chunks)
            if vocab is not None:  # terms the corpus never holds score nothing; an empty query still needs one
                queries = [[t for t in q if t in vocab] or [next(iter(vocab))] for q in queries]
            ids, _ = index.retrieve(queries, k=want, show_progress=False, n_threads=1)
            return np.asarray(ids, dtype=np.int64)
        keys = self.embedder()(chunks)
        _, ids = self.db.index().search(keys, want)
        return np.asarray(ids, dtype=np.int64)

    def random_neighbours(self, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """(B, U, k, 2m) neighbours drawn uniformly from the database: the control that tells what the
        CCA layers gain from *relevant* text from what they gain from any text."""
        b, u = shape
        ids = torch.randint(0, self.db.n, (b, u, self.k), generator=generator).numpy()
        return torch.from_numpy(self.db.neighbours(ids))

    def __call__(self, input_ids: torch.Tensor, count: bool = True) -> torch.Tensor:
        """(B, T) ids → (B, T // m, k, 2m) neighbour ids (long, on input_ids' device). `count`: add
        this call to `stats` (training steps do; evaluation does not, so the logged rates are training's)."""
        stats = self.stats if count else dict.fromkeys(self.stats, 0)
        m, k = self.chunk, self.k
        b, t = input_ids.shape
        u = t // m
        ids = input_ids[:, : u * m].detach().cpu().numpy().astype(np.int64).reshape(b, u, m)
        hashes = chunk_hashes(ids.reshape(-1, m)).reshape(b, u)
        out = np.empty((b, u, k), dtype=np.int64)
        todo: list[tuple[int, int, tuple]] = []
        for r in range(b):
            docs = self._row_documents(hashes[r]) if self.exclude_same_doc else ()
            for c in range(u):
                key = (int(hashes[r, c]), docs)
                hit = self._cache.get(key)
                stats["queries"] += 1
                if hit is not None:
                    self._cache.move_to_end(key)
                    stats["cache_hits"] += 1
                    out[r, c] = hit
                else:
                    todo.append((r, c, docs))
        if todo:
            start = time.perf_counter()
            want = k + (OVERFETCH if self.exclude_same_doc else 0)
            cands = self._search(np.stack([ids[r, c] for r, c, _ in todo]), want)
            while True:
                chosen, short = [], []
                for (r, c, docs), row in zip(todo, cands):
                    keep = [j for j in row if j >= 0 and not _touches(self.db.docs[j], docs)]
                    stats["excluded"] += len(row) - len(keep)
                    chosen.append(keep[:k])
                    short.append(len(keep) < k)
                if not any(short) or want >= self.db.n:
                    break
                want = min(self.db.n, want * 4)  # a long document hid most candidates: look further
                cands = self._search(np.stack([ids[r, c] for r, c, _ in todo]), want)
            stats["search_seconds"] += time.perf_counter() - start
            for (r, c, docs), keep in zip(todo, chosen):
                out[r, c] = (keep + [-1] * k)[:k]  # −1: nothing admissible left → an all-EOS neighbour
                self._cache[(int(hashes[r, c]), docs)] = out[r, c].copy()
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return torch.from_numpy(self.db.neighbours(out)).to(input_ids.device)

    def take_stats(self) -> dict:
        s, self.stats = self.stats, {"queries": 0, "cache_hits": 0, "search_seconds": 0.0, "excluded": 0}
        return s


def _touches(span: np.ndarray, docs: tuple) -> bool:
    """Whether the neighbour [doc_lo, doc_hi] overlaps any of the row's document intervals."""
    lo, hi = int(span[0]), int(span[2])
    return any(lo <= b and a <= hi for a, b in docs)

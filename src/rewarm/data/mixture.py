"""Weighted mixtures of token sources (replay), deterministic from (seed, step, rank).

Which source feeds global sequence g is fixed by a periodic pattern built once from the
weights (rounded to fractions p_k/q, q <= 10000): a deadline-ordered "chairman
assignment" (Tijdeman 1980) that keeps every prefix within one sequence of the exact
share, |count_k(n) - w_k n| < 1. So 5% replay with batch 16 gives 4 replay sequences
every 5 steps, never a random 0 or 3. Within a source, sequences read non-overlapping
windows in a fresh random permutation each epoch. Nothing depends on the world size:
rank r simply takes its slice of the global batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from rewarm.data.shards import TokenShards
from rewarm.errors import UserError

log = logging.getLogger(__name__)

MAX_PERIOD = 10_000


def proportion_pattern(weights: list[float]) -> tuple[np.ndarray, list[Fraction]]:
    """One period of source ids with exact rational shares; returns (pattern, shares).

    Chairman assignment: at position n (1-based), among sources whose ideal count
    w_k n exceeds their count by more than delta = 1/(2K-2) — or all with a
    positive deficit — pick the earliest deadline (c_k + 1 - delta)/w_k.
    """
    total = sum(weights)
    shares = [Fraction(w / total).limit_denominator(MAX_PERIOD) for w in weights]
    # Make the rounded shares sum to exactly 1 by adjusting the largest one.
    big = max(range(len(shares)), key=lambda k: shares[k])
    shares[big] += 1 - sum(shares)
    q = int(np.lcm.reduce([s.denominator for s in shares])) if len(shares) > 1 else 1
    if q > MAX_PERIOD * 10:
        shares = [Fraction(round(float(s) * MAX_PERIOD), MAX_PERIOD) for s in shares]
        shares[big] += 1 - sum(shares)
        q = MAX_PERIOD
    K = len(shares)
    delta = Fraction(1, 2 * K - 2) if K > 1 else Fraction(0)
    counts = [0] * K
    pattern = np.empty(q, dtype=np.int64)
    for n in range(1, q + 1):
        best, best_deadline = -1, None
        for k, w in enumerate(shares):
            if w == 0 or w * n - counts[k] <= 0:
                continue
            deadline = (counts[k] + 1 - delta) / w
            if best_deadline is None or deadline < best_deadline:
                best, best_deadline = k, deadline
        pattern[n - 1] = best
        counts[best] += 1
    return pattern, shares


@dataclass
class Source:
    name: str
    shards: TokenShards
    weight: float


class Mixture:
    """The training stream: `batch(step, rank, world)` -> (token windows, source ids)."""

    def __init__(self, sources: list[Source], seq_len: int, global_batch: int, seed: int):
        self.sources = sources
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.pattern, self.shares = proportion_pattern([s.weight for s in sources])
        self.period = len(self.pattern)
        K = len(sources)
        # prefix[k][i] = how many of pattern[:i] are source k
        self.prefix = np.zeros((K, self.period + 1), dtype=np.int64)
        for k in range(K):
            self.prefix[k, 1:] = np.cumsum(self.pattern == k)
        self.num_windows = []
        for s in sources:
            n = s.shards.num_windows("train", seq_len)
            if n < 1 and s.weight > 0:
                raise UserError(
                    f"training source `{s.name}` ({s.shards.path}) has {len(s.shards.split('train'))} tokens, "
                    f"fewer than one window of seq_len+1 = {seq_len + 1}. Add data or lower train.seq_len."
                )
            self.num_windows.append(n)
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._warned_epoch: set[int] = set()

    # ---------------------------------------------------------------- exact counts
    def source_count(self, k: int, n: int) -> int:
        """How many of the first n global sequences come from source k (closed form)."""
        full, rest = divmod(n, self.period)
        return full * int(self.prefix[k, self.period]) + int(self.prefix[k, rest])

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sequence ids -> (source id, index within that source's stream)."""
        full, rest = np.divmod(g, self.period)
        src = self.pattern[rest]
        per_period = self.prefix[:, self.period]
        within = full * per_period[src] + self.prefix[src, rest]
        return src, within

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            rng = np.random.Generator(np.random.PCG64([self.seed, k, epoch]))
            self._perms = {kk: v for kk, v in self._perms.items() if kk[0] != k}  # keep one epoch per source
            self._perms[key] = rng.permutation(self.num_windows[k])
        return self._perms[key]

    def window_index(self, k: int, j: int) -> tuple[int, int]:
        """(epoch, window) for the j-th sequence drawn from source k."""
        epoch, pos = divmod(int(j), self.num_windows[k])
        if epoch > 0 and k not in self._warned_epoch:
            self._warned_epoch.add(k)
            log.warning("source `%s` is exhausted and repeats (epoch %d): its %d windows are reused", self.sources[k].name, epoch + 1, self.num_windows[k])
        return epoch, int(self._permutation(k, epoch)[pos])

    # ---------------------------------------------------------------- batches
    def sequence_ids(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        per_rank = self.global_batch // world
        start = step * self.global_batch + rank * per_rank
        return np.arange(start, start + per_rank, dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Windows (per_rank, seq_len + 1) as int64, and the source id of each row."""
        src, within = self.assign(self.sequence_ids(step, rank, world))
        rows = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for i, (k, j) in enumerate(zip(src, within)):
            _, w = self.window_index(int(k), int(j))
            rows[i] = self.sources[k].shards.window("train", w, self.seq_len)
        return rows, src

    def epochs(self, sequences_seen: int) -> dict[str, float]:
        """Epochs of each source consumed after `sequences_seen` global sequences."""
        return {
            s.name: self.source_count(k, sequences_seen) / max(self.num_windows[k], 1)
            for k, s in enumerate(self.sources)
        }

    def tokens_per_source(self, sequences_seen: int) -> dict[str, int]:
        return {s.name: self.source_count(k, sequences_seen) * self.seq_len for k, s in enumerate(self.sources)}

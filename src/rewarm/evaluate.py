"""Held-out loss on labelled eval sets, on the same fixed windows every time.

An eval set is the first `eval_tokens` tokens of a prepared directory's `val.bin`, cut
into non-overlapping windows of seq_len + 1 (inputs / shifted targets). Loss is the mean
next-token cross-entropy over all scored tokens; perplexity = exp(loss).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from rewarm.data.shards import TokenShards
from rewarm.fused_loss import autocast, lm_loss

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # (n, seq_len + 1) int64
    coverage: dict = field(default_factory=dict)  # which part of the val split the windows cover

    @classmethod
    def from_shards(cls, name: str, shards: TokenShards, seq_len: int, eval_tokens: int) -> "EvalSet":
        """`eval_tokens // seq_len` windows spread evenly over the WHOLE val split: the val split
        keeps input order, so its first tokens would be one document of one source. Window i of n
        starts at token seq_len * floor(i * W / n) of the W non-overlapping windows the split holds:
        deterministic, the same for every run on the same data."""
        from rewarm.errors import UserError

        val = shards.split("val")
        total = max(len(val) - 1, 0) // seq_len  # non-overlapping windows in the split
        n = min(eval_tokens // seq_len, total)
        if n < 1:
            raise UserError(
                f"eval set `{name}` ({shards.path}) has {len(val)} validation tokens, fewer than one window of "
                f"{seq_len + 1}. Prepare it with a larger --val-fraction / --val-tokens, or lower train.seq_len."
            )
        if total * seq_len < eval_tokens:
            log.warning("eval set `%s` has only %d validation tokens; scoring %d windows (%d tokens)",
                        name, len(val), n, n * seq_len)
        picks = (np.arange(n, dtype=np.int64) * total) // n
        rows = np.stack([np.asarray(val[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in picks])
        return cls(name, torch.from_numpy(rows), _coverage(shards, val, picks, seq_len, total))

    @property
    def tokens(self) -> int:
        return self.windows.shape[0] * (self.windows.shape[1] - 1)


def _coverage(shards: TokenShards, val, picks: np.ndarray, seq_len: int, total: int) -> dict:
    """How many of the split's documents (EOS-separated) the chosen windows touch."""
    eos = shards.meta["tokenizer"].get("eos_token_id")
    out = {"windows": int(len(picks)), "of_windows": int(total), "stride_windows": round(total / max(len(picks), 1), 2)}
    if eos is None:
        return out
    ends = np.flatnonzero(np.asarray(val) == eos)  # document i ends at ends[i]
    docs = set()
    for i in picks:
        lo, hi = np.searchsorted(ends, [i * seq_len, i * seq_len + seq_len], side="left")
        docs.update(range(int(lo), int(hi) + 1))
    out.update(documents=len(docs), of_documents=int(len(ends)))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: list[EvalSet], batch_size: int = 8,
             device: torch.device | None = None, precision: str = "fp32", *,
             rank: int = 0, world: int = 1, reduce=None) -> dict[str, dict[str, float]]:
    """{name: {loss, ppl, tokens}} for each eval set; the model is put back in its previous mode.
    With world > 1 this rank scores windows rank, rank + world, ... and `reduce` sums
    [loss_sum, count] over ranks, so every rank returns the numbers of the whole set."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    for es in eval_sets:
        total, count = 0.0, 0
        mine = es.windows[rank::world]
        for i in range(0, mine.shape[0], batch_size):
            batch = mine[i : i + batch_size].to(device)
            with autocast(device, precision):
                total += lm_loss(model, batch, reduction="sum").item()
            count += batch.shape[0] * (batch.shape[1] - 1)
        if reduce is not None:
            total, count = reduce([total, float(count)])
            count = int(count)
        loss = total / count
        out[es.name] = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
    model.train(was_training)
    return out

"""Held-out loss on labelled eval sets, on the same fixed windows every time.

An eval set is the first `eval_tokens` tokens of a prepared directory's `val.bin`, cut
into non-overlapping windows of seq_len + 1 (inputs / shifted targets). Loss is the mean
next-token cross-entropy over all scored tokens; perplexity = exp(loss).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from rewarm.data.shards import TokenShards
from rewarm.fused_loss import autocast, lm_loss

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # (n, seq_len + 1) int64

    @classmethod
    def from_shards(cls, name: str, shards: TokenShards, seq_len: int, eval_tokens: int) -> "EvalSet":
        from rewarm.errors import UserError

        val = shards.split("val")
        n = min(eval_tokens, max(len(val) - 1, 0)) // seq_len
        if n < 1:
            raise UserError(
                f"eval set `{name}` ({shards.path}) has {len(val)} validation tokens, fewer than one window of "
                f"{seq_len + 1}. Prepare it with a larger --val-fraction / --val-tokens, or lower train.seq_len."
            )
        if len(val) - 1 < eval_tokens:
            log.warning("eval set `%s` has only %d validation tokens; scoring %d windows (%d tokens)",
                        name, len(val), n, n * seq_len)
        rows = np.lib.stride_tricks.sliding_window_view(np.asarray(val[: n * seq_len + 1], dtype=np.int64), seq_len + 1)[::seq_len]
        return cls(name, torch.from_numpy(np.ascontiguousarray(rows)))

    @property
    def tokens(self) -> int:
        return self.windows.shape[0] * (self.windows.shape[1] - 1)


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

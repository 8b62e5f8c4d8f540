"""Softmax attention over a local span: the sliding window of Liger attention (each token sees
itself and the previous `window − 1` tokens) and TransNormer's DiagAttention (each token sees the
earlier tokens of its own block of `block` tokens).

    o_t = Σ_{i ∈ N(t)} softmax_i(q_t·k_i / √d) v_i,
    N(t) = {i ≤ t : t − i < window}        (sliding)   or   {i ≤ t : ⌊i/B⌋ = ⌊t/B⌋}   (block)

The state carried between calls is the few keys/values a later token can still see and the
number of tokens seen so far (block boundaries are absolute positions), so it stays O(window).
Forms: `naive` (one masked T × T softmax), `recurrent` (token by token), `chunkwise` (queries in
chunks of C, each against the keys of its chunk and the span before it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Span:
    window: int | None = None  # sliding window (tokens, incl. the token itself)
    block: int | None = None   # block-diagonal blocks

    def __post_init__(self):
        if (self.window is None) == (self.block is None):
            raise ValueError("a local span is either a sliding window or blocks, not both")

    def allowed(self, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        """(len(pos_q), len(pos_k)) mask of which key positions each query position sees."""
        tq, tk = pos_q[..., :, None], pos_k[..., None, :]
        near = (tq - tk < self.window) if self.window else (tq // self.block == tk // self.block)
        return (tk <= tq) & near

    @property
    def reach(self) -> int:
        """How many earlier tokens a token can see at most."""
        return (self.window or self.block) - 1

    def kept(self, pos_k: torch.Tensor, seen: int) -> torch.Tensor:
        """Which cached keys a token at position `seen` or later can still see."""
        if self.window:
            return pos_k > seen - self.window
        return pos_k // self.block == seen // self.block


def _attend(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype) @ v


def naive(q, k, v, span: Span):
    pos = torch.arange(q.shape[-2], device=q.device)
    return _attend(q, k, v, span.allowed(pos, pos))


def empty_state(q, v):
    b, h, _, d = q.shape
    return (q.new_zeros(b, h, 0, d), v.new_zeros(b, h, 0, v.shape[-1]), 0)


def _trim(keys, values, seen, span):
    pos = torch.arange(seen - keys.shape[-2], seen, device=keys.device)
    keep = span.kept(pos, seen)
    return keys[..., keep, :], values[..., keep, :]


def recurrent(q, k, v, span: Span, state=None):
    keys, values, seen = state if state is not None else empty_state(q, v)
    out = []
    for t in range(q.shape[-2]):
        keys = torch.cat([keys, k[..., t : t + 1, :]], dim=-2)
        values = torch.cat([values, v[..., t : t + 1, :]], dim=-2)
        pos_k = torch.arange(seen + 1 - keys.shape[-2], seen + 1, device=q.device)
        mask = span.allowed(torch.tensor([seen], device=q.device), pos_k)
        out.append(_attend(q[..., t : t + 1, :], keys, values, mask))
        seen += 1
        keys, values = _trim(keys, values, seen, span)
    return torch.cat(out, dim=-2), (keys, values, seen)


def chunkwise(q, k, v, span: Span, state=None, chunk: int = 64):
    """All chunks at once: chunk n's queries against the keys of chunks n − 1 and n (a chunk is at
    least reach + 1 long, so that is every key they can see); masks by absolute position."""
    keys0, values0, seen = state if state is not None else empty_state(q, v)
    p, t = keys0.shape[-2], q.shape[-2]
    keys, values = torch.cat([keys0, k], dim=-2), torch.cat([values0, v], dim=-2)
    first = seen - p                                         # absolute position of keys[0]
    c = max(chunk, span.reach + 1)
    length = p + t
    pad = (-length) % c
    n = (length + pad) // c

    def chunks(x, lead=0):  # (…, time, d) → (…, n, c, d), zeros for the cached queries and the padding
        x = torch.cat([x.new_zeros(*x.shape[:-2], lead, x.shape[-1]), x, x.new_zeros(*x.shape[:-2], pad, x.shape[-1])], -2)
        return x.view(*x.shape[:-2], n, c, x.shape[-1])

    qc, kc, vc = chunks(q, lead=p), chunks(keys), chunks(values)
    before = lambda x: torch.cat([torch.zeros_like(x[..., :1, :, :]), x[..., :-1, :, :]], dim=-3)  # noqa: E731
    k_ext, v_ext = torch.cat([before(kc), kc], dim=-2), torch.cat([before(vc), vc], dim=-2)
    slot = torch.arange(n * c, device=q.device).view(n, c)
    pos_q = first + slot
    slot_k = torch.cat([slot - c, slot], dim=-1)             # (n, 2c) slots of the keys each chunk sees
    real_k = (slot_k >= 0) & (slot_k < length)
    pos_k = first + slot_k
    mask = span.allowed(pos_q, pos_k) & real_k[:, None, :]
    mask |= pos_q[..., :, None] == pos_k[..., None, :]       # padded rows see their own (zero) key: no empty softmax
    out = _attend(qc, k_ext, v_ext, mask).reshape(*q.shape[:-2], n * c, v.shape[-1])[..., p : p + t, :]
    seen += t
    keys, values = _trim(keys, values, seen, span)
    return out, (keys, values, seen)

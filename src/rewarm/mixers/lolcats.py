"""LoLCATs' hybrid attention (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large
Language Models"): exact softmax over the last W tokens, Hedgehog linear attention over every
token before them, one shared normaliser.

For query t, window keys N_w(t) = {i : 0 ≤ t − i < W}, linear keys N_l(t) = {i : t − i ≥ W}:
    m_t = max_{i∈N_w(t)} q_t·k_i/√d
    num = γ Σ_{i∈N_w} exp(q_t·k_i/√d − m_t) v_i + Σ_{i∈N_l} (φ(q_t)·φ(k_i)) v_i
    den = γ Σ_{i∈N_w} exp(q_t·k_i/√d − m_t)     + Σ_{i∈N_l} φ(q_t)·φ(k_i)
    o_t = num / den,    γ = sigmoid(w) per head, w = −2.197 at the start (γ = 0.1)
as in the LoLCATs code (`window_factors`, non-affine: the linear terms keep weight 1). With
W ≥ the sequence length there are no linear terms and o_t is exactly softmax attention — a
built-in check of a conversion. State: Σ_{i∈N_l} φ(k_i)[v_i, 1] plus the last W − 1 keys/values.

Forms: `naive` (T × T masks), `chunkwise` (queries in chunks of C against the keys of the chunk
and the window before it; older keys folded into the state), `recurrent` (the same with C = 1).
"""
from __future__ import annotations

import torch
from torch import nn

from rewarm.mixers.base import MixerBlock
from rewarm.mixers.feature_maps import FeatureMap

GAMMA_LOGIT = -2.1972245773362196  # sigmoid = 0.1


def _combine(q, k, fq, fk, v, window_mask, linear_mask, gamma, s=None, eps=1e-12, linear_weight=1.0):
    """One block of queries against one block of keys (+ the folded state `s`), masks (tq, tk)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~window_mask, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    soft = gamma * torch.exp(scores - m)                                   # 0 outside the window
    lin = (fq @ fk.transpose(-1, -2)).to(soft.dtype).masked_fill(~linear_mask, 0.0) * linear_weight
    weights = soft + lin
    num = weights @ v.to(soft.dtype)
    den = weights.sum(-1, keepdim=True)
    if s is not None and linear_weight:
        fs = fq.to(soft.dtype) @ s.to(soft.dtype)                          # (…, tq, d_v + 1)
        num, den = num + fs[..., :-1], den + fs[..., -1:]
    return (num / (den + eps)).to(v.dtype)


def naive(q, k, fq, fk, v, window: int, gamma, linear_weight=1.0):
    t = q.shape[-2]
    pos = torch.arange(t, device=q.device)
    dist = pos[:, None] - pos[None, :]
    return _combine(q, k, fq, fk, v, (dist >= 0) & (dist < window), dist >= window, gamma, linear_weight=linear_weight)


def chunkwise(q, k, fq, fk, v, window: int, gamma, state=None, chunk: int = 64, linear_weight=1.0):
    """Also the recurrent form with chunk = 1. state = (s, cached k, cached φ(k), cached v)."""
    b, h, t, _ = q.shape
    if state is None:
        s = fq.new_zeros(b, h, fq.shape[-1], v.shape[-1] + 1)
        keys, fkeys, values = k[..., :0, :], fk[..., :0, :], v[..., :0, :]
    else:
        s, keys, fkeys, values = state
    p = keys.shape[-2]                                                     # cached tokens come first
    keys, fkeys, values = (torch.cat([a, b_], dim=-2) for a, b_ in ((keys, k), (fkeys, fk), (values, v)))
    ones = values.new_ones(*values.shape[:-1], 1)

    def fold(s, lo, hi):  # add keys [lo, hi) to the linear state
        if hi <= lo:
            return s
        return s + fkeys[..., lo:hi, :].transpose(-1, -2).to(s.dtype) @ torch.cat([values, ones], -1)[..., lo:hi, :].to(s.dtype)

    folded, out = 0, []
    for a in range(p, p + t, chunk):
        e = min(a + chunk, p + t)
        s, folded = fold(s, folded, a - window + 1), max(folded, a - window + 1)   # linear for every query here
        pos_q = torch.arange(a, e, device=q.device)
        pos_k = torch.arange(folded, e, device=q.device)
        dist = pos_q[:, None] - pos_k[None, :]
        out.append(_combine(q[..., a - p : e - p, :], keys[..., folded:e, :], fq[..., a - p : e - p, :],
                            fkeys[..., folded:e, :], values[..., folded:e, :], (dist >= 0) & (dist < window),
                            dist >= window, gamma, s, linear_weight=linear_weight))
    end = p + t
    s, folded = fold(s, folded, end - window + 1), max(folded, end - window + 1)
    return torch.cat(out, dim=-2), (s, keys[..., folded:, :], fkeys[..., folded:, :], values[..., folded:, :])


class LolcatsAttention(MixerBlock):
    """Hybrid sliding-window softmax + Hedgehog linear attention (mixer name `lolcats`)."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.window = config.window
        self.feature_map = FeatureMap(config.feature_map or "hedgehog", self.num_heads, self.head_dim, config.feature_dim)
        self.window_factor = nn.Parameter(torch.full((1, self.num_heads, 1, 1), GAMMA_LOGIT))
        self.linear_weight = 1.0 if getattr(config, "linear_branch", True) else 0.0  # 0: window only (a diagnosis)

    def mix(self, q, k, v, x, state, form):
        gamma = torch.sigmoid(self.window_factor.to(torch.promote_types(self.window_factor.dtype, torch.float32)))
        fq, fk = self.feature_map(q), self.feature_map(k)
        if form == "naive":
            return naive(q, k, fq, fk, v, self.window, gamma, self.linear_weight), None
        chunk = 1 if form == "recurrent" else self.chunk_size
        return chunkwise(q, k, fq, fk, v, self.window, gamma, state=state, chunk=chunk, linear_weight=self.linear_weight)

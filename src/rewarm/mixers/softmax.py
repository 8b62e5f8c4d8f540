"""Softmax attention (the baseline every linear mixer is compared with and distilled from):

    o_t = Σ_{i≤t} softmax_i(q_t·k_i / √d) v_i

State: the key/value cache (grows by one entry per token, O(T) memory in generation).
Forms: `naive` (masked T × T softmax), `recurrent` (one query at a time against the cache),
`chunkwise` (torch's scaled_dot_product_attention over the whole block, with the cache in front).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewarm.mixers.base import MixerBlock


class SoftmaxAttention(MixerBlock):
    def mix(self, q, k, v, x, state, form):
        t = q.shape[-2]
        if state is not None:
            k = torch.cat([state[0], k], dim=-2)
            v = torch.cat([state[1], v], dim=-2)
        past = k.shape[-2] - t
        if form == "recurrent":
            out = torch.cat([F.scaled_dot_product_attention(q[..., i : i + 1, :], k[..., : past + i + 1, :],
                                                            v[..., : past + i + 1, :]) for i in range(t)], dim=-2)
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(past)
            if form == "naive":
                scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
                scores = scores.masked_fill(~mask, float("-inf"))
                out = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype) @ v
            elif past == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out, (k, v)

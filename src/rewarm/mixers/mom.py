"""Mixture-of-Memories (Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories"):
several independent delta-rule memories; a router sends each token to k of them, so unrelated
associations do not overwrite each other in one state.

    p_t = softmax(x_t W_r)  over M memories;   top-k (k = 2) of p_t, renormalised: w_t^m
    memory m (own W_k^m, W_v^m, w_β^m; shared W_q):
        S_t^m = S_{t−1}^m (I − β_t^m k_t^m k_t^mᵀ) + β_t^m v_t^m k_t^mᵀ   if m is among t's top-k,
        S_t^m = S_{t−1}^m                                              otherwise (β = 0)
    plus one shared memory S^0 that every token writes to (Llama-named k_proj / v_proj);
    o_t = RMSNorm( S_t^0 q_t + Σ_m w_t^m S_t^m q_t )
    load balance: L_aux = M · Σ_m f_m P_m  (f_m: share of the top-k slots routed to m,
    P_m: mean router probability), added to the loss × `aux_loss_coef` (0.01) and logged.
q, k are SiLU-activated and L2-normalised as in DeltaNet; no rotary embedding, no conv.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rewarm.mixers import delta, fla_backend
from rewarm.mixers.base import HeadRMSNorm, MixerBlock


class MixtureOfMemories(MixerBlock):
    uses_rope = False

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        h, d, m = config.hidden_size, self.head_dim, config.num_memories
        self.num_memories, self.top_k = m, config.memory_top_k
        if not 1 <= self.top_k <= m:
            raise ValueError(f"memory_top_k must be between 1 and num_memories ({m}), got {self.top_k}")
        self.router = nn.Linear(h, m, bias=False)
        self.k_mem = nn.Linear(h, m * self.num_kv_heads * d, bias=False)
        self.v_mem = nn.Linear(h, m * self.num_kv_heads * d, bias=False)
        self.b_proj = nn.Linear(h, (m + 1) * self.num_heads, bias=False)
        self.o_norm = HeadRMSNorm(d, config.rms_norm_eps)
        self.aux_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor):
        """(weights (batch, M, time) with zeros outside the top-k, mask of the top-k, probabilities)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)                    # (b, t, M)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        return weights.transpose(1, 2).to(x.dtype), chosen.transpose(1, 2).to(x.dtype), probs

    def heads_out(self, x, rope=None, state=None, form=None):
        form = self.choose_form(x.shape[1], form)
        if form == "naive" and state is not None:
            raise ValueError("the naive form is the definition over one whole sequence: it carries no state")
        b, t, _ = x.shape
        m, h, d = self.num_memories, self.num_heads, self.head_dim
        weights, chosen, probs = self.route(x)
        self.aux_loss = m * ((chosen.mean(dim=(0, 2)) / self.top_k) * probs.mean(dim=(0, 1))).sum()
        q = F.normalize(F.silu(self.heads(self.q_proj(x), h)), dim=-1)
        keys = torch.cat([self.k_proj(x), self.k_mem(x)], dim=-1)              # shared memory first
        values = torch.cat([self.v_proj(x), self.v_mem(x)], dim=-1)
        k = F.normalize(F.silu(keys.view(b, t, m + 1, self.num_kv_heads, d)), dim=-1)
        v = F.silu(values.view(b, t, m + 1, self.num_kv_heads, d))
        group = h // self.num_kv_heads
        k, v = (z.permute(0, 2, 3, 1, 4).repeat_interleave(group, dim=2).reshape(b, (m + 1) * h, t, d) for z in (k, v))
        writes = torch.cat([torch.ones_like(chosen[:, :1]), chosen], dim=1)     # (b, M+1, t): who writes where
        beta = torch.sigmoid(self.b_proj(x)).view(b, t, m + 1, h).permute(0, 2, 3, 1) * writes[:, :, None]
        beta = beta.reshape(b, (m + 1) * h, t)
        qm = q.repeat(1, m + 1, 1, 1)
        if form == "naive":
            out, state = delta.naive(qm, k, v, beta), None
        else:
            kernel = delta.recurrent if form == "recurrent" else functools.partial(fla_backend.delta_chunkwise, self)
            out, state = kernel(qm, k, v, beta, state=state)
        reads = torch.cat([torch.ones_like(weights[:, :1]), weights], dim=1)     # shared memory read with weight 1
        out = (out.view(b, m + 1, h, t, d) * reads[:, :, None, :, None]).sum(dim=1)
        return self.o_norm(out), state

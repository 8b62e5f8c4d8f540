"""DeltaNet (Schlag et al. 2021; Yang et al. 2024): linear attention whose state is corrected by
the delta rule instead of only accumulated (see `delta` for the update and its chunkwise form).

    q_t, k_t = L2norm(SiLU(conv4(x W_q))), L2norm(SiLU(conv4(x W_k))),  v_t = SiLU(conv4(x W_v))
    β_t = sigmoid(x_t w_β)                     (one per head)
    S_t = S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   o_t = RMSNorm(S_t q_t)

conv4 is a causal depthwise convolution over the last 4 tokens (a short local mixer in front of
the recurrence); no rotary embedding. State: S (d × d per head) and the last 3 inputs of each conv.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rewarm.mixers import delta, fla_backend
from rewarm.mixers.base import HeadRMSNorm, MixerBlock


class ShortConv(nn.Module):
    """Causal depthwise conv1d over (batch, time, channels); the state is the last kernel − 1 inputs."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        past = state if state is not None else x.new_zeros(x.shape[0], self.kernel - 1, x.shape[-1])
        full = torch.cat([past, x], dim=1)
        out = self.conv(full.transpose(1, 2)).transpose(1, 2)
        return out, full[:, -(self.kernel - 1):]


class DeltaNet(MixerBlock):
    uses_rope = False

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        h, d = config.hidden_size, self.head_dim
        self.b_proj = nn.Linear(h, self.num_heads, bias=False)
        self.q_conv = ShortConv(self.num_heads * d, config.conv_size)
        self.k_conv = ShortConv(self.num_kv_heads * d, config.conv_size)
        self.v_conv = ShortConv(self.num_kv_heads * d, config.conv_size)
        self.o_norm = HeadRMSNorm(d, config.rms_norm_eps)

    def heads_out(self, x, rope=None, state=None, form=None):
        form = self.choose_form(x.shape[1], form)
        s, cq, ck, cv = state if state is not None else (None, None, None, None)
        q, cq = self.q_conv(self.q_proj(x), cq)
        k, ck = self.k_conv(self.k_proj(x), ck)
        v, cv = self.v_conv(self.v_proj(x), cv)
        q = F.normalize(F.silu(self.heads(q, self.num_heads)), dim=-1)
        k = self.expand_kv(F.normalize(F.silu(self.heads(k, self.num_kv_heads)), dim=-1))
        v = self.expand_kv(F.silu(self.heads(v, self.num_kv_heads)))
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)           # (batch, heads, time)
        if form == "naive":
            if state is not None:
                raise ValueError("the naive form is the definition over one whole sequence: it carries no state")
            out, s = delta.naive(q, k, v, beta), None
        else:
            kernel = delta.recurrent if form == "recurrent" else functools.partial(fla_backend.delta_chunkwise, self)
            out, s = kernel(q, k, v, beta, state=s)
        return self.o_norm(out), (s, cq, ck, cv)

"""Liger (Lan et al. 2025, "Liger: Linearizing Large Language Models to Gated Recurrent
Structures"): a gated recurrence whose gate comes from the keys, so no new parameters are needed,
mixed half and half with sliding-window softmax attention.

Gated recurrence (per head; φ = softmax over the head dimension by default):
    g_t = mean_j k_{t,j},   log α_t = logsigmoid(g_t) / τ   (τ = 16)
    S_t = α_t S_{t−1} + φ(k_t) v_tᵀ,   o_t = φ(q_t)ᵀ S_t
Liger attention:
    o_t = 0.5 · SWA_64(q, k, v)_t + 0.5 · (gated recurrence)_t
(with the linear branch switched off for a diagnosis, o_t = SWA_64 alone).
State: S (d × d_v per head) plus the last window − 1 keys/values of the sliding window.
"""
from __future__ import annotations

import torch.nn.functional as F

from rewarm.mixers import fla_backend, local, scan
from rewarm.mixers.base import MixerBlock
from rewarm.mixers.feature_maps import FeatureMap

_LOCAL = {"naive": local.naive, "recurrent": local.recurrent, "chunkwise": local.chunkwise}


class GatedLinearAttention(MixerBlock):
    """The gated recurrence alone (mixer name `gla`)."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.tau = config.gate_temperature
        self.feature_map = FeatureMap(config.feature_map or "softmax_head", self.num_heads, self.head_dim,
                                      config.feature_dim)

    def gated(self, q, k, v, state, form):
        log_decay = F.logsigmoid(k.mean(dim=-1)) / self.tau
        fq, fk = self.feature_map(q), self.feature_map(k)
        if form == "naive":
            return scan.naive(fq, fk, v, log_decay), None
        if form == "recurrent":
            return scan.recurrent(fq, fk, v, log_decay, state=state)
        return fla_backend.scan_chunkwise(self, fq, fk, v, log_decay, state=state)

    def mix(self, q, k, v, x, state, form):
        return self.gated(q, k, v, state, form)


class LigerAttention(GatedLinearAttention):
    """0.5 · sliding-window softmax + 0.5 · gated recurrence (mixer name `liger`)."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.span = local.Span(window=config.window)
        # 0: the sliding window alone (`rewarm linearize` reports that loss: is the recurrence used?)
        self.linear_weight = 1.0 if getattr(config, "linear_branch", True) else 0.0

    def mix(self, q, k, v, x, state, form):
        s_gate, s_win = state if state is not None else (None, None)
        gated, s_gate = self.gated(q, k, v, s_gate, form)
        if form == "naive":
            window, s_win = local.naive(q, k, v, self.span), None
        else:
            extra = {"chunk": self.chunk_size} if form == "chunkwise" else {}
            window, s_win = _LOCAL[form](q, k, v, self.span, state=s_win, **extra)
        mix = 0.5 * self.linear_weight
        return (1.0 - mix) * window + mix * gated, (s_gate, s_win)

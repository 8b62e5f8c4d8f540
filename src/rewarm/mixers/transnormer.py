"""TransNormer (Qin et al. 2022, "The Devil in Linear Transformer"): linear attention without the
denominator that makes gradients unbounded, normalised after the product instead; softmax
attention inside local blocks for the lower layers, where attention is local anyway.

NormAttention (mixer `norm_attention`; φ = elu + 1):
    o_t = RMSNorm( Σ_{i≤t} (φ(q_t)·φ(k_i)) v_i )          (causal; RMSNorm per head)
DiagAttention (mixer `diag_attention`): softmax attention within blocks of 64 tokens,
    o_t = Σ_{i ≤ t, ⌊i/64⌋ = ⌊t/64⌋} softmax_i(q_t·k_i / √d) v_i
The model pattern `transnormer` uses DiagAttention in the lower half of the layers and
NormAttention in the upper half, as the paper does.
"""
from __future__ import annotations

from rewarm.mixers import fla_backend, local, scan
from rewarm.mixers.base import HeadRMSNorm, MixerBlock
from rewarm.mixers.feature_maps import FeatureMap


class NormAttention(MixerBlock):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.feature_map = FeatureMap(config.feature_map or "elu+1", self.num_heads, self.head_dim, config.feature_dim)
        self.o_norm = HeadRMSNorm(self.head_dim, config.rms_norm_eps)

    def mix(self, q, k, v, x, state, form):
        fq, fk = self.feature_map(q), self.feature_map(k)
        if form == "naive":
            out, state = scan.naive(fq, fk, v), None
        elif form == "recurrent":
            out, state = scan.recurrent(fq, fk, v, state=state)
        else:
            out, state = fla_backend.scan_chunkwise(self, fq, fk, v, state=state)
        return self.o_norm(out), state


class DiagAttention(MixerBlock):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.span = local.Span(block=config.block_size)

    def mix(self, q, k, v, x, state, form):
        if form == "naive":
            return local.naive(q, k, v, self.span), None
        if form == "recurrent":
            return local.recurrent(q, k, v, self.span, state=state)
        return local.chunkwise(q, k, v, self.span, state=state, chunk=self.span.block)

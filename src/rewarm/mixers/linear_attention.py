"""Linear attention with a feature map (Katharopoulos et al. 2020; Hedgehog, Zhang et al. 2024):

    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + ε),   S_t = Σ_{i≤t} φ(k_i) v_iᵀ,   z_t = Σ_{i≤t} φ(k_i)

φ is applied after the rotary embedding (as LoLCATs does), one of `feature_maps.NAMES`
(`hedgehog` by default: learnable, initialised to the identity projection). State: S and z,
(d' × (d_v + 1)) per head whatever the context length.
"""
from __future__ import annotations

import functools

from rewarm.mixers import fla_backend, scan
from rewarm.mixers.base import MixerBlock
from rewarm.mixers.feature_maps import FeatureMap


class LinearAttention(MixerBlock):
    default_feature_map = "hedgehog"

    def __init__(self, config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.eps = config.linear_eps
        self.feature_map = FeatureMap(config.feature_map or self.default_feature_map, self.num_heads,
                                      self.head_dim, config.feature_dim)

    def mix(self, q, k, v, x, state, form):
        fq, fk = self.feature_map(q), self.feature_map(k)
        kernel = {"naive": scan.naive, "recurrent": scan.recurrent,
                  "chunkwise": functools.partial(fla_backend.scan_chunkwise, self)}[form]
        return scan.normalised(kernel, fq, fk, v, eps=self.eps, state=state)

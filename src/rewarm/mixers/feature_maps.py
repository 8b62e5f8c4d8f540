"""Feature maps φ for linear attention: softmax(q kᵀ) is replaced by φ(q) φ(k)ᵀ.

- `elu+1` (Katharopoulos et al. 2020): φ(x) = elu(x) + 1, positive everywhere.
- `relu`: φ(x) = max(x, 0) (zero rows are possible: the normaliser's ε then matters).
- `softmax_head` (Liger, Lan et al. 2025): φ(x) = softmax(x) over the head dimension; no parameters.
- `hedgehog` (Zhang et al. 2024): φ(x) = [softmax(xW + b), softmax(−(xW + b))] with a learnable
  d × d' projection per head (W = identity, b = 0 at the start, d' = head dim by default), so the
  output has 2d' features; trained to mimic softmax attention's spikiness and monotonicity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("elu+1", "relu", "softmax_head", "hedgehog")


class FeatureMap(nn.Module):
    """φ applied to (batch, heads, time, head_dim) → (batch, heads, time, out_dim)."""

    def __init__(self, name: str, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        if name not in NAMES:
            raise ValueError(f"unknown feature map `{name}`; choose one of {', '.join(NAMES)}")
        self.name = name
        self.out_dim = head_dim
        if name == "hedgehog":
            d = feature_dim or head_dim
            self.weight = nn.Parameter(torch.eye(head_dim, d).repeat(num_heads, 1, 1))  # (heads, d, d')
            self.bias = nn.Parameter(torch.zeros(num_heads, 1, d))
            self.out_dim = 2 * d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "elu+1":
            return F.elu(x) + 1
        if self.name == "relu":
            return F.relu(x)
        if self.name == "softmax_head":
            return torch.softmax(x, dim=-1)
        z = torch.einsum("bhtd,hdf->bhtf", x, self.weight) + self.bias
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)

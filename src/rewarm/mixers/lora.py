"""Low-rank adapters (Hu et al. 2021) on a model's linear layers, merged away at the end:

    y = x Wᵀ + (α / r) · x Aᵀ Bᵀ,   A: r × d_in (small normal), B: d_out × r (zeros)

so a freshly adapted layer computes exactly what it did before. The adapter lives on the layer
itself (`q_proj.lora_A`, `q_proj.lora_B`), so weight names stay those of the base model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        super().__init__(in_features, out_features, bias=bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.reset_lora()

    def reset_lora(self) -> None:
        with torch.no_grad():
            self.lora_A.normal_(0.0, 1.0 / math.sqrt(self.in_features))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (α/r) B A: the same function, no adapter."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + (self.lora_B @ self.lora_A) * self.scale)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def linear(config, name: str, d_in: int, d_out: int, bias: bool) -> nn.Linear:
    """The layer `name` of a block: with an adapter when the config asks for one on it."""
    if getattr(config, "lora_rank", 0) and name in (config.lora_targets or ()):
        return LoRALinear(d_in, d_out, bias, config.lora_rank, config.lora_alpha)
    return nn.Linear(d_in, d_out, bias=bias)


def merge_all(model: nn.Module) -> int:
    """Replace every LoRALinear in `model` by its merged nn.Linear; returns how many."""
    found = [(parent, child_name, child) for parent in model.modules()
             for child_name, child in parent.named_children() if isinstance(child, LoRALinear)]
    for parent, child_name, child in found:
        setattr(parent, child_name, child.merged())
    return len(found)

"""The recipes `rewarm linearize` knows: which mixer replaces softmax attention, whether stage 1
(attention transfer) runs and with which loss, and stage 2's adapters and learning rate.

- lolcats (Zhang et al. 2024): Hedgehog linear attention (d′ = 64 per head, after RoPE); stage 1
  MSE between per-head attention outputs × 1000, feature maps only, LR 1e-2; stage 2 LoRA r 8,
  α 16 on q, k, v, o, LR 1e-4. `lolcats_hybrid`: the same with LoLCATs' sliding-window hybrid.
- hedgehog (Zhang et al. 2024): the same map and stages; stage 1 is the cross-entropy between the
  teacher's softmax weights and the linear attention's normalised weights.
- liger (Lan et al. 2025): no new parameters (softmax-over-head feature map, gate pooled from the
  keys, 0.5 sliding window + 0.5 gated recurrence); stage 2 only: LoRA r 8 on q, k, v, LR 1e-3.
- deltanet / transnormer / mom: other targets from rewarm.mixers with the LoLCATs stages (their new
  parameters trained in stage 1; q/k/v/o come from the teacher).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    mixer: str
    transfer_loss: str | None = "mse"      # None: no stage 1
    stage1_lr: float = 1e-2
    stage2_lr: float = 1e-4
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    mixer_options: dict = field(default_factory=dict)
    hybrid: bool = False                   # has a linear branch worth zeroing in the report


RECIPES = {
    "lolcats": Recipe("hedgehog", mixer_options={"feature_dim": 64}),
    "lolcats_hybrid": Recipe("lolcats", mixer_options={"feature_dim": 64}, hybrid=True),
    "hedgehog": Recipe("hedgehog", transfer_loss="attention_ce", mixer_options={"feature_dim": 64}),
    "liger": Recipe("liger", transfer_loss=None, stage2_lr=1e-3, lora_targets=("q_proj", "k_proj", "v_proj"),
                    hybrid=True),
    "deltanet": Recipe("deltanet"),
    "transnormer": Recipe("transnormer"),
    "mom": Recipe("mom"),
}

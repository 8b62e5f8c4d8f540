"""Where a seed architecture keeps what upcycling replaces: each decoder layer's attention and FFN,
and how its attention weights split into per-head Q, K, V and the output projection.

GPT-NeoX fuses Q, K and V into one `query_key_value` matrix laid out head by head ([q k v] of head
0, then head 1, ...), with biases; Llama keeps q/k/v/o_proj apart, with grouped-query attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionParts:
    """One attention block as plain tensors: q (H·d, h), k and v (H_kv·d, h), o (h, H·d), biases or None."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None


@dataclass(frozen=True)
class Family:
    name: str
    attention: str  # the attribute of a decoder layer
    mlp: str
    embeddings: str  # the backbone's input embedding (tied to the head when the seed ties them)

    def heads(self, cfg) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        h = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or h
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h
        return h, kv, d

    def split(self, attn: nn.Module, cfg) -> AttentionParts:
        h, _, d = self.heads(cfg)
        if self.name == "gpt_neox":
            w = attn.query_key_value.weight.detach().view(h, 3, d, -1)
            b = attn.query_key_value.bias
            b = b.detach().view(h, 3, d) if b is not None else None
            part = lambda i: w[:, i].reshape(h * d, -1)  # noqa: E731
            bpart = lambda i: b[:, i].reshape(h * d) if b is not None else None  # noqa: E731
            dense = attn.dense
            return AttentionParts(part(0), part(1), part(2), dense.weight.detach(), bpart(0), bpart(1), bpart(2),
                                  dense.bias.detach() if dense.bias is not None else None)
        bias = lambda lin: lin.bias.detach() if lin.bias is not None else None  # noqa: E731
        return AttentionParts(attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(),
                              attn.o_proj.weight.detach(), bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj),
                              bias(attn.o_proj))


FAMILIES = {
    "gpt_neox": Family("gpt_neox", attention="attention", mlp="mlp", embeddings="embed_in"),
    "llama": Family("llama", attention="self_attn", mlp="mlp", embeddings="embed_tokens"),
}


def family_of(cfg) -> Family:
    from rewarm.errors import UserError

    family = FAMILIES.get(getattr(cfg, "model_type", None))
    if family is None:
        raise UserError(f"upcycling supports GPT-NeoX and Llama seeds, not `{getattr(cfg, 'model_type', None)}`.")
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "layer_types", None) and \
            any(t != "full_attention" for t in cfg.layer_types):
        raise UserError("upcycling does not support sliding-window attention layers yet.")
    return family

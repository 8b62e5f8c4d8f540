"""BAM's mixture of attention: every branch's attention runs, each token mixes their outputs with
its own softmax router weights (soft routing — no token is dropped, no load balancing needed).

    MoA(x)_t = Σ_e r_e(x_t) · O_e · Attn(Q_e x, K_e x, V_e x)_t,   r(x_t) = softmax(W_r x_t)

The experts are stacked as extra heads of one attention call: N experts of H query heads each are
N·H heads, so one kernel, one KV cache entry per layer. With KV sharing (BAM's cheaper variant) keys
and values come from one projection (the branches' average) and only Q_e, O_e are per expert: that
is grouped-query attention with N times more query heads per key/value head.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (GPT-NeoX's partial rotary; Llama's is all)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    return torch.cat(((rot * cos) + (_rotate_half(rot) * sin), rest), dim=-1)


class MixtureOfAttention(nn.Module):
    def __init__(self, config, layer_idx: int, *, experts: int, heads: int, kv_heads: int, head_dim: int,
                 hidden_size: int, qkv_bias: bool, o_bias: bool, kv_shared: bool):
        super().__init__()
        self.config = config  # the seed's config: its attention implementation (sdpa, eager, ...)
        self.layer_idx = layer_idx
        self.experts, self.heads, self.kv_heads, self.head_dim = experts, heads, kv_heads, head_dim
        self.kv_shared = kv_shared
        kv_sets = 1 if kv_shared else experts
        self.q_proj = nn.Linear(hidden_size, experts * heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_sets * kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_sets * kv_heads * head_dim, bias=qkv_bias)
        self.o_weight = nn.Parameter(torch.empty(experts, hidden_size, heads * head_dim))
        self.o_bias = nn.Parameter(torch.zeros(experts * hidden_size)) if o_bias else None  # 1-D: no weight decay
        self.router = nn.Linear(hidden_size, experts, bias=False)
        self.num_key_value_groups = (experts * heads) // (kv_sets * kv_heads)  # read by HF's attention functions
        self.scaling = head_dim ** -0.5
        self.is_causal = True
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.record_routing = False  # eval: accumulate the router's mean weights (rewarm.moe.specialisation)
        self.routing_sum: torch.Tensor | None = None
        self.routing_tokens = 0

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
        b, t, _ = hidden_states.shape
        n, h, g, d = self.experts, self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(hidden_states).view(b, t, n * h, d).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, d).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("layer_past")))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_shared:  # query heads in (kv head, expert, head-in-group) order: each kv head's group is contiguous
            q = q.view(b, n, g, h // g, t, d).transpose(1, 2).reshape(b, n * h, t, d)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager)
        out, _ = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                        dropout=self.attention_dropout if self.training else 0.0)  # (b, t, heads, d)
        if self.kv_shared:
            out = out.reshape(b, t, g, n, h // g, d).transpose(2, 3)
        out = out.reshape(b, t, n, h * d)
        y = torch.einsum("btnf,nof->btno", out, self.o_weight.to(out.dtype))
        if self.o_bias is not None:
            y = y + self.o_bias.view(n, -1).to(y.dtype)
        r = self.router(hidden_states).float().softmax(dim=-1)
        if self.record_routing and not self.training:
            total = r.detach().reshape(-1, n).sum(0)
            self.routing_sum = total if self.routing_sum is None else self.routing_sum + total
            self.routing_tokens += b * t
        return (y * r.to(y.dtype).unsqueeze(-1)).sum(dim=2), None


def _eager(module, q, k, v, mask, scaling, dropout=0.0, **kwargs):
    """Plain attention for `attn_implementation: eager` (and anything HF's registry does not know)."""
    if module.num_key_value_groups > 1:
        k = k.repeat_interleave(module.num_key_value_groups, dim=1)
        v = v.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask[:, :, :, : k.shape[-2]]
    else:
        t, s = q.shape[-2], k.shape[-2]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs

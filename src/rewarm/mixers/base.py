"""What every mixer block shares: Llama-named projections (q_proj, k_proj, v_proj, o_proj, so a
Llama attention's weights load into any mixer), grouped-query heads, rotary embeddings exactly
as Llama applies them, and the choice of form.

A block maps hidden states (batch, time, hidden) and an optional carried state to outputs of the
same shape and the new state. `form` is "naive", "recurrent" or "chunkwise"; left as None, a
block uses the recurrent form for one new token (generation) and the chunkwise form otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rewarm.mixers import lora

FORMS = ("naive", "recurrent", "chunkwise")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """x (batch, heads, time, head_dim) rotated by (cos, sin) of shape (time, head_dim)."""
    if rope is None:
        return x
    cos, sin = rope
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    """Llama's rotary tables: frequencies θ^(−2i/d), each used for both halves of the head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's output (x: batch, heads, time, head_dim), one weight per channel."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class MixerBlock(nn.Module):
    """Projections and head bookkeeping; subclasses implement `mix(q, k, v, x, state, form)`."""

    uses_rope = True

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.chunk_size = config.chunk_size
        self.form: str | None = None
        self.backend = getattr(config, "backend", "auto")
        h, d = config.hidden_size, self.head_dim
        bias = config.attention_bias
        self.q_proj = lora.linear(config, "q_proj", h, self.num_heads * d, bias)
        self.k_proj = lora.linear(config, "k_proj", h, self.num_kv_heads * d, bias)
        self.v_proj = lora.linear(config, "v_proj", h, self.num_kv_heads * d, bias)
        self.o_proj = lora.linear(config, "o_proj", self.num_heads * d, h, bias)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention: each key/value head serves num_heads / num_kv_heads query heads."""
        return x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)

    def choose_form(self, t: int, form: str | None) -> str:
        form = form or self.form or ("recurrent" if t == 1 else "chunkwise")
        if form not in FORMS:
            raise ValueError(f"unknown form `{form}`; choose one of {', '.join(FORMS)}")
        return form

    def project(self, x: torch.Tensor, rope):
        q = self.heads(self.q_proj(x), self.num_heads)
        k = self.heads(self.k_proj(x), self.num_kv_heads)
        v = self.heads(self.v_proj(x), self.num_kv_heads)
        if self.uses_rope:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, self.expand_kv(k), self.expand_kv(v)

    def heads_out(self, x: torch.Tensor, rope=None, state=None, form: str | None = None):
        """Each head's output before the output projection (batch, heads, time, head_dim), and the state."""
        form = self.choose_form(x.shape[1], form)
        if form == "naive" and state is not None:
            raise ValueError("the naive form is the definition over one whole sequence: it carries no state")
        q, k, v = self.project(x, rope)
        return self.mix(q, k, v, x, state, form)

    def teacher_heads(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        """Causal softmax attention of this block's own q/k/v projections with RoPE: what the
        Transformer these projections came from computes (the target of attention transfer)."""
        q = apply_rope(self.heads(self.q_proj(x), self.num_heads), rope)
        k = self.expand_kv(apply_rope(self.heads(self.k_proj(x), self.num_kv_heads), rope))
        v = self.expand_kv(self.heads(self.v_proj(x), self.num_kv_heads))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, rope=None, state=None, form: str | None = None):
        out, state = self.heads_out(x, rope, state, form)
        return self.merge_heads(out), state

    def mix(self, q, k, v, x, state, form):  # pragma: no cover - abstract
        raise NotImplementedError

"""The delta rule (Schlag et al. 2021; chunkwise form: Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"): the state is corrected towards v_t
instead of only accumulating, so old associations of k_t are overwritten.

    S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ      (S: d_k × d_v per head, β_t ∈ (0, 1))
    o_t = S_tᵀ q_t

Unrolled from a state S_0: S_t = S_0 + Σ_{i≤t} k_i u_iᵀ with u_t = β_t (v_t − S_{t−1}ᵀ k_t), so
    (I + tril(diag(β) K Kᵀ, −1)) U = diag(β) (V − K S_0)
and with the WY representation T = (I + tril(diag(β) K Kᵀ, −1))⁻¹ diag(β), W = T K, U₀ = T V:
    U = U₀ − W S_0,   O = Q S_0 + (Q Kᵀ ⊙ M) U   (M: causal mask incl. the diagonal),
    S_C = S_0 + Kᵀ U.
Forms (tensors (batch, heads, time, dim), β (batch, heads, time)):
- `naive`: the WY solve over the whole sequence at once (quadratic; the reference),
- `recurrent`: the update token by token (O(1) state; generation),
- `chunkwise`: the WY solve inside chunks of C, the state between them (training).
"""
from __future__ import annotations

import torch

from rewarm.mixers.scan import _pad_to_chunks, initial_state


def _wy(k, v, beta):
    """(W, U₀) = (T K, T V) for one block of tokens (the last two dims are time × dim). The solve
    runs in fp32 whatever the inputs (torch has no bf16 triangular solve on CPU, and an inverse
    of I + tril(βKKᵀ) in bf16 loses the state's precision); the results come back in k's dtype."""
    t, dtype = k.shape[-2], k.dtype
    work = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    with torch.autocast(k.device.type, enabled=False):
        k32, v32, b32 = k.to(work), v.to(work), beta.to(work)
        eye = torch.eye(t, dtype=work, device=k.device)
        strict = torch.ones(t, t, dtype=torch.bool, device=k.device).tril(-1)
        a = (b32[..., :, None] * (k32 @ k32.transpose(-1, -2))).masked_fill(~strict, 0.0)
        rhs = torch.cat([k32, v32], dim=-1) * b32[..., :, None]        # diag(β) [K V]
        wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    return wu[..., : k.shape[-1]].to(dtype), wu[..., k.shape[-1]:].to(dtype)


def naive(q, k, v, beta):
    t = q.shape[-2]
    _, u = _wy(k, v, beta)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0) @ u


def recurrent(q, k, v, beta, state=None):
    s = initial_state(q, v, state)
    out = []
    for t in range(q.shape[-2]):
        kt, vt, bt = k[..., t, :], v[..., t, :], beta[..., t, None]
        u = bt * (vt - (kt[..., None, :] @ s).squeeze(-2))      # β_t (v_t − S_{t−1}ᵀ k_t)
        s = s + kt[..., :, None] * u[..., None, :]
        out.append((q[..., t, None, :] @ s).squeeze(-2))
    return torch.stack(out, dim=-2), s


def chunkwise(q, k, v, beta, state=None, chunk: int = 64):
    b, h, t, _ = q.shape
    dv = v.shape[-1]
    s = initial_state(q, v, state)
    q, k, v = (_pad_to_chunks(x, chunk).reshape(b, h, -1, chunk, x.shape[-1]) for x in (q, k, v))
    beta = _pad_to_chunks(beta, chunk, dim=-1).reshape(b, h, -1, chunk)  # β = 0 on padding: no write
    w, u0 = _wy(k, v, beta)                                      # every chunk at once
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    attn = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    out = []
    # sequential over chunks only; unbind (one gradient stack) rather than indexing chunk by chunk
    for u0_i, w_i, q_i, a_i, k_i in zip(u0.unbind(2), w.unbind(2), q.unbind(2), attn.unbind(2), k.unbind(2)):
        u = u0_i - w_i @ s
        out.append(q_i @ s + a_i @ u)
        s = s + k_i.transpose(-1, -2) @ u
    return torch.cat(out, dim=2)[:, :, :t].reshape(b, h, t, dv), s

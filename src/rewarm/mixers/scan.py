"""Linear attention with an optional scalar decay per head and token: the kernel behind
Katharopoulos/Hedgehog linear attention, Liger's gated recurrence and TransNormer's NormAttention.

    S_t = α_t S_{t-1} + k_t v_tᵀ          (S: d_k × d_v per head; α_t = 1 without decay)
    o_t = S_tᵀ q_t = Σ_{i≤t} (Π_{i<s≤t} α_s) (q_t·k_i) v_i

Three forms of the same function, all over tensors shaped (batch, heads, time, dim) with the
decay given as log α (batch, heads, time):
- `naive`: the definition as one masked T × T product (quadratic; the reference);
- `recurrent`: token by token with an O(1) state (what generation uses);
- `chunkwise`: chunks of C tokens: exact attention inside a chunk, the state between chunks
  (what training uses: O(T·C) work, T/C sequential steps).
`recurrent` and `chunkwise` take and return the state, so a long sequence can be fed in pieces.
A normaliser (Katharopoulos' denominator φ(q)ᵀ z_t) is the same sum with v = 1: callers append
a column of ones to v (see `normalised`).
"""
from __future__ import annotations

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums of log-decays lose digits in bf16; fp64 stays fp64 (the gradient tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _decay_matrix(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(Σ_{i<s≤t} log α_s) for t ≥ i, 0 above the diagonal: (..., T, T)."""
    c = _at_least_fp32(log_decay).cumsum(-1)
    t = c.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=c.device).tril()
    diff = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf"))
    return diff.exp()


def naive(q, k, v, log_decay=None):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2)
    if log_decay is None:
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, 0.0)
    else:
        scores = scores * _decay_matrix(log_decay).to(scores.dtype)
    return scores @ v


def initial_state(q, v, state=None):
    if state is not None:
        return state
    b, h, _, dk = q.shape
    return q.new_zeros(b, h, dk, v.shape[-1])


def recurrent(q, k, v, log_decay=None, state=None):
    s = initial_state(q, v, state)
    out = []
    for t in range(q.shape[-2]):
        if log_decay is not None:
            s = s * log_decay[..., t, None, None].exp()
        s = s + k[..., t, :, None] * v[..., t, None, :]
        out.append((q[..., t, None, :] @ s).squeeze(-2))
    return torch.stack(out, dim=-2), s


def _pad_to_chunks(x: torch.Tensor, chunk: int, dim: int = -2) -> torch.Tensor:
    """Zeros appended along `dim` up to a multiple of `chunk`: a zero key/value adds nothing to the
    state and log α = 0 decays nothing, so padded tokens only produce outputs that are cut off."""
    pad = (-x.shape[dim]) % chunk
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def chunkwise(q, k, v, log_decay=None, state=None, chunk: int = 64):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    s = initial_state(q, v, state)
    q, k, v = (_pad_to_chunks(x, chunk).reshape(b, h, -1, chunk, x.shape[-1]) for x in (q, k, v))
    n = q.shape[2]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if log_decay is None:
        intra = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_in, k_out, chunk_decay = q, k, None
    else:
        ld = _at_least_fp32(_pad_to_chunks(log_decay, chunk, dim=-1).reshape(b, h, n, chunk))
        within = ld.cumsum(-1)                                   # Σ log α from the chunk start to t
        intra = (q @ k.transpose(-1, -2)) * _decay_matrix(ld).to(q.dtype)
        q_in = q * within.exp().to(q.dtype)[..., None]             # the state decays until t
        k_out = k * (within[..., -1:] - within).exp().to(q.dtype)[..., None]  # k_i decays until the chunk end
        chunk_decay = within[..., -1].exp().to(q.dtype)          # (b, h, n)
    written = k_out.transpose(-1, -2) @ v                        # each chunk's addition to the state
    decays = chunk_decay.unbind(2) if chunk_decay is not None else [None] * n
    states = []
    # the only sequential part: one small update per chunk (unbind, not indexing: indexing a chunk
    # in a loop makes backward write a full-size gradient per chunk, quadratic in the length)
    for add, decay in zip(written.unbind(2), decays):
        states.append(s)
        s = (s * decay[..., None, None] if decay is not None else s) + add
    before = torch.stack(states, dim=2)                          # (b, h, n, dk, dv): state entering each chunk
    out = q_in @ before + intra @ v
    return out.reshape(b, h, n * chunk, dv)[:, :, :t], s


def normalised(form, q, k, v, *, eps: float = 1e-6, state=None, **kw):
    """φ(q)ᵀS_t / (φ(q)ᵀz_t + eps), with z_t = Σ φ(k_i) carried as an extra column of ones in v.
    `q`, `k` are already feature-mapped; the state is (..., d_k, d_v + 1)."""
    ones = v.new_ones(*v.shape[:-1], 1)
    vz = torch.cat([v, ones], dim=-1)
    if form is naive:
        out, state = naive(q, k, vz, **kw), None
    else:
        out, state = form(q, k, vz, state=state, **kw)
    return out[..., :-1] / (out[..., -1:] + eps), state


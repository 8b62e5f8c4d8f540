"""1-bit compression with error feedback, and the compressed all-reduce of 1-bit Adam (Tang et al. 2021).

A tensor of n values is flattened and zero-padded to W chunks of `chunk` values (W = world size,
chunk a multiple of 8). Compressing a chunk c keeps one bit per value and one fp32 scale:

    C(c) = (‖c‖₂ / √d) · sign(c)          d = the chunk's real (unpadded) values, sign(0) = +1

which keeps the chunk's norm. Error feedback makes the compression unbiased over time: a worker
sends C(m + e) and keeps e ← (m + e) − C(m + e), so Σ_t C_t + e_T = Σ_t m_t exactly (up to float
rounding), i.e. nothing is lost, only delayed.

The all-reduce (`compressed_average`) is two collectives: every rank compresses its whole tensor
and `all_to_all`s it, so rank j receives chunk j from every rank; rank j averages them, adds its
server error, compresses again (server error feedback) and `all_gather`s the result. Signs travel
packed 8 per byte (uint8), each chunk's scale as 4 more bytes.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Signs of x (last dim a multiple of 8; >= 0 is 1) packed 8 per uint8, most significant bit first."""
    bits = (x >= 0).to(torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 8, 8)
    return (bits * _BITS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_signs`: ±1 values, 8 per byte."""
    bits = (packed.unsqueeze(-1) & _BITS.to(packed.device)) > 0
    signs = bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return torch.where(signs, 1.0, -1.0).to(dtype)


def layout(n: int, world: int) -> tuple[int, torch.Tensor]:
    """(chunk, valid): the chunk length (a multiple of 8) that splits n values into `world` chunks,
    and a (world, chunk) mask of the real values among the padding."""
    chunk = max(8, math.ceil(n / world / 8) * 8)
    valid = (torch.arange(world * chunk) < n).reshape(world, chunk)
    return chunk, valid


def compress(c: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of c (zero where not valid) -> (signs packed, one scale per row, C(c) decompressed)."""
    real = valid.sum(-1).clamp(min=1).to(c.dtype)
    scale = c.norm(dim=-1) / real.sqrt()
    packed = pack_signs(c)
    return packed, scale, decompress(packed, scale, valid, c.dtype)


def decompress(packed: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return unpack_signs(packed, dtype) * scale.unsqueeze(-1).to(dtype) * valid


def _with_scale(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row's packed signs followed by its fp32 scale as 4 bytes: one buffer, one collective."""
    return torch.cat([packed, scale.float().unsqueeze(-1).contiguous().view(torch.uint8)], dim=-1)


def _split_scale(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return buf[..., :-4], buf[..., -4:].contiguous().view(torch.float32).squeeze(-1)


def compressed_average(m: torch.Tensor, worker_error: torch.Tensor, server_error: torch.Tensor,
                       group=None) -> tuple[torch.Tensor, int]:
    """The average of `m` over the ranks of `group`, exchanged at 1 bit per value with error feedback.

    worker_error: (world·chunk,) this rank's compression error of its whole tensor, updated in place;
    server_error: (chunk,) the error of the chunk this rank averages, updated in place.
    Returns (the average, shaped like m — the same on every rank; bytes this rank sent).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = m.numel()
    chunk, valid = layout(n, world)
    valid = valid.to(m.device)
    c = torch.zeros(world * chunk, dtype=worker_error.dtype, device=m.device)
    c[:n] = m.reshape(-1).to(c.dtype)
    c = (c + worker_error).reshape(world, chunk)
    packed, scale, sent = compress(c, valid)
    worker_error.copy_((c - sent).reshape(-1))

    outgoing = _with_scale(packed, scale)  # row j goes to rank j
    incoming = torch.empty_like(outgoing)  # row i came from rank i: its compressed chunk `rank`
    dist.all_to_all_single(incoming, outgoing, group=group)
    their_packed, their_scale = _split_scale(incoming)
    mine = valid[rank]
    avg = decompress(their_packed, their_scale, mine.expand(world, chunk), c.dtype).mean(0)

    cs = (avg + server_error).unsqueeze(0)
    s_packed, s_scale, s_sent = compress(cs, mine.unsqueeze(0))
    server_error.copy_((cs - s_sent).squeeze(0))
    gathered = [torch.empty_like(outgoing[0]) for _ in range(world)]
    dist.all_gather(gathered, _with_scale(s_packed, s_scale).squeeze(0), group=group)
    all_packed, all_scale = _split_scale(torch.stack(gathered))
    out = decompress(all_packed, all_scale, valid, c.dtype).reshape(-1)[:n]
    row = outgoing.shape[-1]
    sent_bytes = (world - 1) * row + (world - 1) * row  # all_to_all: W−1 rows out; all_gather: own row to W−1 ranks
    return out.reshape(m.shape).to(m.dtype), sent_bytes

"""The chunkwise forms on flash-linear-attention's Triton kernels, where they can run (CUDA with
`fla` installed); the pure-PyTorch forms everywhere else. `backend` on the model config:
`torch` never uses fla; `auto` and `fla` use it when the tensors are on CUDA and fla imports
(`fla` warns at build time when it cannot, so a model trained on a GPU still loads on a CPU).

fla computes the same recurrences with tensors laid out (batch, time, heads, dim) and a default
1/√d scale on q; both are undone here, so a block gives the same function on either backend.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch

from rewarm.mixers import delta, scan

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def fla_installed() -> bool:
    try:
        import fla.ops  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return False
    return True


def check(backend: str) -> None:
    """Say at build time, not mid-run, that `fla` was asked for but cannot be used here."""
    if backend == "fla" and not (torch.cuda.is_available() and fla_installed()):
        log.warning("mixer backend `fla` needs CUDA and the flash-linear-attention package (pip install "
                    "flash-linear-attention); this model runs on the PyTorch kernels here")


def wants_fla(block, x: torch.Tensor) -> bool:
    return getattr(block, "backend", "torch") != "torch" and x.is_cuda and fla_installed()


def _bthd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


def scan_chunkwise(block, q, k, v, log_decay=None, state=None):
    """scan.chunkwise, on fla's chunk_simple_gla when the block may use it (g = log α per head)."""
    if not wants_fla(block, q):
        return scan.chunkwise(q, k, v, log_decay, state=state, chunk=block.chunk_size)
    from fla.ops.simple_gla import chunk_simple_gla

    g = None if log_decay is None else _bthd(log_decay.unsqueeze(-1)).squeeze(-1).float()
    out, final = chunk_simple_gla(_bthd(q), _bthd(k), _bthd(v), g=g, scale=1.0, initial_state=state,
                                  output_final_state=True)
    return out.transpose(1, 2), final


def delta_chunkwise(block, q, k, v, beta, state=None):
    """delta.chunkwise, on fla's chunk_delta_rule when the block may use it."""
    if not wants_fla(block, q):
        return delta.chunkwise(q, k, v, beta, state=state, chunk=block.chunk_size)
    from fla.ops.delta_rule import chunk_delta_rule

    out, final = chunk_delta_rule(_bthd(q), _bthd(k), _bthd(v), _bthd(beta.unsqueeze(-1)).squeeze(-1), scale=1.0,
                                  initial_state=state, output_final_state=True)
    return out.transpose(1, 2), final


@contextlib.contextmanager
def forced(block):
    """Run `block` (and its submodules) on the fla kernels for a while (tests, benchmarks)."""
    blocks = [m for m in block.modules() if hasattr(m, "backend")]
    before = [m.backend for m in blocks]
    for m in blocks:
        m.backend = "fla"
    try:
        yield block
    finally:
        for m, b in zip(blocks, before):
            m.backend = b

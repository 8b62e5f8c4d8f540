"""Flatness: the trace of the Hessian of the pre-training loss (Liu et al. 2022, "Same pre-training
loss, better downstream: implicit bias matters").

Two models with the same loss can transfer differently; the flatter one (smaller tr(H)) tends to
transfer better. tr(H) of a model with millions of parameters is estimated with Hutchinson's
estimator: for Rademacher vectors v (entries ±1, E[vvᵀ] = I),

    tr(H) = E[vᵀ H v],   vᵀHv = vᵀ ∇(∇L · v)   (a Hessian-vector product by double backprop)

averaged over K draws, with the standard error std/√K. L is the mean next-token loss on fixed
held-out windows, so numbers are comparable across checkpoints of the same data.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch

from rewarm.fused_loss import lm_loss


def hutchinson_trace(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], samples: int,
                     seed: int = 0) -> dict:
    """tr(∇²loss) over `params` from `samples` Rademacher probes: {trace, stderr, samples, values}.
    The gradient graph is built once and reused by every probe."""
    if samples < 2:
        raise ValueError("Hutchinson's estimator needs at least 2 samples for a standard error")
    gen = torch.Generator().manual_seed(seed)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    values = []
    for k in range(samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p.device, p.dtype) for p in params]
        gv = sum((g * v).sum() for g, v in zip(grads, vs))
        hv = torch.autograd.grad(gv, params, retain_graph=k < samples - 1)
        values.append(float(sum((h.double() * v.double()).sum() for h, v in zip(hv, vs))))
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    return {"trace": mean, "stderr": math.sqrt(var / len(values)), "samples": len(values), "values": values,
            "loss": float(loss.detach())}


@contextmanager
def _double_backward_attention():
    """Fused attention kernels have no double backward; the math kernel does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def model_flatness(model: torch.nn.Module, windows: torch.Tensor, samples: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict:
    """Hutchinson's tr(H) of the mean next-token loss of `windows` ((n, seq_len + 1) token ids) with
    respect to every trainable parameter, in fp32 (a Hessian in bf16 is mostly rounding)."""
    params = [p for p in model.parameters() if p.requires_grad]
    windows = windows.to(device)
    was_training = model.training
    model.eval()  # no dropout: the same function for every probe

    try:  # the unfused loss: the fused head's custom backward has no double backward
        with _double_backward_attention(), torch.autocast(device_type=torch.device(device).type, enabled=False):
            out = hutchinson_trace(lambda: lm_loss(model, windows, fused=False), params, samples, seed)
    finally:
        model.train(was_training)
    out.update(params=sum(p.numel() for p in params), tokens=int(windows[:, 1:].numel()))
    return out


def flatness_of_checkpoint(checkpoint: str, data: list[tuple[str, str]], samples: int = 8, tokens: int = 1024,
                           seq_len: int = 128, seed: int = 0, tokenizer: str | None = None, cpu: bool = False) -> dict:
    """`rewarm flatness`: tr(H) of a saved model's loss on each named held-out set, {name: result}."""
    from rewarm.data.shards import TokenShards
    from rewarm.errors import UserError
    from rewarm.evaluate import EvalSet
    from rewarm.model import load_pretrained
    from rewarm.model_store import resolve
    from rewarm.tokenizer import fingerprint, load_tokenizer

    if samples < 2:
        raise UserError(f"--samples must be at least 2 (the standard error needs two probes), got {samples}.")
    for flag, value in (("--tokens", tokens), ("--seq-len", seq_len)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}.")
    if tokens < seq_len:
        raise UserError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}. Raise --tokens.")
    checkpoint = resolve(checkpoint, "model")
    model = load_pretrained(checkpoint).float()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max positions ({max_pos}). Lower --seq-len.")
    tok = load_tokenizer(tokenizer or checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    model.to(device)
    out = {}
    for name, path in data:
        shards = TokenShards(path)
        shards.check_compatible(fingerprint(tok), model.config.vocab_size, name)
        es = EvalSet.from_shards(name, shards, seq_len, tokens)
        if es.tokens < (tokens // seq_len) * seq_len:
            raise UserError(f"`{name}` ({path}) holds {es.tokens:,} validation tokens in windows of {seq_len}, fewer "
                            f"than the {tokens:,} asked for: the estimate would not be on the windows you asked for. "
                            f"Lower --tokens or prepare more validation data.")
        out[name] = model_flatness(model, es.windows, samples, seed=seed, device=device)
    return out

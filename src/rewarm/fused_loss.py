"""The training and evaluation loss: next-token cross-entropy without materialising the full logits.

The LM head of a small model over a large vocabulary is most of a step's memory traffic:
batch·seq × vocab logits in fp32 (4,096 × 50,304 × 4 B = 824 MB), written by the matmul, read
by softmax, written again as their gradient and read twice more in backward. Here the head
and the cross-entropy run together over row chunks: each chunk's logits are turned into
their gradient (softmax − one-hot) in place and immediately multiplied back into the hidden
states' and the head's gradients, so only chunk × vocab floats ever exist (Liger-Kernel's
fused linear cross-entropy, done with plain PyTorch ops). Same loss and gradients as the
unfused path up to float rounding (tested).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024  # 1024 x 50304 fp32 = 206 MB at most per chunk; small enough to stay in cache-friendly sizes


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i (or mean_i) CE(hidden_i @ weight.T + bias, target_i); gradients are computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, mean, grad_enabled):
        n = hidden.shape[0]
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:3])
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_grad and bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        low_precision = torch.is_autocast_enabled(hidden.device.type) or hidden.dtype in (torch.bfloat16, torch.float16)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = F.linear(h, weight, bias).float()
            gold = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # one pass over the chunk, in place: exp(logit - max)
            norm = probs.sum(dim=-1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - gold).sum()  # logsumexp - gold logit
            if needs_grad:
                probs.div_(norm)  # softmax
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(sum CE)/d logits
                g = probs.to(h.dtype)
                grad_hidden[start : start + chunk] = g @ weight
                if low_precision:  # a bf16/fp16 GEMM (fp32 accumulation inside), as autocast runs the unfused head
                    grad_weight += torch.mm(g.t(), h).float()
                else:
                    grad_weight.addmm_(g.t().float(), h.float())
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype),
                                  grad_bias.to(bias.dtype) if grad_bias is not None else None)
        ctx.scale = 1.0 / n if mean else 1.0
        return total * ctx.scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_out * ctx.scale
        return (grad_hidden * scale, grad_weight * scale,
                grad_bias * scale if grad_bias is not None else None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, reduction: str = "mean", chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy (mean or sum) of the head `weight`/`bias` applied to `hidden` (..., d) against `targets`."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                     chunk, reduction == "mean", torch.is_grad_enabled())


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def head_and_backbone(model: torch.nn.Module):
    """(backbone, head) of an HF causal LM whose logits are exactly head(backbone(x).last_hidden_state),
    or None when that is not known to hold (logit scaling or soft-capping, wrapped or compiled modules)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or _is_fsdp(model):
        return None  # FSDP2 all-gathers the root's parameters in the root's own forward hook
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    backbone = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear):
        return None
    return backbone, head


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, reduction: str = "mean", fused: bool = True,
            backbone: torch.nn.Module | None = None, with_aux: bool = False):
    """Next-token cross-entropy of `windows` (rows of seq_len + 1 ids): the labels are shifted,
    the logits are not sliced (slicing them copies the largest tensor of the step). On a plain HF
    model the head and the loss run fused over row chunks (`fused_loss`): the full logits never exist.
    DDP/FSDP-wrapped or compiled models take the unfused path (their hooks must see the whole forward);
    `backbone` replaces the model's own body on the fused path (train.compile passes a compiled one).
    With `with_aux`, returns (loss, aux): aux is the `aux_loss` the model put in its output (an MoE's
    load balancing, already weighted by the model's coefficient) or None; the loop adds and logs it."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    parts = head_and_backbone(model) if fused else None
    if parts is not None:
        body, head = parts
        out = (body if backbone is None else backbone)(input_ids=inputs, use_cache=False)
        loss = linear_cross_entropy(out.last_hidden_state, head.weight, head.bias, targets, reduction=reduction)
    else:
        out = model(input_ids=inputs, use_cache=False)
        logits = out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction=reduction)
    return (loss, getattr(out, "aux_loss", None)) if with_aux else loss

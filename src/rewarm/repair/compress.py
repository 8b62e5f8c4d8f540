"""Compress a model, simulated: prune (magnitude, Wanda) or quantize (round-to-nearest), with the
result stored as ordinary dense fp32 weights so every rewarm command runs on it.

Only the linear layers inside the decoder blocks are touched (attention and FFN projections; never
the embeddings, norms or head), as in Wanda (Sun et al. 2024) and GPTQ-style studies.

- magnitude: score |W_ij|; the lowest-scoring weights of each matrix are zeroed.
- wanda: score |W_ij| · ‖X_j‖₂, X_j the j-th input feature over calibration tokens; compared within
  each output row (Wanda's per-output comparison). Blocks are pruned in order, each block's inputs
  computed by the already-pruned blocks before it, as Wanda does.
- patterns: `unstructured` (the fraction `sparsity` of each row / matrix) or `N:M` (N zeros in every
  M consecutive input weights of a row, e.g. 2:4).
- rtn: per output row, groups of `group` consecutive input weights (the last one shorter when they do
  not divide); each group keeps its minimum m and step s = (max − m) / (2^k − 1) and every weight
  becomes m + round((w − m)/s)·s: 2^k levels, error at most s/2. Exact zeros stay zero, so a pruned
  model quantized afterwards keeps its mask (compressions stack).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rewarm.errors import UserError

METHODS = ("magnitude", "wanda", "rtn")


@dataclass(frozen=True)
class Pattern:
    """unstructured (n = m = 0) or N:M."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        if text == "unstructured":
            return cls()
        try:
            n, m = (int(x) for x in text.split(":"))
        except ValueError:
            raise UserError(f"--pattern must be `unstructured` or N:M (e.g. 2:4), got {text!r}.") from None
        if not 0 < n < m:
            raise UserError(f"--pattern {text}: N:M needs 0 < N < M (N zeros in every M weights), e.g. 2:4.")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def block_linears(model: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder block, its linear layers (name, module)."""
    from rewarm.distributed import transformer_blocks

    try:
        blocks = transformer_blocks(model)
    except ValueError as exc:
        raise UserError(f"compress: {exc}") from None
    prefix = {id(m): n for n, m in model.named_modules()}
    return [[(f"{prefix[id(b)]}.{n}", m) for n, m in b.named_modules() if isinstance(m, nn.Linear)] for b in blocks]


@torch.no_grad()
def prune_scores(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """A keep-mask (True = keep) zeroing the lowest scores: per row or per matrix (unstructured), or
    N of every M consecutive inputs of a row."""
    out_f, in_f = scores.shape
    if pattern.m:
        if in_f % pattern.m:
            raise UserError(f"a {out_f}×{in_f} matrix cannot take the {pattern} pattern: {in_f} inputs are not a "
                            f"multiple of {pattern.m}.")
        groups = scores.reshape(out_f, in_f // pattern.m, pattern.m)
        drop = groups.topk(pattern.n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return keep.reshape(out_f, in_f)
    if per_row:
        k = int(sparsity * in_f)
        keep = torch.ones_like(scores, dtype=torch.bool)
        if k:
            keep.scatter_(1, scores.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = int(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[scores.flatten().topk(k, largest=False).indices] = False
    return keep.view_as(scores)


@torch.no_grad()
def quantize_rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weights, each group's step s) for k-bit round-to-nearest in groups of `group`
    consecutive inputs; when the inputs are not a multiple of `group` the last group of each row is
    the shorter rest (SmolLM2's 576 inputs in groups of 128: 4 × 128 + 64)."""
    out_f, in_f = w.shape
    full = (in_f // group) * group
    parts = [(0, full, group)] if full else []
    if full < in_f:
        parts.append((full, in_f, in_f - full))
    deq, steps = torch.empty_like(w), []
    for start, end, size in parts:
        g = w[:, start:end].float().reshape(out_f, (end - start) // size, size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (hi - lo) / (2 ** bits - 1)
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.round((g - lo) / safe).clamp_(0, 2 ** bits - 1)
        deq[:, start:end] = (lo + q * step).reshape(out_f, end - start).to(w.dtype)
        steps.append(step.squeeze(-1))
    deq[w == 0] = 0  # a pruned weight stays pruned: quantizing a pruned model keeps its mask
    return deq, torch.cat(steps, dim=1)


class _StopForward(Exception):
    pass


@torch.no_grad()
def _input_norms(model: nn.Module, block: nn.Module, linears: list[tuple[str, nn.Linear]], windows: torch.Tensor,
                 batch: int) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature of `linears`, over `windows`, with the forward stopped after `block`."""
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears}

    def collect(name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0).cpu()
        return hook

    def stop(module, args, output):
        raise _StopForward

    hooks = [lin.register_forward_hook(collect(name)) for name, lin in linears] + [block.register_forward_hook(stop)]
    try:
        for rows in windows.split(batch):
            try:
                model(input_ids=rows, use_cache=False)
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def compress(model: nn.Module, method: str, *, sparsity: float = 0.5, pattern: Pattern = Pattern(), bits: int = 4,
             group: int = 128, calibration: torch.Tensor | None = None, batch: int = 8, progress: bool = True) -> dict:
    """Compress `model` in place; returns the record (what was done, and per matrix what came out)."""
    from tqdm import tqdm

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}.")
    if method == "wanda" and calibration is None:
        raise UserError("wanda needs calibration activations: pass --calib SHARDS (a prepared directory).")
    model.eval()
    blocks = block_linears(model)
    from rewarm.distributed import transformer_blocks

    modules = transformer_blocks(model)
    per_matrix: dict[str, dict] = {}
    for i, linears in enumerate(tqdm(blocks, desc=f"compress ({method})", unit="block", disable=not progress)):
        norms = _input_norms(model, modules[i], linears, calibration, batch) if method == "wanda" else {}
        for name, lin in linears:
            w = lin.weight
            if method == "rtn":
                deq, step = quantize_rtn(w, bits, group)
                per_matrix[name] = {"max_abs_error": float((deq - w).abs().max()), "max_step": float(step.max())}
                w.copy_(deq)
                continue
            scores = w.abs().float() * (norms[name].to(w.device)[None, :] if method == "wanda" else 1.0)
            keep = prune_scores(scores, sparsity, pattern, per_row=method == "wanda")
            w.mul_(keep.to(w.dtype))
            per_matrix[name] = {"sparsity": float(1 - keep.float().mean())}
    record = {"method": method, "matrices": len(per_matrix)}
    if method == "rtn":
        record.update(bits=bits, group=group, max_abs_error=max(m["max_abs_error"] for m in per_matrix.values()))
    else:
        total = sum(lin.weight.numel() for ls in blocks for _, lin in ls)
        zeros = sum(int((lin.weight == 0).sum()) for ls in blocks for _, lin in ls)
        record.update(sparsity=sparsity if not pattern.m else pattern.n / pattern.m, pattern=str(pattern),
                      achieved_sparsity=zeros / total)
    if calibration is not None and method == "wanda":
        record["calibration_tokens"] = int(calibration.shape[0] * calibration.shape[1])
    return {"record": record, "matrices": per_matrix}

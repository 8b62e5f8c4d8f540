"""`train.keep_sparsity`: a pruned model stays pruned while it trains.

The mask is read from the model itself: every weight matrix inside the decoder blocks that holds
exact zeros at the start of the run keeps them — after each optimizer step the zeros are written
back (the update, weight decay and momentum would otherwise regrow them). A resumed run reads the
same mask from its checkpoint, whose pruned weights are still exactly zero.
"""
from __future__ import annotations

import logging

import torch

from rewarm.errors import UserError

log = logging.getLogger(__name__)


def masks_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: keep-mask} for the block matrices that hold zeros."""
    from rewarm.distributed import transformer_blocks

    blocks = {id(p) for b in transformer_blocks(model) for p in b.parameters()}
    return {name: p.detach() != 0 for name, p in model.named_parameters()
            if id(p) in blocks and p.dim() == 2 and bool((p == 0).any())}


def keep(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Re-apply the zeros after every optimizer step; returns what is kept (for the start event)."""
    masks = masks_of(model)
    if not masks:
        raise UserError("`train.keep_sparsity` keeps a pruned model's zeros, but no weight matrix of this model has any. "
                        "Prune it first (rewarm compress MODEL -o DIR --method wanda), or set train.keep_sparsity: false.")
    params = dict(model.named_parameters())
    pairs = [(params[name], mask) for name, mask in masks.items()]

    def reapply(opt, args, kwargs) -> None:
        with torch.no_grad():
            for p, mask in pairs:
                p.mul_(mask)

    optimizer.register_step_post_hook(reapply)
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    log.info("train.keep_sparsity: %d matrices keep their zeros (%.1f%% of their weights)", len(masks), 100 * zeros / total)
    return {"matrices": len(masks), "sparsity": round(zeros / total, 6)}

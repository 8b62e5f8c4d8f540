"""`moe.lbl_scope: global_batch`: the expert load f_i of the whole optimizer step, before its
micro-batches run (a loss term: rewarm.loss_terms).

Each micro-batch's LBL needs f_i of the *global* batch (every micro-batch of the step, every
data-parallel rank) while its p_i keeps its own gradient. f_i has no gradient, so it can be measured
first: one forward without gradients over this rank's rows of the step (routing counts only, in the
step's precision so the counts are the ones training will see), then one all-reduce of the counts —
(layers × experts) numbers — across ranks. The price is that extra forward (about a third of a
step's compute); with one micro-batch per rank and one rank the scopes coincide and nothing runs.
"""
from __future__ import annotations

import torch

from rewarm.errors import UserError


def _enabled(cfg) -> bool:
    return cfg.moe.lbl_scope == "global_batch" and cfg.moe.lbl_coef > 0


def _check(cfg) -> None:
    if cfg.train.compile:
        raise UserError("`moe.lbl_scope: global_batch` counts the routing with an uncompiled forward, and "
                        "train.compile can route a token differently at a tie; set train.compile: false.")


def _backward(st, windows, sources) -> dict | None:
    from rewarm.fused_loss import autocast

    model = st.raw_model
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    if not layers:
        return None
    d = st.dist
    micro = torch.from_numpy(windows).split(st.cfg.train.micro_batch)
    for m in layers:
        m.global_f = None
    if len(micro) == 1 and d.world == 1:
        return None  # one micro-batch on one rank: the step's tokens are this forward's tokens
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64, device=st.device)

    def counter(i: int):
        def hook(module, args, output) -> None:  # returns None: the layer's output stays its own
            counts[i] += module.assignment_counts(args[0]).to(counts.dtype)
        return hook

    hooks = [m.register_forward_hook(counter(i)) for i, m in enumerate(layers)]
    fsdp = d.active and d.strategy == "fsdp"
    runner = st.model if fsdp else model.backbone  # FSDP: the whole (collective) forward; else the body alone
    was_training = st.model.training
    st.model.eval()
    try:
        with torch.no_grad(), autocast(st.device, st.precision):
            for rows in micro:
                runner(input_ids=rows[:, :-1].to(st.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        st.model.train(was_training)
    if d.active:
        torch.distributed.all_reduce(counts)
    for i, m in enumerate(layers):
        m.global_f = (counts[i] / counts[i].sum()).float()
    return None


def register() -> None:
    from rewarm import loss_terms

    loss_terms.register("moe_global_batch_balance", _enabled, _backward, _check)

"""The `eval.retrieval` hook (registered on `import rewarm`): what retrieval buys, measured in the run.

At every eval of a RETRO model (`retrieval.compare`): the same held-out windows scored again
- with retrieval off (no neighbours, no CCA: at step 0 and, with a frozen base, always the base), and
- with neighbours drawn at random from the database (the control: trained CCA layers can lower the
  loss with *any* text — a learned bias, extra capacity — and only the part beyond this control is
  what relevant neighbours buy),
written as a `retrieval` event beside the `eval` event. At the last eval (`retrieval.repetition_prompts` > 0): the
repeated-4-gram share of greedy continuations of held-out prompts with retrieval, with random
neighbours and with none (rank 0). The last values also go into summary.json under `retrieval`.
"""
from __future__ import annotations

import torch


def _enabled(cfg) -> bool:
    r = cfg.retrieval
    return bool(r.db) or r.compare or r.repetition_prompts > 0


def _prompts(st) -> torch.Tensor:
    """The first tokens (two chunks, so retrieval has whole chunks to read) of windows spread over
    the first eval set."""
    es = st.eval_sets[0]
    n = st.cfg.retrieval.repetition_prompts
    chunk = st.raw_model.config.chunk
    picks = torch.linspace(0, es.windows.shape[0] - 1, min(n, es.windows.shape[0])).long()
    return es.windows[picks, : 2 * chunk]


def _run(st, metrics) -> None:
    from rewarm import distributed
    from rewarm.config import last_step
    from rewarm.evaluate import evaluate
    from rewarm.retro.repetition import repetition

    model = st.raw_model
    if not hasattr(model, "retrieval") or not st.eval_sets:
        return None  # not a RETRO model, or no held-out set to compare on
    r, d, step = st.cfg.retrieval, st.dist, st.state.step
    summary = st.hook_state.setdefault("summary", {}).setdefault("retrieval", {})
    event = {"event": "retrieval", "step": step, "tokens": step * st.tokens_per_step}
    if r.compare:
        sharded = d.active and d.strategy == "ddp"
        for mode, key in ((False, "without"), ("random", "random")):
            # DDP: rank r scores windows r, r + world, ...; the random neighbours are seeded per rank and step
            with torch.no_grad(), model.retrieval(mode, seed=st.cfg.seed + step * 1000 + d.rank):
                res = evaluate(distributed.unwrap(st.model) if sharded else st.model, st.eval_sets, st.cfg.eval.batch,
                               st.device, st.precision, rank=d.rank if sharded else 0, world=d.world if sharded else 1,
                               reduce=(lambda xs: d.sum(xs, st.device)) if sharded else None)
            event[key] = {name: v["loss"] for name, v in res.items()}
            summary[f"loss_{key}"] = event[key]
    if r.repetition_prompts > 0 and step == last_step(st.cfg.train) and not (d.active and d.strategy == "fsdp"):
        if d.is_main:
            prompts = _prompts(st).to(st.device)
            from rewarm.fused_loss import autocast

            with autocast(st.device, st.precision):
                with_r = repetition(model, prompts, r.repetition_tokens)
                with model.retrieval(False):
                    without_r = repetition(model, prompts, r.repetition_tokens)
                with model.retrieval("random", seed=st.cfg.seed):
                    random_r = repetition(model, prompts, r.repetition_tokens)
            event["repetition"] = {"with": with_r["rep_4"], "without": without_r["rep_4"], "random": random_r["rep_4"],
                                   "prompts": with_r["prompts"], "new_tokens": r.repetition_tokens}
            summary["repetition"] = event["repetition"]
        d.barrier()
    metrics.write(event)
    return None


def register() -> None:
    from rewarm import eval_hooks

    eval_hooks.register("retrieval", _enabled, _run)

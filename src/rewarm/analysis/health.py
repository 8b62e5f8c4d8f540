"""The run-health eval hooks: `eval.flatness` and `eval.collapse` (registered on `import rewarm`).

flatness: at step 0, at evals whose step is a multiple of `every`, and at the end, Hutchinson's
tr(H) of the loss on the first eval set's windows, computed by rank 0 on the plain module (the other
ranks wait), with its own seeded generator: the run's numbers do not change (tested).
collapse: at every eval, ME-PPL of the sentences on every rank (same weights, same verdict); above
`factor` × the step-0 value it writes a `collapse` event and returns the action.
"""
from __future__ import annotations

import logging

from rewarm.errors import UserError
from rewarm.rundir import RunDir, iter_metrics

log = logging.getLogger(__name__)


def _flatness_on(cfg) -> bool:
    return cfg.eval.flatness.every > 0


def _flatness_check(cfg) -> None:
    if not cfg.data.eval:
        raise UserError("`eval.flatness` takes its windows from the first eval set: add one to `data.eval`.")


def _flatness_windows(st):
    """The first eval set's windows as `rewarm flatness --tokens T --seq-len train.seq_len` picks them,
    so the CLI on a saved checkpoint reproduces the logged value (seed = run seed + step)."""
    from rewarm.data.shards import TokenShards
    from rewarm.evaluate import EvalSet

    mine = st.hook_state.setdefault("flatness", {})
    if "set" not in mine:
        src = st.cfg.data.eval[0]
        mine["set"] = EvalSet.from_shards(src.name, TokenShards(src.path), st.cfg.train.seq_len, st.cfg.eval.flatness.tokens)
    return mine["set"]


def _flatness_run(st, metrics) -> None:
    from rewarm.analysis.flatness import model_flatness
    from rewarm.config import last_step

    fc, step, d = st.cfg.eval.flatness, st.state.step, st.dist
    if not (step == 0 or step % fc.every == 0 or step == last_step(st.cfg.train)):
        return None
    if d.active and d.strategy == "fsdp":
        if step == 0:
            log.warning("eval.flatness is skipped under FSDP (sharded parameters); use `rewarm flatness` on a checkpoint")
        return None
    if d.is_main:
        es = _flatness_windows(st)
        r = model_flatness(st.raw_model, es.windows, fc.samples, seed=st.cfg.seed + step, device=st.device)
        metrics.write({"event": "flatness", "step": step, "tokens": step * st.tokens_per_step, "set": es.name,
                       "trace": r["trace"], "stderr": r["stderr"], "samples": r["samples"], "loss": r["loss"],
                       "eval_tokens": r["tokens"]})
    d.barrier()
    return None


def _collapse_on(cfg) -> bool:
    return bool(cfg.eval.collapse.sentences)


def _collapse_check(cfg) -> None:
    from rewarm.analysis.collapse import load_sentences

    load_sentences(cfg.eval.collapse.sentences)


def _baseline_from_metrics(cfg) -> float | None:
    """The step-0 ME-PPL a resumed run wrote before it stopped."""
    path = RunDir(cfg.out_dir).metrics
    if path.exists():
        for e in iter_metrics(path):
            if e.get("event") == "me_ppl" and e.get("step") == 0:
                return float(e["me_ppl"])
    return None


def _collapse_run(st, metrics) -> str | None:
    from rewarm.analysis.collapse import encode, load_sentences, me_ppl
    from rewarm.fused_loss import autocast

    cc, step, d = st.cfg.eval.collapse, st.state.step, st.dist
    mine = st.hook_state.setdefault("collapse", {})
    if "encoded" not in mine:
        max_pos = getattr(st.raw_model.config, "max_position_embeddings", None)
        mine["encoded"] = encode(st.tokenizer, load_sentences(cc.sentences), max_pos)
    model = st.model if (d.active and d.strategy == "fsdp") else st.raw_model
    with autocast(st.device, st.precision):
        value = me_ppl(model, mine["encoded"], st.device)
    if "baseline" not in mine:
        found = None if step == 0 else _baseline_from_metrics(st.cfg)
        if found is None and step > 0:
            log.warning("eval.collapse: no step-0 ME-PPL in this run's metrics; step %d's value is the baseline", step)
        mine["baseline"] = found if found is not None else value
    base = mine["baseline"]
    ratio = value / base if base > 0 else float("inf")
    metrics.write({"event": "me_ppl", "step": step, "tokens": step * st.tokens_per_step, "me_ppl": value,
                   "baseline": base, "ratio": ratio, "sentences": len(mine["encoded"])})
    if not ratio > cc.factor:  # NaN counts as collapsed
        return None
    metrics.write({"event": "collapse", "step": step, "me_ppl": value, "baseline": base, "ratio": ratio,
                   "factor": cc.factor, "action": cc.action})
    log.warning("collapse alarm at step %d: ME-PPL %.4g is %.1fx its step-0 value %.4g (factor %g); action: %s",
                step, value, ratio, base, cc.factor, cc.action)
    return None if cc.action == "warn" else cc.action


def register() -> None:
    from rewarm import eval_hooks

    eval_hooks.register("flatness", _flatness_on, _flatness_run, _flatness_check)
    eval_hooks.register("collapse", _collapse_on, _collapse_run, _collapse_check)

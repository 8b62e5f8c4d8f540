"""Run lm-evaluation-harness on a model in memory and summarise each task.

Besides lm-eval's own metrics (acc, acc_norm, ...), every multiple-choice task gets the
quantities that trend smoothly with scale and training (Schaeffer et al. 2024), computed
from lm-eval's per-sample, per-choice log-likelihoods ll_i (sum of log-probs of choice i):
  logp_gold       log p(gold) = ll_gold
  p_gold          p(gold) = exp(ll_gold)              (probability under the full vocabulary)
  p_choices_gold  softmax(ll)_gold                    (probability among the choices)
  p_incorrect     sum_{i != gold} exp(ll_i)           (vocabulary mass on the incorrect choices)
  brier           sum_i (softmax(ll)_i - [i == gold])^2   (multiclass Brier score)
each as a mean over samples with its standard error (sample std / sqrt(n)), as lm-eval does for acc.
The same function serves `rewarm downstream` and the in-training evaluation, so both give the
same numbers for the same weights.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewarm import atomic
from rewarm.errors import UserError

log = logging.getLogger(__name__)

CHOICE_METRICS = ("logp_gold", "p_gold", "p_choices_gold", "p_incorrect", "brier")


def require_lm_eval() -> None:
    try:
        import lm_eval.models.huggingface  # noqa: F401  (needs lm_eval's [hf] extra: accelerate, peft)
    except ImportError as exc:
        raise UserError(f"downstream evaluation needs lm-evaluation-harness with its HF extra ({exc}): "
                        f"pip install 'rewarm[downstream]' (or pip install 'lm_eval[hf]').") from None


def check_tokenizer(model: torch.nn.Module, tokenizer) -> None:
    """A tokenizer whose ids run past the embedding table would index out of range (or, worse, score garbage)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UserError(
            f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding table only {vocab:,}: "
            f"they do not belong together. Pass the tokenizer the model was trained with (--tokenizer DIR)."
        )


def run_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], *, limit: int | None = None,
              num_fewshot: int = 0, batch_size: int = 8, max_length: int | None = None,
              bootstrap_iters: int = 1000, root: Path | None = None, samples_out: Path | None = None,
              lm_class: Any = None, lm_kwargs: dict | None = None) -> dict[str, Any]:
    """{task: {n, acc, acc_stderr, ..., p_choices_gold, ...}} for `tasks` on `model` (left in its previous mode).
    Random states (python, numpy, torch) are restored afterwards: lm-eval seeds them, and a
    training run that evaluates mid-way must continue exactly as if it had not. `lm_class`: an HFLM
    subclass to score through (e.g. one that prepends soft prompts, rewarm.repair.idp) with `lm_kwargs`."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict

    from rewarm.downstream.tasks import expand, task_configs

    check_tokenizer(model, tokenizer)
    names = expand(tasks, root)
    specs, manager = task_configs(names, root)
    was_training = model.training
    started = time.perf_counter()
    with _preserved_rng(), _quiet_lm_eval():
        task_objs = get_task_dict(specs, manager)
        lm = (lm_class or HFLM)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                                **(lm_kwargs or {}))
        out = simple_evaluate(model=lm, tasks=list(task_objs.values()), task_manager=manager, limit=limit or None,
                              num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=bootstrap_iters)
    model.train(was_training)
    results: dict[str, Any] = {}
    sample_rows: list[dict] = []
    for name in [n for n in names if n in task_objs]:
        task = task_objs[name]
        row = _lm_eval_metrics(out["results"].get(name, {}))
        samples = out["samples"].get(name, [])
        row["n"] = len(samples)
        if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice":
            per_sample = [choice_quantities(s, gold_indices(task, s["doc"]), len(task.doc_to_choice(s["doc"])))
                          for s in samples]
            row.update(summarise(per_sample))
        results[name] = row
        sample_rows += _sample_rows(name, task, samples)
    if samples_out is not None:
        atomic.write_jsonl(samples_out, sample_rows)
    if any(n.startswith("mmlu_") for n in results) and "mmlu" in tasks:
        results["mmlu"] = pooled({k: v for k, v in results.items() if k.startswith("mmlu_")})
    log.info("downstream: %d task(s) in %.1f s", len(results), time.perf_counter() - started)
    return results


def gold_indices(task, doc: dict) -> list[int]:
    """The correct choice(s) of a multiple-choice doc, exactly as lm-eval's process_results finds them."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    golds = gold if isinstance(gold, list) else [gold]
    out = []
    for g in golds:
        if isinstance(g, str):
            g = choices.index(g) if g in choices else -1
        if not 0 <= int(g) < len(choices):
            raise UserError(f"task `{task.config.task}`: a gold label {g!r} is not among the {len(choices)} choices.")
        out.append(int(g))
    return out


def choice_quantities(sample: dict, gold: list[int], n_choices: int) -> dict[str, float]:
    """Per-sample logp_gold, p_gold, p_choices_gold, p_incorrect, brier from the logged (ll, is_greedy)
    pairs; only the first `n_choices` are the choices (mutual-info tasks append unconditional ones)."""
    ll = np.array([float(r[0]) for r in sample["filtered_resps"]][:n_choices], dtype=np.float64)
    is_gold = np.zeros(len(ll), dtype=bool)
    is_gold[gold] = True
    shifted = np.exp(ll - ll.max())
    p_choices = shifted / shifted.sum()
    target = is_gold / is_gold.sum()
    logp_gold = float(np.logaddexp.reduce(ll[is_gold]))
    return {
        "logp_gold": logp_gold,
        "p_gold": math.exp(logp_gold),
        "p_choices_gold": float(p_choices[is_gold].sum()),
        "p_incorrect": float(np.exp(ll[~is_gold]).sum()),
        "brier": float(((p_choices - target) ** 2).sum()),
    }


def summarise(per_sample: list[dict[str, float]]) -> dict[str, float | None]:
    """Mean and standard error (ddof=1, lm-eval's mean_stderr) of each per-sample quantity."""
    out: dict[str, float] = {}
    for key in CHOICE_METRICS:
        xs = np.array([s[key] for s in per_sample], dtype=np.float64)
        out[key] = float(xs.mean()) if len(xs) else None
        out[f"{key}_stderr"] = float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None
    return out


def pooled(rows: dict[str, dict]) -> dict[str, float]:
    """Sample-weighted mean over subtasks (lm-eval's weight_by_size), with the pooled standard error."""
    total = sum(r["n"] for r in rows.values())
    out: dict[str, float] = {"n": total, "subtasks": len(rows)}
    keys = [k for k, v in next(iter(rows.values())).items() if isinstance(v, float) and not k.endswith("_stderr")]
    for k in keys:
        if all(isinstance(r.get(k), float) for r in rows.values()):
            out[k] = sum(r[k] * r["n"] for r in rows.values()) / total
            ses = [r.get(f"{k}_stderr") for r in rows.values()]
            if all(isinstance(s, float) and math.isfinite(s) for s in ses):
                out[f"{k}_stderr"] = math.sqrt(sum((s * r["n"]) ** 2 for s, r in zip(ses, rows.values()))) / total
    return out


def _lm_eval_metrics(row: dict) -> dict[str, Any]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' -> 'acc' / 'acc_stderr'; other filters keep their suffix."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        name = metric if filt == "none" else f"{metric},{filt}"
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            out[name] = None  # lm-eval writes "N/A" for a stderr it did not compute
    return out


def _sample_rows(name: str, task, samples: list[dict]) -> list[dict]:
    """lm-eval's per-sample output, trimmed to what the summary is computed from (one JSON line each)."""
    mc = getattr(task, "OUTPUT_TYPE", None) == "multiple_choice"
    rows = []
    for s in samples:
        row = {"task": name, "doc_id": s["doc_id"], "target": str(s["target"]),
               "resps": [[float(r[0]), bool(r[1])] if isinstance(r, (list, tuple)) else str(r) for r in s["filtered_resps"]]}
        if mc:
            row["gold"] = gold_indices(task, s["doc"])
        row.update({m: s[m] for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))})
        rows.append(row)
    return rows


@contextlib.contextmanager
def _preserved_rng():
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per task about custom datasets and one about model instances, and
    `datasets` draws a bar for each prompt-building pass; keep errors (and lm-eval's own bars) only."""
    from datasets.utils import logging as ds_logging

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, ds_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            ds_logging.enable_progress_bar()

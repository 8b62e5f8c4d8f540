"""`rewarm demo --model smollm2-135m`: continual pre-training of a real LLM on a new domain,
with forgetting measured on what it already knew.

- New domain (trained on): Shakespeare + the King James Bible, Early Modern English.
- Old skills (held out, evaluated from step 0 on): Python standard-library code (SmolLM2 was
  pre-trained on code; also the replay source) and modern encyclopedic English (the Wikipedia
  passages of BoolQ's validation split; evaluated only, never trained on).
- Downstream tasks at step 0 (scored once: every run starts from the same weights) and at the
  end of each run: hellaswag, arc_easy, piqa, sciq, winogrande.
- Runs: max LR low / mid / high (short warmup, cosine to 0.1x), constant LR at the low value,
  5% code replay at mid. The findings that apply (b, c, f, s) are computed exactly as for the
  tiny demo, once with forgetting read on code and once on encyclopedic English.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from rewarm import corpora
from rewarm import findings as F
from rewarm.data.prepare import prepare
from rewarm.errors import UserError
from rewarm.sweep import PlannedRun, run_all

log = logging.getLogger(__name__)

TASKS = ["hellaswag", "arc_easy", "piqa", "sciq", "winogrande"]
PROMPTS = ["Thou shalt not", "def read_config(path):", "The capital of France is"]
NEW, CODE, WIKI = "early_modern", "code", "wiki"

SIZES = {
    # Scoring the five tasks (200 examples each) takes ~8 minutes per round on 2 CPU cores and a study
    # needs six rounds (step 0 once, the end of each run), so the tasks, not training, set the time;
    # the training budget is the smallest that shows adaptation and forgetting clearly (README).
    "full": dict(seq_len=256, batch=4, steps=24, warmup=2, eval_tokens=1536, eval_interval=8, dense=1,
                 task_limit=200, code_bytes=3_000_000, lrs=(1e-4, 3e-4, 1e-3), sample_tokens=24),
    # a smoke run of the same pipeline within 10 minutes: no dense evals, short samples
    "quick": dict(seq_len=64, batch=4, steps=6, warmup=1, eval_tokens=256, eval_interval=3, dense=0,
                  task_limit=10, code_bytes=1_000_000, lrs=(1e-4, 3e-4, 1e-3), sample_tokens=8),
}

ROLES = F.Roles(reference="lr_mid", max_lrs=["lr_low", "lr_mid", "lr_high"], constant="constant_low",
                replay="replay5pct", upstream=WIKI, downstream=NEW)
APPLICABLE = ("b", "c", "f", "s")  # no warmup sweep, earlier checkpoints or scratch run in this study


def build_data(out: Path, model_dir: str, size: dict, progress: bool) -> dict[str, Path]:
    """The three corpora tokenized with the model's own tokenizer (reused when already there)."""
    new = [str(p) for p in corpora.shakespeare_modern()] + [str(corpora.king_james_bible())]
    code = [str(p) for p in corpora.python_stdlib(limit_bytes=size["code_bytes"])]
    out.mkdir(parents=True, exist_ok=True)
    wiki = out / "wiki_passages.jsonl"
    if not wiki.is_file():  # written once: a rewritten file would look like new input to `prepare`
        corpora.wikipedia_passages(wiki)
    shards = {NEW: out / "data" / NEW, CODE: out / "data" / CODE, WIKI: out / "data" / WIKI}
    prepare(new, model_dir, shards[NEW], val_tokens=60_000, seed=0, progress=progress)
    prepare(code, model_dir, shards[CODE], val_tokens=60_000, seed=0, progress=progress)
    # eval only: nearly all of it held out (the train split is a token stub that nothing reads)
    prepare([str(wiki)], model_dir, shards[WIKI], val_fraction=0.99, seed=0, progress=progress)
    return shards


def plan(out: Path, model_dir: str, size: dict, shards: dict[str, Path], precision: str) -> list[PlannedRun]:
    low, mid, high = size["lrs"]

    def run(name: str, max_lr: float, schedule: str = "cosine", warmup: float | None = None,
            replay: bool = False, at_start: bool = False) -> PlannedRun:
        train_on = [{"name": NEW, "path": str(shards[NEW]), "weight": 0.95 if replay else 1.0}]
        if replay:
            train_on.append({"name": CODE, "path": str(shards[CODE]), "weight": 0.05})
        raw = {
            "out_dir": str(out / "runs" / name), "seed": 0, "init": "weights", "model": {"path": model_dir},
            "data": {"train": train_on, "eval": [{"name": n, "path": str(p)} for n, p in shards.items()]},
            "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"],
                      "max_steps": size["steps"], "precision": precision},
            "schedule": {"name": schedule, "max_lr": max_lr, "min_lr": max_lr / 10 if schedule == "cosine" else max_lr,
                         "warmup": size["warmup"] if warmup is None else warmup},
            "eval": {"interval": size["eval_interval"], "interval_warmup": size["dense"],
                     "dense_until": max(size["steps"] // 10, 1), "tokens": size["eval_tokens"], "batch": 8,
                     "downstream": {"tasks": TASKS, "limit": size["task_limit"], "batch": 16, "at_start": at_start},
                     "samples": {"prompts": PROMPTS, "max_new_tokens": size["sample_tokens"]}},
            "checkpoint": {"interval": 0, "keep_last": 1},
        }
        return PlannedRun(name, raw)

    return [run("lr_mid", mid, at_start=True), run("lr_low", low), run("lr_high", high),
            run("constant_low", low, schedule="constant", warmup=0), run("replay5pct", mid, replay=True)]


def _findings(runs_dir: Path, names: list[str]) -> list[tuple[str, list[F.Finding]]]:
    from dataclasses import replace

    from rewarm.runs import find_runs

    runs = {r.name: r for r in find_runs([str(runs_dir / n) for n in names if (runs_dir / n / "metrics.jsonl").exists()])}
    out = []
    for old in (WIKI, CODE):
        found = F.compute(runs, replace(ROLES, upstream=old))
        out.append((old, [f for f in found if f.id in APPLICABLE]))
    return out


def run_study(out: Path, model: str, quick: bool = False, progress: bool = True, precision: str = "auto",
              jobs: int | None = None, task_limit: int | None = None) -> dict:
    from rewarm.model_store import resolve
    from rewarm.report import report

    t0 = time.time()
    model_dir = resolve(model, "--model")
    if not Path(model_dir).is_dir():
        raise UserError(f"--model {model}: not an installed model or a local HF directory "
                          f"(install one with `rewarm models install smollm2-135m`).")
    size = dict(SIZES["quick" if quick else "full"])
    if task_limit is not None:
        if task_limit < 1:
            raise UserError(f"--task-limit must be at least 1, got {task_limit}.")
        size["task_limit"] = task_limit
    shards = build_data(out, model_dir, size, progress)
    runs = plan(out, model_dir, size, shards, precision)
    # the reference scores the tasks at step 0 for everyone, so it runs first, alone
    results = run_all(runs[:1], progress=progress)
    results.update(run_all(runs[1:], progress=progress, jobs=jobs or max(1, min(2, len(runs) - 1))))
    runs_dir = out / "runs"
    roles_file = F.write_roles(runs_dir, ROLES)
    done = [str(runs_dir / r.name) for r in runs if (runs_dir / r.name / "metrics.jsonl").exists()]
    title = f"rewarm real-model study: {Path(model_dir).name} continued on Early Modern English"
    md = report(done, out / "report", fmt="md", title=title, roles_file=str(roles_file))
    report(done, out / "report", fmt="html", title=title, roles_file=str(roles_file))
    found = _findings(runs_dir, [r.name for r in runs])
    from rewarm.report import task_change_table
    from rewarm.runs import find_runs

    header, rows = task_change_table(find_runs(done))
    tasks_md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                         ["| " + " | ".join(r) + " |" for r in rows])
    result = {
        "model": model_dir, "runs_dir": str(runs_dir), "report": str(md), "runs": results,
        "findings": {old: [{"id": f.id, "claim": f.claim, "verdict": f.verdict, "detail": f.detail} for f in fs]
                     for old, fs in found},
        "findings_markdown": "\n\n".join(f"Forgetting read on `{old}`:\n\n{F.as_markdown(fs)}" for old, fs in found),
        "tasks_markdown": tasks_md,
        "wall_time_s": round(time.time() - t0, 1), "size": "quick" if quick else "full", "precision": precision,
        "settings": size,
    }
    (out / "study_result.json").write_text(json.dumps(result, indent=2))
    return result

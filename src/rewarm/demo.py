"""`rewarm demo`: the papers' experiments, reproduced small on a laptop CPU, on real text.

Upstream = English literature (Shakespeare, modern spelling + King James Bible); downstream =
Python standard-library code. Steps:
1. train a byte-level BPE on a sample of both and prepare both corpora;
2. pre-train a `tiny` GPT-NeoX on upstream (warmup + cosine), keeping checkpoints at ~7%,
   ~19% and 100% of training (Pythia's step 10k / 27k / 143k of 143k);
3. continue on downstream from the final checkpoint: warmup {0, 2, 4, 8} steps at the middle max
   LR (the paper's 0 / 0.5 / 1 / 2 % in shape; distinct, unlike percentages of 80 steps); max LR
   {low, mid, high} (0.5 : 1 : 2) at 4 warmup steps; the reference (mid, 4 steps) three more times
   with other seeds (data order) for the seed noise; constant LR at the pre-training min LR; 5% replay
   of upstream; the 7% and 19% checkpoints; and from scratch — min LR = 0.1 x max LR throughout;
4. write the report and print the findings table computed from these runs' numbers, each verdict
   judged against the seed noise (docs/findings.md).
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

from rewarm import corpora
from rewarm import findings as F
from rewarm.data.prepare import prepare
from rewarm.data.sources import ReadStats, file_documents, limit_chars
from rewarm.sweep import PlannedRun, run_all
from rewarm.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

SIZES = {
    # tokens per step = batch x seq_len; the pre-training max LR is the continual "mid" max LR
    "full": dict(vocab=8192, seq_len=128, batch=16, pretrain_steps=400, continual_steps=80,
                 code_bytes=6_000_000, eval_tokens=8192, max_lr=3e-3),
    "quick": dict(vocab=4096, seq_len=64, batch=16, pretrain_steps=150, continual_steps=32,
                  code_bytes=1_500_000, eval_tokens=4096, max_lr=3e-3),
}


def build_data(out: Path, size: dict, progress: bool) -> dict[str, Path]:
    """Tokenizer + upstream/downstream shards under out/ (reused when already there)."""
    upstream = [str(p) for p in corpora.shakespeare_modern()] + [str(corpora.king_james_bible())]
    code = [str(p) for p in corpora.python_stdlib(limit_bytes=size["code_bytes"])]
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        stats = ReadStats()
        sample = itertools.chain(
            limit_chars(file_documents([Path(p) for p in upstream], "text", stats), 2_000_000),
            limit_chars(file_documents([Path(p) for p in code], "text", stats), 2_000_000),
        )
        train_tokenizer(sample, size["vocab"], tok_dir)
    shards = {}
    for name, inputs in (("upstream", upstream), ("downstream", code)):
        shards[name] = out / "data" / name
        prepare(inputs, str(tok_dir), shards[name], val_tokens=40_000, seed=0, progress=progress)
    return shards


def _base(out_dir: Path, size: dict, shards: dict[str, Path], steps: int, train_on: str, precision: str = "auto",
          evals: int = 6) -> dict:
    return {
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"preset": "tiny"},
        "data": {"train": [{"name": train_on, "path": str(shards[train_on])}],
                 "eval": [{"name": n, "path": str(p)} for n, p in shards.items()]},
        "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"], "max_steps": steps,
                  "precision": precision},
        "eval": {"interval": max(steps // evals, 1), "interval_warmup": max(steps // 40, 1), "dense_until": 0.1,
                 "tokens": size["eval_tokens"], "batch": 16},
        "checkpoint": {"interval": 0, "keep_last": 1},
    }


WARMUP_STEPS = [0, 2, 4, 8]  # the demo's warmup sweep (steps); the paper's 0 / 0.5 / 1 / 2 % in shape


def plan(out: Path, size: dict, shards: dict[str, Path], precision: str = "auto") -> tuple[PlannedRun, list[PlannedRun]]:
    runs_dir = out / "runs"
    P, C, lr = size["pretrain_steps"], size["continual_steps"], size["max_lr"]
    keep = [round(0.07 * P), round(0.19 * P)]
    pre = _base(runs_dir / "pretrain", size, shards, P, "upstream", precision)
    pre["schedule"] = {"name": "cosine", "max_lr": lr, "min_lr": lr / 10, "warmup": 0.02}
    pre["checkpoint"] = {"interval": 0, "keep_last": 1, "keep_steps": keep}
    pretrain = PlannedRun("pretrain", pre)
    final = str(runs_dir / "pretrain" / "final")

    def continual(name: str, max_lr: float, warmup: float, **changes) -> PlannedRun:
        # 4 regular evals + the dense ones over the first 10% (where re-warming spikes)
        raw = _base(runs_dir / name, size, shards, C, "downstream", precision, evals=4)
        raw.update(init="weights", model={"path": final})
        raw["train"]["num_threads"] = 1  # the same numbers however many run side by side (threads change rounding)
        raw["schedule"] = {"name": "cosine", "max_lr": max_lr, "min_lr": max_lr / 10, "warmup": warmup}
        for key, value in changes.items():
            raw[key] = value
        return PlannedRun(name, raw)

    ckpt = lambda step: str(runs_dir / "pretrain" / "checkpoints" / f"step_{step:06d}")  # noqa: E731
    R = F.DEMO_ROLES
    ref_warmup = WARMUP_STEPS[2]
    # warmup sweep at the mid max LR, in steps: distinct and >= 2 apart (0.5 % of 80 steps would round to 0)
    runs = [continual(name, lr, w) for name, w in zip(R.warmups, WARMUP_STEPS)]
    runs += [continual(R.max_lrs[0], lr / 2, ref_warmup), continual(R.max_lrs[2], lr * 2, ref_warmup)]
    # replicates of the reference: the seed changes the data order (seed noise for every verdict)
    for name in R.reference_seeds[1:]:
        rep = continual(name, lr, ref_warmup)
        rep.raw["seed"] = int(name.rsplit("seed", 1)[1])
        runs.append(rep)
    const = continual(R.constant, lr / 10, 0)
    const.raw["schedule"] = {"name": "constant", "max_lr": lr / 10, "min_lr": lr / 10, "warmup": 0}
    runs.append(const)
    replay = continual(R.replay, lr, ref_warmup)
    replay.raw["data"]["train"] = [{"name": "downstream", "path": str(shards["downstream"]), "weight": 0.95},
                                   {"name": "upstream", "path": str(shards["upstream"]), "weight": 0.05}]
    runs.append(replay)
    runs += [continual(R.early_starts[0], lr, ref_warmup, model={"path": ckpt(keep[0])}),
             continual(R.early_starts[1], lr, ref_warmup, model={"path": ckpt(keep[1])})]
    runs.append(continual(R.scratch, lr, ref_warmup, init="scratch", model={"preset": "tiny"}))
    return pretrain, runs


def plot_pretraining(run, out: Path) -> Path:
    """Upstream and downstream held-out loss over pre-training: flat at the end means the start is well trained."""
    from rewarm.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("upstream", "-"), ("downstream", "--")):
        pts = run.series(name)
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], style, marker=".", label=name)
    for step in run.config.get("checkpoint", {}).get("keep_steps", []):
        ax.axvline(step * run.config["train"]["global_batch"] * run.config["train"]["seq_len"] / 1e6, color="#aaa",
                   linewidth=0.8, linestyle=":")
    ax.set_xlabel("pre-training tokens (millions); dotted: the early checkpoints")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("pre-training on upstream text")
    ax.grid(alpha=0.3)
    ax.legend()
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def default_jobs(n_runs: int) -> int:
    """One single-thread continual run per core: small models leave a second thread half idle."""
    import os

    return max(1, min(os.cpu_count() or 1, n_runs))


def run_demo(out: Path, quick: bool = False, progress: bool = True, precision: str = "auto",
             jobs: int | None = None) -> dict:
    from rewarm.report import report
    from rewarm.runs import RunData, find_runs

    t0 = time.time()
    size = SIZES["quick" if quick else "full"]
    shards = build_data(out, size, progress)
    pretrain, runs = plan(out, size, shards, precision)
    results = run_all([pretrain], progress=progress)
    if results["pretrain"].startswith("failed"):
        raise RuntimeError(f"pre-training failed: {results['pretrain']}")
    results.update(run_all(runs, progress=progress, jobs=jobs or default_jobs(len(runs))))
    runs_dir = out / "runs"
    roles_file = F.write_roles(runs_dir, F.DEMO_ROLES)
    continual = [str(runs_dir / r.name) for r in runs if (runs_dir / r.name / "metrics.jsonl").exists()]
    title = "rewarm demo: prose → code continual pre-training"
    pre_png = plot_pretraining(RunData.load(runs_dir / "pretrain"), out / "report" / "pretraining.png")
    extra = {"Pre-training (the starting point of every continual run)": pre_png}
    md = report(continual, out / "report", fmt="md", title=title, roles_file=str(roles_file), extra_images=extra)
    report(continual, out / "report", fmt="html", title=title, roles_file=str(roles_file), extra_images=extra)
    found = F.compute({r.name: r for r in find_runs(continual)}, F.DEMO_ROLES)
    wall = time.time() - t0
    result = {
        "runs_dir": str(runs_dir),
        "report": str(md),
        "runs": results,
        "findings": [{"id": f.id, "claim": f.claim, "verdict": f.verdict, "detail": f.detail} for f in found],
        "findings_markdown": F.as_markdown(found),
        "wall_time_s": round(wall, 1),
        "size": "quick" if quick else "full",
        "precision": precision,
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result

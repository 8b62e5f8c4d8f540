"""`rewarm demo`: the papers' experiments, reproduced small on a laptop CPU, on real text.

Upstream = English literature (Shakespeare, modern spelling + King James Bible); downstream =
Python standard-library code. Steps:
1. train a byte-level BPE on a sample of both and prepare both corpora;
2. pre-train a `tiny` GPT-NeoX on upstream (warmup + cosine), keeping checkpoints at ~7%,
   ~19% and 100% of training (Pythia's step 10k / 27k / 143k of 143k);
3. continue on downstream from the final checkpoint: warmup {0, 0.5, 1, 2}% at the middle max
   LR; max LR {low, mid, high} (0.5 : 1 : 2) at 1% warmup; constant LR at the pre-training
   min LR; 5% replay of upstream; the 7% and 19% checkpoints; and from scratch — min LR =
   0.1 x max LR throughout;
4. write the report and print the findings table computed from these runs' numbers.
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


def _base(out_dir: Path, size: dict, shards: dict[str, Path], steps: int, train_on: str) -> dict:
    return {
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"preset": "tiny"},
        "data": {"train": [{"name": train_on, "path": str(shards[train_on])}],
                 "eval": [{"name": n, "path": str(p)} for n, p in shards.items()]},
        "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"], "max_steps": steps},
        "eval": {"interval": max(steps // 6, 1), "interval_warmup": max(steps // 40, 1), "dense_until": 0.1,
                 "tokens": size["eval_tokens"], "batch": 16},
        "checkpoint": {"interval": 0, "keep_last": 1},
    }


def plan(out: Path, size: dict, shards: dict[str, Path]) -> tuple[PlannedRun, list[PlannedRun]]:
    runs_dir = out / "runs"
    P, C, lr = size["pretrain_steps"], size["continual_steps"], size["max_lr"]
    keep = [round(0.07 * P), round(0.19 * P)]
    pre = _base(runs_dir / "pretrain", size, shards, P, "upstream")
    pre["schedule"] = {"name": "cosine", "max_lr": lr, "min_lr": lr / 10, "warmup": 0.02}
    pre["checkpoint"] = {"interval": 0, "keep_last": 1, "keep_steps": keep}
    pretrain = PlannedRun("pretrain", pre)
    final = str(runs_dir / "pretrain" / "final")

    def continual(name: str, max_lr: float, warmup: float, **changes) -> PlannedRun:
        raw = _base(runs_dir / name, size, shards, C, "downstream")
        raw.update(init="weights", model={"path": final})
        raw["schedule"] = {"name": "cosine", "max_lr": max_lr, "min_lr": max_lr / 10, "warmup": warmup}
        for key, value in changes.items():
            raw[key] = value
        return PlannedRun(name, raw)

    ckpt = lambda step: str(runs_dir / "pretrain" / "checkpoints" / f"step_{step:06d}")  # noqa: E731
    runs = [continual(f"lr_mid_warmup{w}pct", lr, w / 100) for w in (0, 0.5, 1, 2)]
    runs += [continual("lr_low_warmup1pct", lr / 2, 0.01), continual("lr_high_warmup1pct", lr * 2, 0.01)]
    const = continual(F.CONSTANT, lr / 10, 0.0)
    const.raw["schedule"] = {"name": "constant", "max_lr": lr / 10, "min_lr": lr / 10, "warmup": 0}
    runs.append(const)
    replay = continual(F.REPLAY, lr, 0.01)
    replay.raw["data"]["train"] = [{"name": "downstream", "path": str(shards["downstream"]), "weight": 0.95},
                                   {"name": "upstream", "path": str(shards["upstream"]), "weight": 0.05}]
    runs.append(replay)
    runs += [continual(F.EARLY_STARTS[0], lr, 0.01, model={"path": ckpt(keep[0])}),
             continual(F.EARLY_STARTS[1], lr, 0.01, model={"path": ckpt(keep[1])})]
    scratch = continual(F.SCRATCH, lr, 0.01, init="scratch", model={"preset": "tiny"})
    runs.append(scratch)
    return pretrain, runs


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> dict:
    from rewarm.report import report
    from rewarm.runs import find_runs

    t0 = time.time()
    size = SIZES["quick" if quick else "full"]
    shards = build_data(out, size, progress)
    pretrain, runs = plan(out, size, shards)
    results = run_all([pretrain], progress=progress)
    if results["pretrain"].startswith("failed"):
        raise RuntimeError(f"pre-training failed: {results['pretrain']}")
    results.update(run_all(runs, progress=progress))
    runs_dir = out / "runs"
    continual = [str(runs_dir / r.name) for r in runs if (runs_dir / r.name / "metrics.jsonl").exists()]
    md = report(continual, out / "report", fmt="md", title="rewarm demo: prose → code continual pre-training")
    report(continual, out / "report", fmt="html", title="rewarm demo: prose → code continual pre-training")
    found = F.compute({r.name: r for r in find_runs(continual)})
    wall = time.time() - t0
    result = {
        "runs_dir": str(runs_dir),
        "report": str(md),
        "runs": results,
        "findings": [{"id": f.id, "claim": f.claim, "verdict": f.verdict, "detail": f.detail} for f in found],
        "findings_markdown": F.as_markdown(found),
        "wall_time_s": round(wall, 1),
        "size": "quick" if quick else "full",
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result

"""`rewarm demo`: a real continual pre-training job on the embedded default, end to end.

Upstream = English literature (Shakespeare + King James Bible), downstream = Python
standard-library code. Trains a byte-level BPE, prepares both corpora, pre-trains a
`tiny` GPT-NeoX on upstream, then continues it on downstream with a re-warmed cosine
schedule while evaluating both, and prints what it adapted and what it forgot.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

from rewarm import corpora
from rewarm.config import config_from_dict
from rewarm.data.prepare import prepare
from rewarm.data.sources import ReadStats, file_documents
from rewarm.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

SIZES = {
    # steps: pre-training / continual; tokens per step = batch x seq_len
    "full": dict(vocab=8192, seq_len=128, batch=16, pretrain_steps=400, continual_steps=200, code_bytes=6_000_000),
    "quick": dict(vocab=4096, seq_len=64, batch=16, pretrain_steps=120, continual_steps=60, code_bytes=1_500_000),
}


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the built-in continual pre-training demo on real corpora")
    p.add_argument("--out", default="demo_out", help="working directory (data, tokenizer, runs)")
    p.add_argument("--quick", action="store_true", help="fewer steps and tokens, same pipeline")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    summary = run_demo(Path(args.out), quick=args.quick, progress=not args.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def build_data(out: Path, size: dict, progress: bool) -> dict[str, Path]:
    """Tokenizer + upstream/downstream shards under out/ (reused when already there)."""
    upstream = [str(p) for p in corpora.shakespeare_modern()] + [str(corpora.king_james_bible())]
    code = [str(p) for p in corpora.python_stdlib(limit_bytes=size["code_bytes"])]
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        stats = ReadStats()
        sample = itertools.chain(
            _limit(file_documents([Path(p) for p in upstream], "text", stats), 2_000_000),
            _limit(file_documents([Path(p) for p in code], "text", stats), 2_000_000),
        )
        train_tokenizer(sample, size["vocab"], tok_dir)
    shards = {}
    for name, inputs in (("upstream", upstream), ("downstream", code)):
        shards[name] = out / "data" / name
        prepare(inputs, str(tok_dir), shards[name], val_tokens=40_000, seed=0, progress=progress)
    return shards


def _limit(docs, max_chars: int):
    seen = 0
    for d in docs:
        if seen >= max_chars:
            return
        seen += len(d)
        yield d


def base_config(out_dir: Path, size: dict, shards: dict[str, Path], steps: int) -> dict:
    return {
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"preset": "tiny"},
        "data": {"eval": [{"name": n, "path": str(p)} for n, p in shards.items()]},
        "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"], "max_steps": steps},
        "eval": {"interval": max(steps // 10, 1), "interval_warmup": max(steps // 50, 1), "tokens": 16384, "batch": 16},
    }


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> dict:
    from rewarm.train import train

    t0 = time.time()
    size = SIZES["quick" if quick else "full"]
    shards = build_data(out, size, progress)
    runs = out / "runs"

    pre = base_config(runs / "pretrain", size, shards, size["pretrain_steps"])
    pre["data"]["train"] = [{"name": "upstream", "path": str(shards["upstream"])}]
    pre["schedule"] = {"name": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.05}
    pre_run = _train_once(pre, train, progress)

    cont = base_config(runs / "continual", size, shards, size["continual_steps"])
    cont.update(init="weights")
    cont["model"] = {"path": str(pre_run.final)}
    cont["data"]["train"] = [{"name": "downstream", "path": str(shards["downstream"])}]
    cont["schedule"] = {"name": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.01}
    cont_run = _train_once(cont, train, progress)

    s = json.loads(cont_run.summary.read_text())
    result = {
        "run_dir": str(cont_run.path),
        "summary": str(cont_run.summary),
        "pretrain_run": str(pre_run.path),
        "forgetting_upstream": s["final"]["upstream"] - s["initial"]["upstream"],
        "adaptation_downstream": s["initial"]["downstream"] - s["final"]["downstream"],
        "final_loss": s["final"],
        "step0_loss": s["initial"],
        "wall_time_s": round(time.time() - t0, 1),
    }
    return result


def _train_once(raw: dict, train, progress: bool):
    """Train unless this run already finished (re-running the demo reuses finished runs)."""
    from rewarm.rundir import RunDir

    run = RunDir(raw["out_dir"])
    if run.summary.exists():
        log.info("%s already finished; reusing it", run.path)
        return run
    if run.has_started():
        raw = dict(raw, init="resume") if run.checkpoints.exists() else raw
    return train(config_from_dict(raw), overwrite=raw.get("init") != "resume", progress=progress)

"""Self-generated replay on a real LLM: SmolLM2-135M continued on Early Modern English.

    python benchmarks/self_replay_smollm2.py [--out DIR] [--replay-tokens 4096]

Needs `rewarm models install smollm2-135m`. The real-model study's data (`rewarm demo --model`:
Shakespeare + King James Bible as the new domain; Python stdlib code and Wikipedia passages held
out as the old skills) and its `lr_mid` training settings (24 steps x 4 x 256 tokens, max LR 3e-4,
cosine to 0.1x, precision auto), without the downstream tasks (they do not change training). Four
runs: no replay, 5% real replay (code, as in the study's `replay5pct`), and 5% of the model's own
unconditional samples (`rewarm replay generate`, temperature 1), and the same with
`replay.kl_coef: 1` (KL to the initial model on those rows). Prints the generation cost and,
per run, the final loss and the change from step 0 on each eval set.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rewarm.model_store import resolve
from rewarm.real_study import CODE, NEW, SIZES, WIKI, build_data, plan
from rewarm.replay.generate import generate_replay
from rewarm.runs import RunData
from rewarm.sweep import run_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("self_replay_smollm2_out"))
    ap.add_argument("--replay-tokens", type=int, default=4096)
    ap.add_argument("--runs", default="lr_mid,replay5pct,self_replay5pct,self_replay5pct_kl",
                    help="which of the four to train (~3 minutes each here, bf16); the study's own lr_mid and "
                         "replay5pct are the same configs")
    args = ap.parse_args()
    model_dir = resolve("smollm2-135m", "model")
    size = dict(SIZES["full"])
    shards = build_data(args.out, model_dir, size, progress=False)
    replay_dir = args.out / "data" / "self_replay"
    if not (replay_dir / "meta.json").exists():
        started = time.perf_counter()
        generate_replay(model_dir, replay_dir, args.replay_tokens, unconditional=True, length=128, batch=16,
                        progress=False)
        print(f"generation took {time.perf_counter() - started:.0f} s")

    g = json.loads((replay_dir / "meta.json").read_text())["generated"]
    print(f"self-replay: {g['tokens_generated']:,} tokens in {g['samples']} samples at {g['tokens_per_s']:.1f} tokens/s "
          f"from {model_dir}")
    runs = {r.name: r for r in plan(args.out, model_dir, size, shards, "auto")}
    chosen = [runs["lr_mid"], runs["replay5pct"]]
    self_run = plan(args.out, model_dir, size, shards, "auto")[-1]  # a fresh replay5pct to edit
    self_run.name = "self_replay5pct"
    self_run.raw["out_dir"] = str(args.out / "runs" / "self_replay5pct")
    self_run.raw["data"]["train"][1] = {"name": "self_replay", "path": str(replay_dir), "weight": 0.05}
    chosen.append(self_run)
    kl_run = plan(args.out, model_dir, size, shards, "auto")[-1]
    kl_run.name = "self_replay5pct_kl"
    kl_run.raw["out_dir"] = str(args.out / "runs" / kl_run.name)
    kl_run.raw["data"]["train"][1] = {"name": "self_replay", "path": str(replay_dir), "weight": 0.05}
    kl_run.raw["replay"] = {"kl_coef": 1.0}
    chosen.append(kl_run)
    chosen = [r for r in chosen if r.name in args.runs.split(",")]
    for r in chosen:
        r.raw["eval"]["downstream"] = {"tasks": []}
        r.raw["eval"]["samples"] = {"prompts": []}
    started = time.perf_counter()
    results = run_all(chosen, progress=False, jobs=1)
    print(f"{len(chosen)} runs: {time.perf_counter() - started:.0f} s; {results}")
    print(f"\n{'run':<18}" + "".join(f"{s + ' final':>18}{'Δ':>9}" for s in (NEW, CODE, WIKI)))
    for r in chosen:
        data = RunData.load(r.out_dir)
        print(f"{r.name:<18}" + "".join(f"{data.final(s):>18.4f}{data.final(s) - data.start(s):>+9.4f}"
                                        for s in (NEW, CODE, WIKI)))


if __name__ == "__main__":
    main()

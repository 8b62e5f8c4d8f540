"""Run health on the demo: flatness of its checkpoints, the collapse alarm's ME-PPL, and self-replay.

    python benchmarks/run_health.py DEMO_OUT [--out DIR] [--replay-tokens 40000]

DEMO_OUT is a finished `rewarm demo`. Prints
1. flatness: Hutchinson's tr(H) (16 probes, 2,048 upstream held-out tokens, windows of 128) and the
   upstream loss of the pre-trained model and of each continual run's final model;
2. ME-PPL of the 100 built-in sentences for the same models, as a multiple of the pre-trained
   model's: what `eval.collapse` (factor 3 by default) would see in the demo's normal training;
3. self-replay: `rewarm replay generate` from the pre-trained model (unconditional, temperature 1),
   its cost in tokens/s, then the demo's `replay5pct` run again with the 5% upstream replay replaced
   by the model's own samples, and once more with `replay.kl_coef` (KL to the initial model on
   those rows); forgetting and adaptation next to no replay (`lr_mid_warmup4`) and 5% real replay
   (`replay5pct`) from the demo.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from rewarm.analysis.collapse import encode, load_sentences, me_ppl
from rewarm.analysis.flatness import flatness_of_checkpoint
from rewarm.config import config_from_dict
from rewarm.model import load_pretrained
from rewarm.replay.generate import generate_replay
from rewarm.runs import RunData
from rewarm.tokenizer import load_tokenizer
from rewarm.train import train

MODELS = ["pretrain", "lr_low_warmup4", "lr_mid_warmup4", "lr_high_warmup4", "constant_lr", "replay5pct",
          "from_ckpt7pct", "from_ckpt19pct"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--out", type=Path, default=Path("health_out"))
    ap.add_argument("--replay-tokens", type=int, default=40_000)
    ap.add_argument("--kl-coef", type=float, default=1.0, help="replay.kl_coef of the fourth run")
    args = ap.parse_args()
    runs = args.demo_out / "runs"
    upstream = str(args.demo_out / "data" / "upstream")
    tok = load_tokenizer(str(runs / "pretrain" / "final"))
    encoded = encode(tok, load_sentences("builtin"))

    print(f"{'model':<18}{'upstream loss':>14}{'tr(H)':>12}{'± s.e.':>10}{'ME-PPL':>10}{'× pretrain':>12}")
    base = None
    for name in MODELS:
        final = runs / name / "final"
        if not final.exists():
            continue
        f = flatness_of_checkpoint(str(final), [("upstream", upstream)], samples=16, tokens=2048, seq_len=128, cpu=True)
        r = f["upstream"]
        with torch.no_grad():
            value = me_ppl(load_pretrained(str(final)).float(), encoded)
        base = base or value
        print(f"{name:<18}{r['loss']:>14.4f}{r['trace']:>12.1f}{r['stderr']:>10.1f}{value:>10.1f}{value / base:>11.2f}x")

    started = time.perf_counter()
    replay_dir = args.out / "self_replay"
    meta = generate_replay(str(runs / "pretrain" / "final"), replay_dir, args.replay_tokens, unconditional=True,
                           length=128, batch=64, overwrite=True, progress=False)
    g = meta["generated"]
    print(f"\nself-replay: {g['tokens_generated']:,} tokens in {g['samples']:,} samples at {g['tokens_per_s']:,.0f} "
          f"tokens/s ({time.perf_counter() - started:.0f} s), from {runs / 'pretrain' / 'final'}")
    raw = yaml.safe_load((runs / "replay5pct" / "config.yaml").read_text())
    raw["out_dir"] = str(args.out / "runs" / "self_replay5pct")
    raw["data"]["train"] = [s if s["name"] != "upstream" else {"name": "self_replay", "path": str(replay_dir),
                                                                 "weight": s["weight"]} for s in raw["data"]["train"]]
    raw["checkpoint"].update(interval=0, keep_steps=[])
    if not (Path(raw["out_dir"]) / "summary.json").exists():
        train(config_from_dict(raw), overwrite=True, progress=False)
    with_kl = {**raw, "out_dir": str(args.out / "runs" / "self_replay5pct_kl"), "replay": {"kl_coef": args.kl_coef}}
    if not (Path(with_kl["out_dir"]) / "summary.json").exists():
        train(config_from_dict(with_kl), overwrite=True, progress=False)
    print(f"\n{'run':<20}{'replay':<24}{'final upstream':>16}{'final downstream':>18}{'forgetting':>12}{'adaptation':>12}")
    for name, path, what in (("lr_mid_warmup4", runs / "lr_mid_warmup4", "none"),
                             ("replay5pct", runs / "replay5pct", "5% real (upstream)"),
                             ("self_replay5pct", Path(raw["out_dir"]), "5% self-generated"),
                             ("self_replay5pct_kl", Path(with_kl["out_dir"]), f"5% self + KL ×{args.kl_coef:g}")):
        r = RunData.load(path)
        print(f"{name:<20}{what:<24}{r.final('upstream'):>16.4f}{r.final('downstream'):>18.4f}"
              f"{r.forgetting('upstream'):>+12.4f}{r.adaptation('downstream'):>+12.4f}")


if __name__ == "__main__":
    main()

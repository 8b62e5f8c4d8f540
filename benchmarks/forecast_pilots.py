"""Scaling-law forecast, measured: pilot runs → fitted laws → a held-out run ≥ 10× their compute.

    python benchmarks/forecast_pilots.py [--out DIR] [--quick]

Data: the demo's pre-training corpus (Shakespeare + King James Bible), a 1,024-token BPE trained
on it (small, so the output head does not dominate the tiny models' compute). Pilots: GPT-NeoX
shapes of hidden 24 / 32 / 48 (2 layers) at token multipliers M = D/N of 10 / 20 / 40, N the
non-embedding parameters. The held-out run (hidden 96, 2 layers, M 30) has ~12× the largest
pilot's compute (~25 minutes on 2 CPU cores in all). Prints each law's prediction, interval and relative error on the held-out run,
and the early-curve forecast error of the held-out run from 20 / 30 / 50% of its tokens.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from rewarm import corpora
from rewarm.analysis.forecast import fit_laws, non_embedding_params, plot_law, predict, run_forecast
from rewarm.config import config_from_dict
from rewarm.data.prepare import prepare
from rewarm.data.sources import ReadStats, file_documents
from rewarm.sweep import PlannedRun, run_all
from rewarm.tokenizer import train_tokenizer

PILOTS = [(24, 2), (32, 2), (48, 2)]
HELD_OUT = (96, 2)
SIZES = {"full": dict(multipliers=(10, 20, 40), held_out_m=30, seq_len=128, batch=32, eval_tokens=8192),
         "quick": dict(multipliers=(0.5, 1, 2), held_out_m=1, seq_len=64, batch=16, eval_tokens=2048)}


def shape(hidden: int, layers: int) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(hidden // 16, 1),
            "intermediate_size": 4 * hidden}


def config(out: Path, name: str, data: Path, hidden: int, layers: int, steps: int, size: dict) -> dict:
    return {"out_dir": str(out / "runs" / name), "seed": 0, "init": "scratch",
            "model": {"preset": "tiny", "overrides": shape(hidden, layers)},
            "data": {"train": [{"name": "upstream", "path": str(data)}], "eval": [{"name": "upstream", "path": str(data)}]},
            "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"],
                      "max_steps": steps, "precision": "fp32"},
            "schedule": {"name": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.05},
            "eval": {"interval": max(steps // 20, 1), "tokens": size["eval_tokens"], "batch": 32},
            "checkpoint": {"interval": 0, "keep_last": 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="forecast_out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out)
    started = time.perf_counter()
    texts = [str(p) for p in corpora.shakespeare_modern()] + [str(corpora.king_james_bible())]
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(file_documents([Path(t) for t in texts], "text", ReadStats()), 1024, tok)
    data = out / "data" / "upstream"
    prepare(texts, str(tok), data, val_tokens=40_000, seed=0, progress=False)
    per_step = size["seq_len"] * size["batch"]
    probe = config_from_dict(config(out, "probe", data, 32, 2, 1, size))
    planned, n_of = [], {}
    for hidden, layers in PILOTS:
        n = non_embedding_params(probe, "tiny", shape(hidden, layers))
        for m in size["multipliers"]:
            name = f"h{hidden}_M{m}"
            n_of[name] = n
            planned.append(PlannedRun(name, config(out, name, data, hidden, layers, max(1, math.ceil(m * n / per_step)), size)))
    run_all(planned, progress=False, jobs=1)
    law = fit_laws([str(out / "runs" / r.name) for r in planned], out / "law.json", eval_set="upstream")
    n_big = non_embedding_params(probe, "tiny", shape(*HELD_OUT))
    steps = math.ceil(size["held_out_m"] * n_big / per_step)
    big = PlannedRun("held_out", config(out, "held_out", data, *HELD_OUT, steps, size))
    run_all([big], progress=False, jobs=1)
    from rewarm.runs import RunData

    held = RunData.load(out / "runs" / "held_out")
    tokens, measured = held.evals[-1][1], held.final("upstream")
    largest = max(6 * p["params"] * p["tokens"] for p in law["runs"])
    pred = predict(out / "law.json", n_big, tokens)
    plot_law(law, out / "law.png", [{"params": n_big, "tokens": tokens, "loss": measured}])
    print(f"pilots: {len(planned)} runs, N {min(n_of.values()):,}–{max(n_of.values()):,} non-embedding, "
          f"M {', '.join(map(str, size['multipliers']))}; held-out: N {n_big:,}, D {tokens:,} "
          f"({6 * n_big * tokens / largest:.1f}× the largest pilot's compute); wall {time.perf_counter() - started:.0f} s")
    print("\n| law | predicted | 90% interval | measured | relative error |\n|---|---|---|---|---|")
    for name, p in pred["predictions"].items():
        print(f"| {name} | {p['loss']:.4f} | {p['low']:.4f} – {p['high']:.4f} | {measured:.4f} | "
              f"{100 * (p['loss'] - measured) / measured:+.2f}% |")
    print("\n| forecast from | predicted final | measured | relative error |\n|---|---|---|---|")
    for at in (0.2, 0.3, 0.5):
        try:
            row = run_forecast(out / "runs" / "held_out", at, ["upstream"], plot=out / f"forecast_{int(at * 100)}.png")["sets"]["upstream"]
            print(f"| {100 * at:.0f}% | {row['predicted']:.4f} | {row['measured']:.4f} | {100 * row['relative_error']:+.2f}% |")
        except Exception as exc:  # noqa: BLE001  (a forecast that cannot be made is a result too)
            print(f"| {100 * at:.0f}% | – | {measured:.4f} | {exc} |")


if __name__ == "__main__":
    main()

"""Linearize SmolLM2-135M with every recipe and print one comparison table (the README's numbers).

    python benchmarks/linearize_smollm2.py --data DEMO_REAL_OUT/data [--out DIR] [--quick]

DATA is the `data/` folder of a real-model study (`rewarm demo --model smollm2-135m --out D`
writes D/data/{early_modern,code,wiki}, tokenized with SmolLM2's tokenizer). Each recipe is one
ordinary `rewarm linearize` config: trained on code + Early Modern English half and half, held-out
loss on code, wiki (never trained on) and early_modern, three tasks, decoding after a 4k context.
The teacher's side of the comparison is scored once and shared (`compare_teacher_cache`).
Needs `rewarm models install smollm2-135m` and `rewarm tasks install`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

RECIPES = ["lolcats_hybrid", "liger", "lolcats", "hedgehog", "deltanet"]
SIZES = {
    # ~5 minutes per recipe on 2 CPU cores: 8k tokens per stage where the papers use 20-40M, so the
    # gaps measure how far a few minutes of CPU get, not what the recipes reach
    "full": dict(seq_len=256, batch=2, stage1=16, stage2=16, eval_tokens=1024, limit=50, contexts=[4096], new=16),
    "quick": dict(seq_len=64, batch=2, stage1=2, stage2=2, eval_tokens=256, limit=4, contexts=[256], new=4),
}
TASKS = ["arc_easy", "piqa", "sciq"]


def recipe_config(recipe: str, data: Path, out: Path, size: dict) -> dict:
    return {
        "out_dir": str(out / recipe), "seed": 0, "model": {"path": "smollm2-135m"},
        "data": {"train": [{"name": "code", "path": str(data / "code"), "weight": 0.5},
                           {"name": "early_modern", "path": str(data / "early_modern"), "weight": 0.5}],
                 "eval": [{"name": n, "path": str(data / n)} for n in ("code", "wiki", "early_modern")]},
        "train": {"seq_len": size["seq_len"], "global_batch": size["batch"], "micro_batch": size["batch"],
                  "precision": "fp32", "log_interval": 5},
        "eval": {"tokens": size["eval_tokens"], "batch": 4, "interval": 1000,
                 "downstream": {"tasks": TASKS, "limit": size["limit"], "batch": 8, "at_start": False},
                 "samples": {"prompts": ["Thou shalt not", "def read_config(path):", "The capital of France is"],
                             "max_new_tokens": 12}},
        "checkpoint": {"interval": 1000},
        "linearize": {"recipe": recipe, "window": 64 if size["seq_len"] > 64 else 16,
                      "stage1_steps": size["stage1"], "stage2_steps": size["stage2"],
                      "compare_contexts": size["contexts"], "compare_new_tokens": size["new"],
                      "compare_teacher_cache": str(out / "teacher.json")},
    }


def row(r: dict, seconds: float) -> str:
    h = r["held_out"]
    gaps = " | ".join(f"{h['gap'][n]:+.3f}" for n in ("code", "wiki", "early_modern"))
    zeroed = h.get("student_linear_branch_zeroed")
    zero = f"{zeroed['code'] - h['student']['code']:+.3f}" if zeroed else "–"
    tasks = " | ".join(f"{d['student_acc']:.2f} ({d['student_acc'] - d['teacher_acc']:+.2f})"
                       for d in r.get("downstream", {}).values())
    ctx, d = next(iter(r["decode"].items()))
    dec = (f"{d['student_tok_s']:.1f} ({d['student_tok_s'] / d['teacher_tok_s']:.2f}×), "
           f"{d['student_state_mb']:.1f} MB" if "skipped" not in d else "skipped")
    tokens = f"{r['tokens']['stage1']:,} + {r['tokens']['stage2']:,}"
    return f"| {r['recipe']} | {tokens} | {seconds / 60:.1f} min | {gaps} | {zero} | {tasks} | {dec} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a real-model study's data/ folder")
    ap.add_argument("--out", default="linearize_smollm2_out")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--quick", action="store_true", help="the smallest sizes (a smoke run)")
    args = ap.parse_args()
    from rewarm.linearize.run import linearize

    size = SIZES["quick" if args.quick else "full"]
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, teacher = [], None
    for recipe in args.recipes.split(","):
        cfg_path = out / f"{recipe}.yaml"
        cfg_path.write_text(yaml.safe_dump(recipe_config(recipe, data, out, size), sort_keys=False))
        started = time.perf_counter()
        r = linearize(cfg_path, progress=False)
        seconds = time.perf_counter() - started
        (out / f"{recipe}_result.json").write_text(json.dumps({**r, "wall_s": seconds}, indent=2))
        rows.append(row(r, seconds))
        teacher = r
        print(rows[-1], flush=True)
    h, d = teacher["held_out"]["teacher"], next(iter(teacher["decode"].items()))
    print(f"\nteacher held-out loss: code {h['code']:.3f}, wiki {h['wiki']:.3f}, early_modern {h['early_modern']:.3f}; "
          + "; ".join(f"{t} {v['teacher_acc']:.2f} ± {v['teacher_acc_stderr'] or 0:.2f}"
                      for t, v in teacher.get("downstream", {}).items())
          + f"; decode after {int(d[0]):,} tokens: {d[1].get('teacher_tok_s')} tok/s, KV cache {d[1].get('teacher_state_mb')} MB")
    print("\n| recipe | tokens (stage 1 + 2) | wall | gap code | gap wiki | gap early_modern | linear branch zeroed (code) | "
          + " | ".join(f"{t} (vs teacher)" for t in TASKS) + f" | decode tok/s at {size['contexts'][0]:,}, state |")
    print("|" + "---|" * (7 + len(TASKS) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()

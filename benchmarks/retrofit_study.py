"""What retrieval buys when a pretrained decoder is RETRO-fitted by continued pre-training.

    python benchmarks/retrofit_study.py BASE --train DIR --eval NAME=DIR [--eval ...] --out OUT
        [--steps 80 --seq-len 128 --batch 16 --lr 1e-3 --chunk 64 --cca-layers 2,4 --max-chunks N
         --precision fp32|bf16 --threads 2]

1. `rewarm retrieval build` over the training split (keys: BASE at its middle layer, exact index);
2. `rewarm retrofit BASE --db`; then two runs on the same data, schedule and tokens:
   retro (retrofit.freeze_base: true, RETRO's recipe) and dense (plain continued pre-training of
   BASE at --dense-lr, the baseline every ratio is taken against);
3. held-out loss of each run with and without retrieval (the retro run's `retrieval` events), the
   base (step 0), repetition of greedy continuations with and without retrieval, training tokens/s,
   faiss time per chunk, and greedy generation tokens/s with vs without retrieval (same no-cache path).
Writes OUT/study.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def rewarm(*args: str) -> float:
    start = time.perf_counter()
    quiet = [] if args[0] == "downstream" else ["-q"]
    subprocess.run([sys.executable, "-m", "rewarm", *args, *quiet], check=True)
    return time.perf_counter() - start


def events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == kind]


def generation_speed(model_dir: Path, data: Path, chunk: int, new_tokens: int = 32, prompts: int = 2) -> dict:
    """Greedy tokens/s with and without retrieval, on held-out prompts of two chunks (no KV cache either way)."""
    import torch
    from transformers import AutoModelForCausalLM

    import rewarm  # noqa: F401  (registers the RETRO model class)
    from rewarm.data.shards import TokenShards
    from rewarm.retro.repetition import greedy

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    val = TokenShards(data).split("val")
    out = {}
    for label, on in (("with", True), ("without", False)):
        with model.retrieval(on):
            start = time.perf_counter()
            for i in range(prompts):
                p = torch.from_numpy(val[i * 4 * chunk : i * 4 * chunk + 2 * chunk].astype("int64"))[None]
                greedy(model, p, new_tokens)
            out[label] = prompts * new_tokens / (time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--eval", action="append", required=True, help="NAME=DIR")
    ap.add_argument("--out", type=Path, default=Path("retrofit_out"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak LR of the RETRO-fitting run (new modules start from scratch)")
    ap.add_argument("--dense-lr", type=float, default=None, help="peak LR of the dense baseline (default: --lr)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--cca-layers", default=None)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--tasks", default=None, help="lm-eval tasks scored for the base and the RETRO-fitted model "
                                                  "(with retrieval), e.g. triviaqa,nq_open,sciq")
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    out = args.out.resolve()
    from rewarm.model_store import resolve

    args.base = resolve(args.base, "base")  # an installed name (smollm2-135m) → its directory
    (out / "configs").mkdir(parents=True, exist_ok=True)
    db, retro_model = out / "db", out / "retro_model"
    study: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if not db.exists():
        extra = ["--max-chunks", str(args.max_chunks)] if args.max_chunks else []
        rewarm("retrieval", "build", str(args.train), "-o", str(db), "--chunk", str(args.chunk), "--embed", args.base,
               "--index", "flat", *extra)
    meta = json.loads((db / "meta.json").read_text())
    study["db"] = {"chunks": meta["chunks"], "build_s": meta["build_seconds"], "mib": meta["bytes"] / 2**20,
                   "index": meta["index"]["type"], "key_layer": meta["keys"].get("layer")}
    if not retro_model.exists():
        extra = ["--cca-layers", args.cca_layers] if args.cca_layers else []
        rewarm("retrofit", args.base, "-o", str(retro_model), "--db", str(db), *extra)
    study["retrofit"] = json.loads((retro_model / "retrofit.json").read_text())
    evals = [{"name": e.partition("=")[0], "path": e.partition("=")[2]} for e in args.eval]
    common = {"seed": 0, "init": "weights",
              "data": {"train": [{"name": "train", "path": str(args.train)}], "eval": evals},
              "train": {"seq_len": args.seq_len, "global_batch": args.batch, "micro_batch": args.batch,
                        "max_steps": args.steps, "precision": args.precision, "num_threads": args.threads},
              "schedule": {"name": "cosine", "max_lr": args.lr, "min_lr": args.lr / 10, "warmup": 0.05},
              "eval": {"interval": max(1, args.steps // 2), "tokens": args.eval_tokens, "batch": 8},
              "checkpoint": {"interval": 0}}
    runs = {"retro": dict(common, out_dir=str(out / "runs" / "retro"), model={"path": str(retro_model)},
                          retrieval={"repetition_prompts": 4, "repetition_tokens": 64}),
            "dense": dict(common, out_dir=str(out / "runs" / "dense"), model={"path": args.base},
                          schedule=dict(common["schedule"], max_lr=args.dense_lr or args.lr,
                                        min_lr=(args.dense_lr or args.lr) / 10))}
    for name, cfg in runs.items():
        run = Path(cfg["out_dir"])
        path = out / "configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if not (run / "summary.json").exists():
            study.setdefault("wall_s", {})[name] = rewarm("train", str(path), "--overwrite")
        tr = events(run, "train")
        rates = [e["tokens_per_s"] for e in tr[1:] if "tokens_per_s" in e]
        study.setdefault("runs", {})[name] = {
            "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "summary": json.loads((run / "summary.json").read_text()),
            "ms_per_chunk": [e["retrieval_ms_per_chunk"] for e in tr if "retrieval_ms_per_chunk" in e]}
    r = study["runs"]
    rr = events(out / "runs" / "retro", "retrieval")
    study["retrieval_events"] = rr
    study["generation_tokens_per_s"] = generation_speed(out / "runs" / "retro" / "final", Path(evals[0]["path"]),
                                                        meta["chunk"])
    if args.tasks:
        for label, model in (("base", args.base), ("retro", str(out / "runs" / "retro" / "final"))):
            res = out / f"downstream_{label}.json"
            if not res.exists():
                study.setdefault("wall_s", {})[f"downstream {label}"] = rewarm(
                    "downstream", model, "--tasks", args.tasks, "--limit", str(args.limit), "-o", str(res))
            study.setdefault("downstream", {})[label] = json.loads(res.read_text())["tasks"]
    (out / "study.json").write_text(json.dumps(study, indent=1))

    names = [e["name"] for e in evals]
    print("| model | " + " | ".join(f"{n} loss" for n in names) + " | rep-4 |")
    print("|---|" + "---|" * (len(names) + 1))
    base = r["retro"]["summary"]["initial"]
    print("| base (step 0) | " + " | ".join(f"{base[n]:.4f}" for n in names) + " | |")
    rep = rr[-1].get("repetition", {})
    final = r["retro"]["summary"]["final"]
    print("| RETRO-fitted, with retrieval | " + " | ".join(f"{final[n]:.4f}" for n in names)
          + f" | {rep.get('with', float('nan')):.3f} |")
    if "random" in rr[-1]:
        print("| RETRO-fitted, random neighbours (control) | " + " | ".join(f"{rr[-1]['random'][n]:.4f}" for n in names)
              + f" | {rep.get('random', float('nan')):.3f} |")
    print("| RETRO-fitted, without retrieval | " + " | ".join(f"{rr[-1]['without'][n]:.4f}" for n in names)
          + f" | {rep.get('without', float('nan')):.3f} |")
    dense = r["dense"]["summary"]["final"]
    print("| dense continuation (baseline) | " + " | ".join(f"{dense[n]:.4f}" for n in names) + " | |")
    ratio = (r["retro"]["tokens_per_s"] or 0) / (r["dense"]["tokens_per_s"] or 1)
    ms = r["retro"]["ms_per_chunk"]
    g = study["generation_tokens_per_s"]
    print(f"\ndatabase: {study['db']['chunks']:,} chunks, {study['db']['mib']:.1f} MiB, built in {study['db']['build_s']:.0f} s; "
          f"training tokens/s retro / dense = {ratio:.2f}; search {sum(ms) / max(1, len(ms)):.2f} ms per uncached chunk; "
          f"generation {g['with']:.1f} vs {g['without']:.1f} tokens/s with / without retrieval")
    for task in study.get("downstream", {}).get("base", {}):
        b, t = study["downstream"]["base"][task], study["downstream"]["retro"][task]
        key = next(k for k in b if k in ("acc",) or k.startswith("exact_match,"))
        print(f"{task}: {key} base {b[key]:.3f} ± {b.get(key.replace(',', '_stderr,', 1) if ',' in key else key + '_stderr', 0):.3f}"
              f", RETRO-fitted with retrieval {t[key]:.3f} (n = {b['n']})")


if __name__ == "__main__":
    main()

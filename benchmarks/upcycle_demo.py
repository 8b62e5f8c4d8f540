"""Upcycling on the demo: a compute-matched comparison of dense continuation, BTX and BAM.

    python benchmarks/upcycle_demo.py DEMO_OUT [--out DIR] [--branch-steps 100] [--mix-steps 100]

DEMO_OUT is a finished `rewarm demo` (its tokenizer, its pre-trained model as the dense seed, its
prepared Python-code data). Three domains: Shakespeare, the King James Bible (prepared here with
the demo's tokenizer) and Python code. Every row trains on the same number of tokens:
- dense: the seed continued on the equal mixture of the three domains for 3·B + M steps;
- the MoE rows: three branches (B steps each, one per domain, shared by the rows), mixed, then M
  steps on the same mixture: BTX (FFN experts, attention averaged), BAM (FFN + attention experts),
  BAM with KV sharing — all with the micro-batch LBL — and BAM with the global-batch LBL.
Micro-batches of 4 sequences (4 per step), so the two LBL scopes see different token counts; then
the same with one sequence per micro-batch (each micro-batch one domain, where Qiu et al. say the
micro-batch LBL suppresses specialisation), at lbl_coef 0.01 and 0.1.
Prints held-out loss per domain and the mean, the routing entropy per domain (bits, mean over
layers; log2(3) = 1.585 is no preference), training tokens/s and wall time; writes results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from rewarm import corpora
from rewarm.data.prepare import prepare
from rewarm.runs import RunData

DOMAINS = ("shakespeare", "bible", "code")


def prepared(demo: Path, out: Path) -> dict[str, Path]:
    tok = demo / "tokenizer"
    dirs = {"shakespeare": out / "data" / "shakespeare", "bible": out / "data" / "bible",
            "code": demo / "data" / "downstream"}
    if not (dirs["shakespeare"] / "meta.json").is_file():
        prepare([str(f) for f in corpora.shakespeare_modern()], str(tok), dirs["shakespeare"], val_tokens=40_000, seed=0,
                progress=False)
    if not (dirs["bible"] / "meta.json").is_file():
        prepare([str(corpora.king_james_bible())], str(tok), dirs["bible"], val_tokens=40_000, seed=0, progress=False)
    return dirs


def base_config(demo: Path, data: dict[str, Path], steps: int, threads: int) -> dict:
    return {
        "seed": 0, "init": "weights", "model": {"path": str(demo / "runs" / "pretrain" / "final")},
        "data": {"train": [], "eval": [{"name": d, "path": str(p)} for d, p in data.items()]},
        "train": {"seq_len": 128, "global_batch": 16, "micro_batch": 4, "max_steps": steps, "precision": "fp32",
                  "num_threads": threads, "log_interval": 5},
        "schedule": {"name": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 0.1},
        "eval": {"interval": 25, "tokens": 16384, "batch": 16},
        "checkpoint": {"interval": 0, "keep_last": 1},
    }


def run(cmd: list[str]) -> float:
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rewarm", *cmd], check=True)
    return time.perf_counter() - start


def summarise(run_dir: Path) -> dict:
    r = RunData.load(run_dir)
    final = r.evals[-1][2]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "train"]
    out = {"final": final, "mean": sum(final[d] for d in DOMAINS) / len(DOMAINS),
           "tokens_per_s": sorted(rates)[len(rates) // 2]}
    routing = run_dir / "routing.json"
    if routing.is_file():
        out["routing"] = json.loads(routing.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--out", type=Path, default=Path("upcycle_out"))
    ap.add_argument("--branch-steps", type=int, default=100)
    ap.add_argument("--mix-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = args.out.resolve()
    demo = args.demo_out.resolve()
    data = prepared(demo, out)
    b, m = args.branch_steps, args.mix_steps
    walls: dict[str, float] = {}

    dense = base_config(demo, data, 3 * b + m, args.threads)
    dense["out_dir"] = str(out / "dense")
    dense["data"]["train"] = [{"name": d, "path": str(p), "weight": 1.0} for d, p in data.items()]
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "dense.yaml").write_text(yaml.safe_dump(dense))
    if not (out / "dense" / "summary.json").is_file():
        walls["dense"] = run(["train", str(out / "configs" / "dense.yaml"), "-q", "--overwrite"])

    variants = {
        "btx": {"mode": "btx"}, "bam": {"mode": "bam"}, "bam_kv": {"mode": "bam", "kv_sharing": True},
        "bam_global": {"mode": "bam", "scope": "global_batch"},
        # one sequence per micro-batch: each micro-batch is one domain, where the scopes should part
        "bam_mb1": {"mode": "bam", "micro_batch": 1}, "bam_mb1_global": {"mode": "bam", "micro_batch": 1, "scope": "global_batch"},
        "bam_mb1_lbl0.1": {"mode": "bam", "micro_batch": 1, "lbl_coef": 0.1},
        "bam_mb1_lbl0.1_global": {"mode": "bam", "micro_batch": 1, "scope": "global_batch", "lbl_coef": 0.1},
    }
    for name, v in variants.items():
        plan = {"out_dir": str(out / name), "base": base_config(demo, data, b, args.threads),
                "branches": [{"name": d, "data": str(p)} for d, p in data.items()],
                "upcycle": {"mode": v["mode"], "kv_sharing": v.get("kv_sharing", False), "top_k": 2},
                "moe_run": {"set": {"train.max_steps": m, "moe.lbl_scope": v.get("scope", "micro_batch"),
                                    "train.micro_batch": v.get("micro_batch", 4), "moe.lbl_coef": v.get("lbl_coef", 0.01)}}}
        if name != "btx":  # the branches are shared: trained once (in btx/branches)
            (out / name).mkdir(parents=True, exist_ok=True)
            link = out / name / "branches"
            if not link.exists():
                os.symlink(out / "btx" / "branches", link)
        path = out / "configs" / f"plan_{name}.yaml"
        path.write_text(yaml.safe_dump(plan))
        if name == "btx" and not all((out / "btx" / "branches" / d / "summary.json").is_file() for d in DOMAINS):
            walls["branches"] = run(["upcycle", str(path), "-q", "--stage", "branches"])
        run(["upcycle", str(path), "-q", "--stage", "mix"])
        if not (out / name / "moe" / "summary.json").is_file():
            walls[name] = run(["upcycle", str(path), "-q", "--stage", "moe"])

    results = {"dense": summarise(out / "dense")}
    results.update({name: summarise(out / name / "moe") for name in variants})
    results["branches"] = {d: summarise(out / "btx" / "branches" / d) for d in DOMAINS}
    results["seed"] = RunData.load(out / "dense").evals[0][2]
    results["steps"] = {"branch": b, "mix": m, "dense": 3 * b + m, "tokens_per_step": 16 * 128}
    results["wall_s"] = walls
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"tokens per row: {(3 * b + m) * 16 * 128:,} (branches 3 × {b} steps + mix {m} steps; dense {3 * b + m} steps)")
    print("| row | " + " | ".join(DOMAINS) + " | mean | routing entropy (bits) " + " / ".join(DOMAINS)
          + " | train tokens/s |")
    print("|---|" + "---|" * (len(DOMAINS) + 3))
    seed = results["seed"]
    print("| seed (step 0) | " + " | ".join(f"{seed[d]:.4f}" for d in DOMAINS)
          + f" | {sum(seed[d] for d in DOMAINS) / 3:.4f} | – | – |")
    for name in ("dense", *variants):
        r = results[name]
        ent = " / ".join(f"{r['routing']['sets'][d]['mean_entropy_bits']:.3f}" for d in DOMAINS) if "routing" in r else "–"
        print(f"| {name} | " + " | ".join(f"{r['final'][d]:.4f}" for d in DOMAINS)
              + f" | {r['mean']:.4f} | {ent} | {r['tokens_per_s']:,.0f} |")
    for d in DOMAINS:
        r = results["branches"][d]
        print(f"| branch {d} ({b} steps) | " + " | ".join(f"{r['final'][x]:.4f}" for x in DOMAINS)
              + f" | {r['mean']:.4f} | – | {r['tokens_per_s']:,.0f} |")
    print("wall seconds:", {k: round(v) for k, v in walls.items()})


if __name__ == "__main__":
    main()

"""Compress SmolLM2-135M, then repair it by re-training and by (dynamic) prompting; the comparison.

    python benchmarks/repair_smollm2.py STUDY_DATA [--out DIR] [--model smollm2-135m]

STUDY_DATA is the real-model study's data directory (`rewarm demo --model smollm2-135m` builds it:
data/code, data/wiki, data/early_modern tokenized with SmolLM2's tokenizer). Two compressions:
50% unstructured Wanda (calibration: 16,384 tokens of the code training split) and 3-bit
round-to-nearest in groups of 128. Each is repaired
- by re-training (continual pre-training on the code training split, train.keep_sparsity for the
  pruned model) at two budgets: 16 and 64 steps of 4 × 256 tokens, cosine from 1e-4;
- by one soft prompt (16 virtual tokens, 60 steps of 4 × 256 tokens on code);
- by IDP between two prompts (the code one and one trained on Early Modern English).
Then `rewarm repair report`: held-out loss on code and wiki, 4 tasks × 200 examples, compute.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

STEPS = (16, 64)
TASKS = ["arc_easy", "piqa", "sciq", "winogrande"]


def rewarm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rewarm", *args, "-q"], check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("repair_out"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = ap.parse_args()
    out, data = args.out.resolve(), args.study_data.resolve()
    code, wiki, new = data / "code", data / "wiki", data / "early_modern"
    (out / "configs").mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    compressions = {"wanda50": ["--method", "wanda", "--sparsity", "0.5", "--calib", str(code), "--seq-len", "256"],
                    "rtn3g128": ["--method", "rtn", "--bits", "3", "--group", "128"]}
    entries = []
    for name, how in compressions.items():
        model = out / "models" / name
        if not model.exists():
            wall[f"compress {name}"] = rewarm("compress", args.model, "-o", str(model), *how)
        runs = []
        for steps in STEPS:
            run = out / "runs" / f"{name}_{steps}"
            cfg = {"out_dir": str(run), "init": "weights", "model": {"path": str(model)},
                   "data": {"train": [{"name": "code", "path": str(code)}],
                            "eval": [{"name": "code", "path": str(code)}, {"name": "wiki", "path": str(wiki)}]},
                   "train": {"seq_len": 256, "global_batch": 4, "micro_batch": 4, "max_steps": steps,
                             "precision": args.precision, "keep_sparsity": name.startswith("wanda")},
                   "schedule": {"name": "cosine", "max_lr": 1e-4, "min_lr": 1e-5, "warmup": 2},
                   "eval": {"interval": steps, "tokens": 4096}, "checkpoint": {"interval": 0, "keep_last": 1}}
            path = out / "configs" / f"{name}_{steps}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            if not (run / "summary.json").is_file():
                wall[f"retrain {name} {steps}"] = rewarm("train", str(path), "--overwrite")
            runs.append(str(run))
        prompts = []
        for pname, src in (("code", code), ("early_modern", new)):
            p = out / "prompts" / f"{name}_{pname}"
            if not p.exists():
                wall[f"prompt {name} {pname}"] = rewarm("repair", "prompt", str(model), "--data", f"{pname}={src}",
                                                        "-o", str(p), "--virtual-tokens", "16", "--steps", "60",
                                                        "--batch", "4", "--seq-len", "256")
            prompts.append(str(p))
        entries.append({"name": name, "model": str(model), "retrained": runs, "prompts": prompts})
    spec = {"out_dir": str(out / "report"), "base": args.model,
            "eval": [{"name": "code", "path": str(code)}, {"name": "wiki", "path": str(wiki)}],
            "tasks": TASKS, "limit": 200, "seq_len": 256, "eval_tokens": 8192, "precision": args.precision,
            "batch": 16, "compressed": entries}
    (out / "configs" / "report.yaml").write_text(yaml.safe_dump(spec))
    wall["report"] = rewarm("repair", "report", str(out / "configs" / "report.yaml"))
    print("wall seconds:", {k: round(v) for k, v in wall.items()})


if __name__ == "__main__":
    main()

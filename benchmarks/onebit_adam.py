"""1-bit Adam vs AdamW on the demo's continual setting, 2 gloo ranks, and when it pays off.

    python benchmarks/onebit_adam.py DEMO_OUT [--out DIR]

DEMO_OUT is a finished `rewarm demo`. Its `lr_mid_warmup4` run (the demo's pre-trained model
continued on the downstream corpus: 80 steps x 16 sequences x 128 tokens, max LR 3e-3, 4 warmup
steps) is trained three times with `--nproc 2` (one thread per rank): AdamW, and 1-bit Adam with its
variance frozen 15% and 25% of the steps after the warmup. Prints the final upstream / downstream
losses, the bytes each rank sent per step in each phase (from the `comm_bytes` the optimizer logs)
and over the run.

Loopback makes communication nearly free here, so the second table *models* the step time of a
data-parallel run at 1, 10 and 100 Gb/s per rank for Pythia-410M and Pythia-1.4B on 8 and 64 ranks:
    time = compute + bytes / bandwidth
    bytes (per rank, ring all-reduce of fp32 gradients) = 2·(W−1)/W · 4·N;  1-bit phase: the same
    formula at the measured compression ratio of this run
    compute = 6·N·tokens / (312 TFLOP/s · 0.4)  (an A100 at 40% MFU, 16,384 tokens per rank per
    step: a stated model, not a measurement; no GPU was used)
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rewarm.rundir import iter_metrics
from rewarm.runs import RunData

PYTHIA = {"Pythia-410M": 405_334_016, "Pythia-1.4B": 1_414_647_808}
TOKENS_PER_RANK, FLOPS = 8 * 2048, 312e12 * 0.4


def config(demo_out: Path, out: Path, name: str, optimizer: dict) -> Path:
    raw = yaml.safe_load((demo_out / "runs" / "lr_mid_warmup4" / "config.yaml").read_text())
    raw["out_dir"] = str(out / "runs" / name)
    raw["train"].update(micro_batch=raw["train"]["global_batch"] // 2, num_threads=1)
    raw["checkpoint"].update(interval=0, keep_steps=[])
    raw["optimizer"].update(optimizer)
    path = out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--out", type=Path, default=Path("onebit_out"))
    args = ap.parse_args()
    variants = {"adamw": {"name": "adamw", "options": {}},
                "onebit_freeze15": {"name": "onebit_adam", "options": {"freeze_after_warmup": 0.15}},
                "onebit_freeze25": {"name": "onebit_adam", "options": {"freeze_after_warmup": 0.25}}}
    rows = {}
    for name, opt in variants.items():
        cfg = config(args.demo_out, args.out, name, opt)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rewarm", "train", str(cfg), "-q", "--nproc", "2", "--overwrite"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        run = RunData.load(args.out / "runs" / name)
        train = [e for e in iter_metrics(run.path / "metrics.jsonl") if e.get("event") == "train"]
        rows[name] = dict(run=run, train=train, wall=time.perf_counter() - started)

    print(f"{'run':<18}{'final upstream':>16}{'final downstream':>18}{'forgetting':>12}{'adaptation':>12}{'wall s':>8}")
    for name, r in rows.items():
        run = r["run"]
        print(f"{name:<18}{run.final('upstream'):>16.4f}{run.final('downstream'):>18.4f}"
              f"{run.forgetting('upstream'):>+12.4f}{run.adaptation('downstream'):>+12.4f}{r['wall']:>8.0f}")

    print(f"\n{'run':<18}{'steps warmup/1-bit':>20}{'B/step warmup':>15}{'B/step 1-bit':>14}{'ratio':>8}{'run total':>12}{'vs AdamW':>10}")
    ratio = None
    for name, r in rows.items():
        if name == "adamw":
            continue
        warm = [e["comm_bytes"] for e in r["train"] if e["onebit_phase"] == "warmup"]
        comp = [e["comm_bytes"] for e in r["train"] if e["onebit_phase"] == "compression"]
        ratio = warm[0] / comp[0]
        total = sum(warm) + sum(comp)
        full = warm[0] * len(r["train"])  # AdamW all-reduces the same gradients every step
        print(f"{name:<18}{f'{len(warm)}/{len(comp)}':>20}{warm[0]:>15,}{comp[0]:>14,}{ratio:>7.1f}x{total:>12,}"
              f"{full / total:>9.1f}x")

    print(f"\nmodelled step time (s), AdamW vs 1-bit phase at the measured {ratio:.1f}x; compute "
          f"{TOKENS_PER_RANK:,} tokens/rank/step at {FLOPS / 1e12:.0f} TFLOP/s")
    print(f"{'model':<13}{'ranks':>6}{'Gb/s':>6}{'compute':>9}{'AdamW':>9}{'1-bit':>9}{'speed-up':>10}")
    for model, n in PYTHIA.items():
        compute = 6 * n * TOKENS_PER_RANK / FLOPS
        for world in (8, 64):
            full_bytes = 2 * (world - 1) / world * 4 * n
            for gbps in (1, 10, 100):
                t_adam = compute + full_bytes * 8 / (gbps * 1e9)
                t_one = compute + full_bytes / ratio * 8 / (gbps * 1e9)
                print(f"{model:<13}{world:>6}{gbps:>6}{compute:>9.2f}{t_adam:>9.2f}{t_one:>9.2f}{t_adam / t_one:>9.1f}x")


if __name__ == "__main__":
    main()

"""Early-curve forecasts of the demo's continual runs, measured against how they really ended.

    python benchmarks/forecast_demo_runs.py DEMO_OUT [--out DIR] [--every 2] [--jobs 2] [--at 0.2,0.3,0.5]

DEMO_OUT is a finished `rewarm demo` (or `make demo`) directory. Its continual runs evaluate at
step 0, 2, 4, 6, 8 and then every 20 of 80 steps: too few evals before 20-50% of the run for a
4-parameter curve. So each finished continual run (init: weights) is trained again from the same
config — same weights, data, seed and schedule, so the same training — with an eval every `--every`
steps, into DIR/runs (~10 minutes of training on 2 cores, then ~20 of fits); the demo's own evals are checked to be
equal. Then, for both eval sets — upstream (forgetting: the loss rises) and downstream
(adaptation: it falls) — the final loss is forecast from the evals after warmup up to each fraction
of the run's tokens (`rewarm forecast run`), and compared with the last eval. Prints one row per
run, set and fraction, then per fraction and set: the median and largest |relative error|, how often
the 90% interval held the measured value, and the runs that had too few evals to be forecast.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from rewarm.analysis.forecast import forecast_set
from rewarm.errors import UserError
from rewarm.runs import RunData, find_runs
from rewarm.sweep import PlannedRun, run_all


def rerun_densely(demo_runs: list[RunData], out: Path, every: int, jobs: int) -> list[RunData]:
    """The demo's continual runs again, evaluated every `every` steps; same training otherwise."""
    planned = []
    for r in demo_runs:
        raw = yaml.safe_load((r.path / "config.yaml").read_text())
        raw["out_dir"] = str(out / "runs" / r.name)
        raw["eval"].update(interval=every, interval_warmup=0)
        raw["checkpoint"].update(interval=0, keep_steps=[])
        planned.append(PlannedRun(r.name, raw))
    results = run_all(planned, progress=False, jobs=jobs)
    failed = {k: v for k, v in results.items() if v.startswith("failed")}
    if failed:
        raise SystemExit(f"re-runs failed: {failed}")
    dense = [RunData.load(out / "runs" / r.name) for r in demo_runs]
    for r, d in zip(demo_runs, dense):  # the extra evals must not have changed the training
        mine = {step: sets for step, _, sets in d.evals}
        for step, _, sets in r.evals:
            if step in mine:
                for name, loss in sets.items():
                    if abs(mine[step][name] - loss) > 1e-6 * abs(loss):
                        raise SystemExit(f"{r.name} step {step} {name}: {mine[step][name]} here vs {loss} in the demo")
    return dense


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out", type=Path, help="a finished demo directory (holds runs/)")
    ap.add_argument("--out", type=Path, default=Path("forecast_demo_out"), help="where the re-runs go")
    ap.add_argument("--every", type=int, default=2, help="eval interval of the re-runs (steps)")
    ap.add_argument("--jobs", type=int, default=2, help="re-runs at a time (each pins one thread)")
    ap.add_argument("--at", default="0.2,0.3,0.5", help="fractions of each run's tokens to forecast from")
    ap.add_argument("--bootstrap", type=int, default=100)
    args = ap.parse_args()
    fractions = [float(x) for x in args.at.split(",")]
    demo = [r for r in find_runs([str(args.demo_out / "runs")]) if r.finished and r.config.get("init") == "weights"]
    if not demo:
        raise SystemExit(f"no finished continual runs under {args.demo_out / 'runs'}")
    runs = rerun_densely(demo, args.out, args.every, args.jobs)
    print(f"{len(runs)} continual runs of {args.demo_out / 'runs'}, re-run with an eval every {args.every} steps "
          f"into {args.out / 'runs'} (the demo's own evals reproduced)")
    print(f"{'run':<24}{'set':<12}{'at':>5}{'evals':>7}{'forecast':>10}{'90% interval':>20}{'measured':>10}{'error':>9}")
    summary: dict[tuple[float, str], list] = {}
    for at in fractions:
        for r in runs:
            for name in ("upstream", "downstream"):
                key = (at, name)
                summary.setdefault(key, [])
                try:
                    row, _ = forecast_set(r, name, at, args.bootstrap)
                except UserError as e:
                    print(f"{r.name:<24}{name:<12}{at:>5.0%}  – {str(e).split('. ')[0]}")
                    summary[key].append(None)
                    continue
                inside = row["low"] <= row["measured"] <= row["high"]
                summary[key].append((abs(row["relative_error"]), inside))
                print(f"{r.name:<24}{name:<12}{at:>5.0%}{row['points']:>7}{row['predicted']:>10.4f}"
                      f"{row['low']:>11.4f} – {row['high']:<7.4f}{row['measured']:>10.4f}{100 * row['relative_error']:>+8.2f}%")
    print("\nsummary: |relative error| of the forecast final loss, and how often the 90% interval held the measured one")
    print(f"{'at':>5}  {'set':<12}{'runs':>5}{'median':>9}{'max':>8}{'in 90%':>8}{'refused':>9}")
    for (at, name), rows in summary.items():
        done = [x for x in rows if x is not None]
        if not done:
            print(f"{at:>5.0%}  {name:<12}{0:>5}{'–':>9}{'–':>8}{'–':>8}{len(rows):>9}")
            continue
        errors = [e for e, _ in done]
        print(f"{at:>5.0%}  {name:<12}{len(done):>5}{100 * statistics.median(errors):>8.2f}%{100 * max(errors):>7.2f}%"
              f"{sum(i for _, i in done):>5}/{len(done):<2}{len(rows) - len(done):>9}")


if __name__ == "__main__":
    main()

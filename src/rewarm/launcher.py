"""Run a sweep's runs as child processes, several at a time (`rewarm sweep --jobs N`).

Why: small runs do not keep every core busy (a 3M-parameter model on 2 threads uses them at ~65%),
so two one-thread runs side by side finish ~1.5x sooner than the same runs one after another.
Each child is a plain `python -m rewarm train CONFIG`, so a run started here is the same run as one
started by hand: same config, same checkpoints, same resume. A run whose config leaves
`train.num_threads` at 0 (auto) gets cores // jobs threads, written into its config so that
the thread count (which changes float rounding) is on record.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewarm.config import config_from_dict, dump_yaml
from rewarm.errors import Preempted

log = logging.getLogger(__name__)


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _failure_reason(log_path: Path, rc: int) -> str:
    """The child's last error line (rewarm prints `error: ...` for every error it knows)."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ") or "Error" in ln]
    last = (errors or lines or [f"exit status {rc}"])[-1]
    return last.removeprefix("error: ")[:300]


def run_parallel(runs, jobs: int, states: dict[str, str], bar) -> dict[str, str]:
    """Run `runs` (PlannedRun) with at most `jobs` children alive; `states` maps name -> todo|partial.

    SIGTERM/SIGINT reach every child (each writes a checkpoint and exits 143); then this raises
    Preempted so the sweep stops as a single run would, and resumes next time.
    """
    results: dict[str, str] = {}
    pending = list(runs)
    alive: dict[str, tuple[subprocess.Popen, Path]] = {}
    stopping: list[str] = []

    def forward(signum, _frame):
        stopping.append(signal.Signals(signum).name)
        for proc, _ in alive.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    with tempfile.TemporaryDirectory(prefix="rewarm-sweep-") as tmp:
        try:
            while alive or (pending and not stopping):  # once stopping, wait for the live runs only
                while pending and len(alive) < jobs and not stopping:
                    r = pending.pop(0)
                    raw = dict(r.raw)
                    raw["train"] = dict(raw.get("train", {}))
                    if not raw["train"].get("num_threads"):
                        raw["train"]["num_threads"] = threads_per_job(jobs)
                    cfg = Path(tmp) / f"{r.name}.yaml"
                    cfg.write_text(dump_yaml(config_from_dict(raw)))
                    mode = "--resume" if states[r.name] == "partial" else "--overwrite"
                    out = Path(tmp) / f"{r.name}.log"
                    with open(out, "wb") as fh:
                        proc = subprocess.Popen([sys.executable, "-m", "rewarm", "train", str(cfg), "-q", mode],
                                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
                    alive[r.name] = (proc, out)
                for name, (proc, out) in list(alive.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del alive[name]
                    if rc == 0:
                        results[name] = "resumed and finished" if states[name] == "partial" else "finished"
                    elif rc == Preempted.exit_code:
                        results[name] = "preempted (checkpoint saved; resumes next time)"
                    else:
                        results[name] = f"failed: {_failure_reason(out, rc)}"
                        log.error("run %s failed: %s", name, results[name][8:])
                    bar.set_postfix_str(name)
                    bar.update(1)
                time.sleep(0.2)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
    if stopping:
        raise Preempted(f"sweep stopped by {stopping[0]}; each interrupted run saved a checkpoint and resumes "
                        "when the sweep is run again")
    return results

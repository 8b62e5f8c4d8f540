"""The CLI commands a user runs: eval, schedule plot, train with --set, preemption."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import metrics, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict
from rewarm.train import train


def test_eval_command_matches_the_run_log(tmp_path, shards):
    run = train(config_from_dict(small_run_config(tmp_path / "r", shards, **{"train.max_steps": 3, "checkpoint.interval": 0})), progress=False)
    proc = run_cli("eval", str(run.final), "--data", f"upstream={shards['upstream']}", "--data",
                   f"downstream={shards['downstream']}", "--seq-len", "32", "--eval-tokens", "1024", "--json", "--cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    logged = metrics(run.path, "eval")[-1]["sets"]
    for name in ("upstream", "downstream"):
        assert got[name]["loss"] == pytest.approx(logged[name]["loss"], abs=1e-6)
        assert got[name]["tokens"] == 1024
    bad = run_cli("eval", str(run.final), "--data", "upstream")
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_schedule_plot(tmp_path):
    out = tmp_path / "lr.png"
    proc = run_cli("schedule", "plot", "cosine:max_lr=3e-4,min_lr=3e-5,warmup=0.01", "constant:max_lr=3e-5,warmup=0",
                   "infinite", "wsd:decay_shape=1-sqrt", "-o", str(out), "--steps", "500")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    bad = run_cli("schedule", "plot", "cosin", "-o", str(out))
    assert bad.returncode == 2 and "did you mean `cosine`" in bad.stderr


def test_sigterm_checkpoints_then_resume_finishes_identically(tmp_path, shards):
    """Pre-emption: SIGTERM -> finish the step, checkpoint, exit 143; --resume gives the uninterrupted numbers."""
    base = small_run_config(tmp_path / "ref", shards, **{"train.max_steps": 40, "eval.interval": 10, "checkpoint.interval": 0})
    ref = train(config_from_dict(base), progress=False)
    cfg = write_config(tmp_path / "run.yaml", dict(base, out_dir=str(tmp_path / "pre")))
    proc = subprocess.Popen([sys.executable, "-m", "rewarm", "train", str(cfg), "-q"], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_text().count('"train"') < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume" in err
    stopped = [e for e in metrics(tmp_path / "pre") if e["event"] == "preempted"]
    assert len(stopped) == 1 and 5 <= stopped[0]["step"] < 40
    done = run_cli("train", str(cfg), "-q", "--resume")
    assert done.returncode == 0, done.stderr
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(tmp_path / "pre")) == strip(metrics(ref.path))


def test_sigkill_then_resume_from_last_good_checkpoint(tmp_path, shards):
    base = small_run_config(tmp_path / "ref", shards, **{"train.max_steps": 30, "eval.interval": 10, "checkpoint.interval": 4})
    ref = train(config_from_dict(base), progress=False)
    cfg = write_config(tmp_path / "run.yaml", dict(base, out_dir=str(tmp_path / "k")))
    proc = subprocess.Popen([sys.executable, "-m", "rewarm", "train", str(cfg), "-q"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "k" / "checkpoints" / "step_000012").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "k" / "final").exists()
    done = run_cli("train", str(cfg), "-q", "--resume")
    assert done.returncode == 0, done.stderr
    events = metrics(tmp_path / "k")
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(events) == strip(metrics(ref.path))  # no duplicated steps, same numbers


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", str(out), "-q", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "demo_result.json").read_text())
    assert [f["id"] for f in result["findings"]] == ["a", "b", "c", "d", "e", "f", "s"]
    assert all(f["verdict"] in ("holds", "does not hold at this scale", "within noise") for f in result["findings"])
    assert all("seed noise over 4 replicates" in f["detail"] for f in result["findings"])
    assert len(result["runs"]) == 15 and not any(v.startswith("failed") for v in result["runs"].values())
    md = (out / "report" / "report.md").read_text()
    assert "The papers' findings" in md and "| f |" in md and (out / "report" / "report.html").exists()
    # the replay finding's numbers come straight from the two runs' metrics
    evals = {name: metrics(out / "runs" / name, "eval") for name in ("lr_mid_warmup4", "replay5pct")}
    forget = {n: e[-1]["sets"]["upstream"]["loss"] - e[0]["sets"]["upstream"]["loss"] for n, e in evals.items()}
    f = next(x for x in result["findings"] if x["id"] == "f")
    assert f"falls by {forget['lr_mid_warmup4'] - forget['replay5pct']:.4f}" in f["detail"]
    assert (out / "report" / "pretraining.png").exists() and (out / "runs" / "roles.yaml").exists()

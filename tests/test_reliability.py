"""Crash safety: divergence, disk, locks, broken checkpoints, unwritable dirs, random kills."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_user_error, metrics, run_cli, small_run_config, write_config
from rewarm import checkpoint
from rewarm.config import config_from_dict
from rewarm.train import train

# lr(0) = 1e-4 (a healthy step), lr(1) = 2.5e37: the weights blow up, later losses are NaN
BLOWUP = {"schedule.name": "constant", "schedule.max_lr": 1e38, "schedule.warmup": 4,
          "schedule.warmup_start_lr": 1e-4, "train.max_bad_steps": 1, "checkpoint.interval": 1,
          "checkpoint.keep_last": 20, "train.max_steps": 8, "eval.interval": 4}


def test_divergence_stops_with_a_clear_message(tmp_path, shards):
    cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "r", shards, **BLOWUP))
    proc = run_cli("train", str(cfg), "-q")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr and "Traceback" not in proc.stderr and "on_divergence=rollback" in proc.stderr
    events = metrics(tmp_path / "r")
    assert events[-1]["event"] == "diverged"
    # checkpoints were not written during the non-finite streak
    assert [s for s, _ in checkpoint.list_steps(tmp_path / "r" / "checkpoints")] == [1, 2]


def test_divergence_rolls_back_further_each_time_with_lower_lr(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **BLOWUP, **{"train.on_divergence": "rollback",
                                                                   "train.rollback_lr_factor": 1e-40})
    run = train(config_from_dict(cfg), progress=False)
    rollbacks = [e for e in metrics(run.path) if e["event"] == "rollback"]
    assert [e["step"] for e in rollbacks] == [2, 1]  # the step-2 weights were already broken: go further back
    assert rollbacks[-1]["lr_scale"] == pytest.approx(1e-80)
    model = AutoModelForCausalLM.from_pretrained(run.final)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [e["step"] for e in metrics(run.path, "train")][-1] == 8 and run.summary.exists()


def test_disk_full_before_checkpoint_keeps_previous(tmp_path, shards, monkeypatch):
    real = shutil.disk_usage
    cfg = small_run_config(tmp_path / "r", shards, **{"train.max_steps": 6, "checkpoint.interval": 3})
    calls = {"n": 0}

    def fake(path):
        calls["n"] += 1
        usage = real(path)
        return usage._replace(free=10 if calls["n"] > 1 else usage.free)  # the second checkpoint finds the disk full

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", fake)
    with pytest.raises(checkpoint.DiskFull, match="need ~"):
        train(config_from_dict(cfg), progress=False)
    assert [s for s, _ in checkpoint.list_steps(tmp_path / "r" / "checkpoints")] == [3]
    assert checkpoint.verify(tmp_path / "r" / "checkpoints" / "step_000003") is None
    assert not list((tmp_path / "r" / "checkpoints").glob(".step_*"))


def test_corrupted_checkpoints_are_skipped_on_resume(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"checkpoint.interval": 2, "checkpoint.keep_last": 5})
    ref = train(config_from_dict(cfg), progress=False)
    before = [e for e in metrics(ref.path) if e["event"] in ("train", "eval")]
    ck = ref.checkpoints
    st = ck / "step_000006" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])  # truncated weights
    (ck / "step_000004" / "trainer_state.pt").unlink()  # missing trainer state
    assert "bytes" in checkpoint.verify(ck / "step_000006") and "missing" in checkpoint.verify(ck / "step_000004")
    path, state = checkpoint.load_latest(ck)
    assert path.name == "step_000002" and state.step == 2
    resumed = train(config_from_dict(dict(cfg, init="resume")), progress=False)
    assert [e for e in metrics(resumed.path) if e["event"] in ("train", "eval")] == before


def test_locked_run_directory(tmp_path, shards):
    cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "r", shards, **{"train.max_steps": 3, "eval.interval": 3}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert_user_error(run_cli("train", str(cfg), "-q"), f"in use by process {holder.pid}")
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with a dead pid in it
        holder.wait()
    assert (tmp_path / "r" / ".lock").read_text() == str(holder.pid)
    proc = run_cli("train", str(cfg), "-q")  # the kernel dropped the dead holder's lock: taken over
    assert proc.returncode == 0 and "stale lock" in proc.stderr, proc.stderr
    assert not (tmp_path / "r" / ".lock").exists()


HOLD_LOCK = "import sys, time; from rewarm.rundir import RunDir; RunDir(sys.argv[1]).acquire_lock(); print('locked', flush=True); time.sleep(120)"


def test_two_processes_starting_together_exactly_one_gets_the_lock(tmp_path):
    """The lock is an exclusive flock: of two processes released by a barrier, one wins, every time."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    for trial in range(8):
        run_dir = tmp_path / f"r{trial}"
        barrier = tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, str(script), str(run_dir), str(barrier)], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        time.sleep(0.3)  # both are waiting at the barrier
        barrier.write_text("")
        outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
        assert outcomes == ["busy", "won"], (trial, outcomes)


RACE = """
import os, sys, time
from rewarm.errors import UserError
from rewarm.rundir import RunDir
run, barrier = RunDir(sys.argv[1]), sys.argv[2]
while not os.path.exists(barrier):
    time.sleep(0.001)
try:
    run.acquire_lock()
    print("won", flush=True)
    time.sleep(1.0)  # hold it while the other one tries
except UserError:
    print("busy", flush=True)
"""


def test_unwritable_run_directory(tmp_path, shards):
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "afile" / "r", shards))
    assert_user_error(run_cli("train", str(cfg), "-q"), "cannot write the run directory", "writable `out_dir`")


def test_missing_start_checkpoint(tmp_path, shards):
    cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "r", shards, init="weights",
                                                            **{"model": {"path": str(tmp_path / "no-such-model")}}))
    assert_user_error(run_cli("train", str(cfg), "-q"), "no-such-model")


def test_eval_set_too_small(tmp_path, shards, tokenizer_dir):
    from rewarm.data.prepare import prepare

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a short held-out document")
    (tmp_path / "docs" / "b.txt").write_text("training text " * 200)
    prepare([str(tmp_path / "docs")], str(tokenizer_dir), tmp_path / "small", val_tokens=5, progress=False)
    cfg = small_run_config(tmp_path / "r", shards)
    cfg["data"]["eval"] = [{"name": "small", "path": str(tmp_path / "small")}]
    cfg = write_config(tmp_path / "c.yaml", cfg)
    assert_user_error(run_cli("train", str(cfg), "-q"), "fewer than one window")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_exact(tmp_path, shards):
    """Five SIGKILLs at random moments (mid-step, mid-eval, mid-checkpoint-write), then finish."""
    base = small_run_config(tmp_path / "ref", shards, **{"train.max_steps": 60, "eval.interval": 5, "checkpoint.interval": 3})
    ref = train(config_from_dict(base), progress=False)
    cfg = write_config(tmp_path / "c.yaml", dict(base, out_dir=str(tmp_path / "k")))
    rng = random.Random(1234)
    for _ in range(5):
        has_ckpt = bool(checkpoint.list_steps(tmp_path / "k" / "checkpoints"))
        args = [sys.executable, "-m", "rewarm", "train", str(cfg), "-q"] + (["--resume"] if has_ckpt else ["--overwrite"])
        proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(5.0, 9.0))  # interpreter start-up takes ~4 s
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = run_cli("train", str(cfg), "-q", "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(tmp_path / "k")) == strip(metrics(ref.path))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "k" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(ref.final).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

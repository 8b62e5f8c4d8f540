"""`rewarm demo --model`: the real-model study's whole pipeline, on a tiny Llama "installed" in a
temporary models cache (the real SmolLM2-135M study is too long for a test; `make demo-real`)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli, small_run_config, write_config

pytest.importorskip("lm_eval")


@pytest.fixture()
def tiny_installed(tmp_path, shards, monkeypatch, task_data):
    """A tiny Llama trained a few steps, filed in the models cache as `tiny-llama`."""
    models = tmp_path / "models"
    monkeypatch.setenv("REWARM_MODELS_DIR", str(models))
    cfg = small_run_config(tmp_path / "seed_run", shards)
    cfg["model"] = {"preset": "llama-tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 2,
                                                           "num_attention_heads": 4, "num_key_value_heads": 2,
                                                           "intermediate_size": 64}}
    assert run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), "-q").returncode == 0
    import shutil

    shutil.copytree(tmp_path / "seed_run" / "final", models / "tiny-llama")
    (models / "tiny-llama" / "rewarm_model.json").write_text(json.dumps({"name": "tiny-llama"}))
    return "tiny-llama"


@pytest.fixture()
def task_data():
    from rewarm.downstream import tasks

    if not tasks.is_installed():
        assert run_cli("tasks", "install", timeout=900).returncode == 0
    return tasks.tasks_dir()


def test_study_runs_end_to_end_and_reports_findings_tasks_and_samples(tmp_path, tiny_installed, monkeypatch):
    from rewarm import real_study

    monkeypatch.setitem(real_study.SIZES, "quick", dict(seq_len=32, batch=4, steps=4, warmup=1, eval_tokens=256,
                                                       eval_interval=2, dense=1, task_limit=4, code_bytes=200_000,
                                                       lrs=(1e-4, 3e-4, 1e-3), sample_tokens=8))
    out = tmp_path / "study"
    proc = run_cli("demo", "--model", tiny_installed, "--quick", "--out", str(out), "-q", "--jobs", "2", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "study_result.json").read_text())
    assert set(result["runs"]) == {"lr_mid", "lr_low", "lr_high", "constant_low", "replay5pct"}
    for old in ("wiki", "code"):
        assert [f["id"] for f in result["findings"][old]] == ["b", "c", "f", "s"]
    # the step-0 tasks are scored once (lr_mid) and shared; every run scores them at its end
    events = lambda name, kind: [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                                 if json.loads(x)["event"] == kind]
    assert [e["step"] for e in events("lr_mid", "downstream")] == [0, 4]
    assert [e["step"] for e in events("lr_low", "downstream")] == [4]
    assert set(events("lr_low", "downstream")[0]["tasks"]) == set(real_study.TASKS)
    assert [s["prompt"] for s in events("replay5pct", "samples")[0]["samples"]] == real_study.PROMPTS
    md = (out / "report" / "report.md").read_text()
    assert "Downstream tasks: accuracy at step 0 and at the end" in md and "Text samples" in md
    assert "hellaswag step 0" in proc.stdout and "Forgetting read on `wiki`" in proc.stdout
    start = events("lr_mid", "start")[0]
    assert set(start["eval_tokens"]) == {"early_modern", "code", "wiki"}
    assert start["source_shares"] == {"early_modern": 1.0}
    assert events("replay5pct", "start")[0]["source_shares"] == {"early_modern": 0.95, "code": 0.05}

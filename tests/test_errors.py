"""Bad input gets exit code 2, a message naming the problem and the fix, no traceback."""
import json

import pytest

from conftest import assert_user_error, code_files, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict, config_reference, load_config
from rewarm.errors import UserError


def cli_train(tmp_path, cfg, *extra, subprocess=False):
    return run_cli("train", str(write_config(tmp_path / "run.yaml", cfg)), "-q", *extra, subprocess=subprocess)


def test_unknown_key_suggests_the_closest(tmp_path, shards):
    """The contract on a real process: exit 2, the message on stderr, no traceback, nothing on disk."""
    cfg = small_run_config(tmp_path / "r", shards)
    cfg["train"]["max_step"] = 5
    assert_user_error(cli_train(tmp_path, cfg, subprocess=True), "unknown config key `train.max_step`", "did you mean `max_steps`")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key, value, needle", [
    ("train.log_interval", 0, "`train.log_interval` must be >= 1"),
    ("eval.interval", -5, "`eval.interval` must be >= 1"),
    ("eval.interval_warmup", -1, "`eval.interval_warmup` must be >= 0"),
    ("checkpoint.interval", -1, "`checkpoint.interval` must be >= 0"),
    ("checkpoint.keep_last", 0, "`checkpoint.keep_last` must be >= 1"),
    ("eval.downstream.every", -2, "`eval.downstream.every` must be >= 0"),
    ("train.max_bad_steps", -1, "`train.max_bad_steps` must be >= 0"),
    ("train.num_threads", -4, "`train.num_threads` must be in [0, 4,096]"),
    ("train.rollback_lr_factor", 0, "`train.rollback_lr_factor` must be in (0, 1]"),
    ("checkpoint.keep_steps", [3, -1], "`checkpoint.keep_steps` must be a list of step numbers"),
    ("schedule.name", "cosin", "did you mean `cosine`"),
])
def test_intervals_and_counts_are_validated(tmp_path, shards, key, value, needle):
    """log_interval 0 used to pass validation and crash with ZeroDivisionError after step 1."""
    cfg = small_run_config(tmp_path / "r", shards, **{key: value})
    assert_user_error(cli_train(tmp_path, cfg), needle)
    assert not (tmp_path / "r").exists()


def test_unknown_override_and_wrong_type(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards)
    assert_user_error(cli_train(tmp_path, cfg, "--set", "schedule.max_lrr=1e-3"), "schedule.max_lrr", "max_lr")
    assert_user_error(cli_train(tmp_path, cfg, "--set", "train.seq_len=long"), "`train.seq_len` must be int")
    assert_user_error(cli_train(tmp_path, cfg, "--set", "init=warm"), "`init` must be one of scratch, weights, resume")


def test_min_lr_above_max_lr(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"schedule.min_lr": 1e-2})
    assert_user_error(cli_train(tmp_path, cfg), "min_lr", "larger than `schedule.max_lr`")
    # a constant schedule never reads min_lr: a small constant LR must not trip over its default
    config_from_dict(small_run_config(tmp_path / "c", shards, **{"schedule.name": "constant", "schedule.max_lr": 1e-5,
                                                                 "schedule.warmup": 0}))


def test_global_batch_not_divisible(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"train.global_batch": 10, "train.micro_batch": 4})
    assert_user_error(cli_train(tmp_path, cfg), "not divisible", "micro_batch")


def test_missing_data_dir(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards)
    cfg["data"]["train"][0]["path"] = str(tmp_path / "nowhere")
    assert_user_error(cli_train(tmp_path, cfg), "nowhere does not exist", "rewarm prepare")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_tokenizer_fingerprint_mismatch(tmp_path, shards):
    other = tmp_path / "tok2"
    run_cli("tokenizer", "train", *[str(f) for f in code_files(60_000)], "-o", str(other), "--vocab-size", "300")
    cfg = small_run_config(tmp_path / "r", shards, tokenizer=str(other))
    assert_user_error(cli_train(tmp_path, cfg), "different tokenizer", "fingerprint")


def test_token_id_beyond_model_vocab(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"model.vocab_size": 256})
    assert_user_error(cli_train(tmp_path, cfg), "vocab", "512")


def test_ids_beyond_vocab_in_shards(tmp_path, shards):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards["downstream"], bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["max_token_id"] = 600  # shards written by a bigger tokenizer with the same fingerprint claim
    (bad / "meta.json").write_text(json.dumps(meta))
    cfg = small_run_config(tmp_path / "r", shards)
    cfg["data"]["train"][0]["path"] = str(bad)
    assert_user_error(cli_train(tmp_path, cfg), "token id 600", "vocab")


def test_seq_len_beyond_max_positions(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"train.seq_len": 2048})
    assert_user_error(cli_train(tmp_path, cfg), "exceeds the model's max positions (1024)")


def test_existing_run_is_not_clobbered(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"train.max_steps": 3, "eval.interval": 3, "checkpoint.interval": 0})
    assert cli_train(tmp_path, cfg).returncode == 0
    assert_user_error(cli_train(tmp_path, cfg), "already holds a run", "--resume", "--overwrite")
    assert cli_train(tmp_path, cfg, "--overwrite").returncode == 0


def test_resume_without_checkpoint_and_with_config_drift(tmp_path, shards):
    # precision `auto` on purpose: resuming with what it resolves to here must count as the same run
    cfg = small_run_config(tmp_path / "r", shards, **{"train.max_steps": 3, "eval.interval": 3, "checkpoint.interval": 0,
                                                      "train.precision": "auto"})
    assert_user_error(cli_train(tmp_path, cfg, "--resume"), "no run to resume")

    def interrupted() -> None:  # as if killed after the last checkpoint, before final/ and the summary
        import shutil

        shutil.rmtree(tmp_path / "r" / "final")
        (tmp_path / "r" / "summary.json").unlink()

    assert cli_train(tmp_path, cfg).returncode == 0
    interrupted()
    drift = cli_train(tmp_path, dict(cfg, seed=5), "--resume")
    assert_user_error(drift, "changes the run", "seed: 0 -> 5", "--allow-config-change")
    import torch

    from rewarm.start import resolve_precision

    resolved = resolve_precision("auto", torch.device("cpu"))
    same = cli_train(tmp_path, {**cfg, "train": {**cfg["train"], "precision": resolved}}, "--resume")
    assert same.returncode == 0, same.stderr[-2000:]
    interrupted()
    other = "bf16" if resolved == "fp32" else "fp32"
    changed = cli_train(tmp_path, {**cfg, "train": {**cfg["train"], "precision": other}}, "--resume")
    assert_user_error(changed, "changes the run", "train.precision")


def test_impossible_warmup_and_bad_weights():
    with pytest.raises(UserError, match="covers all 10 steps"):
        load_config(None, ["data.train=[{name: a, path: x}]", "model.preset=tiny", "train.max_steps=10", "schedule.warmup=10"])
    with pytest.raises(UserError, match=r"`data.train\[0\].weight` must be in \[0, 1,000,000\]"):
        load_config(None, ["data.train=[{name: a, path: x, weight: -1}]", "model.preset=tiny"])
    with pytest.raises(UserError, match="`schedule.max_lr` must be >= 0"):
        load_config(None, ["data.train=[{name: a, path: x}]", "model.preset=tiny", "schedule.max_lr=-1"])


def test_config_reference_covers_every_key():
    ref = config_reference()
    for key in ("train.seq_len", "schedule.max_lr", "data.train", "checkpoint.keep_steps", "optimizer.state", "init"):
        assert f"`{key}`" in ref


def test_readme_config_table_is_the_generated_reference():
    """The README's config table is `rewarm config reference` verbatim: a renamed or re-documented key shows here."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Config reference\n", 1)[1].splitlines()
    rows = section[: next(i for i, line in enumerate(section) if not line.startswith("|"))]
    assert "\n".join(rows) == config_reference()


def test_error_catalogue_names_a_real_test_on_every_row_and_the_readme_counts_them():
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    tests = {}
    for f in (root / "tests").glob("test_*.py"):
        tests[f.stem] = {n.name for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.FunctionDef)}
    rows = [line for line in (root / "docs" / "errors.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        named = re.findall(r"`(test_\w+)::(test_\w+)`", row.rsplit("|", 2)[1])
        assert named or row.rsplit("|", 2)[1].strip() == "same", row
        for module, name in named:
            assert name in tests.get(module, set()), (module, name)
    assert f"[docs/errors.md](docs/errors.md) ({len(rows)} rows, each with its test)" in (root / "README.md").read_text()


def test_warmup_that_rounds_to_zero_steps_warns(caplog):
    """0.5% of 80 steps is 0.4 steps: round() makes it 0 and the run has no warmup at all. Say so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="rewarm.config"):
        load_config(None, ["data.train=[{name: a, path: x}]", "model.preset=tiny", "train.max_steps=80",
                           "schedule.warmup=0.005"])
    assert "rounds to 0 warmup steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewarm.config"):
        load_config(None, ["data.train=[{name: a, path: x}]", "model.preset=tiny", "train.max_steps=80",
                           "schedule.warmup=2"])
    assert "rounds to 0" not in caplog.text

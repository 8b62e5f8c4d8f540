"""What a hostile but realistic user tries: a full disk (real and injected), values that make no
sense, data that lies about itself, runs stopped at awkward moments. Each case ends in exit 0
with the right result or exit 2/4 with a message, never a traceback, and nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, code_files, metrics, run_cli, small_run_config, write_config
from rewarm import atomic, checkpoint
from rewarm.config import config_from_dict
from rewarm.errors import DiskFull, UserError
from rewarm.state import TrainerState
from rewarm.train import train

SHORT = {"train.max_steps": 3, "eval.interval": 3, "checkpoint.interval": 0}


def cli_train(tmp_path: Path, cfg: dict, *extra: str):
    return run_cli("train", str(write_config(tmp_path / "run.yaml", cfg)), "-q", *extra)


# --------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 300 KB tmpfs (root only: skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _tiny_model_and_tokenizer(tokenizer_dir):
    from conftest import SMALL_MODEL
    from rewarm.model import build_config, init_scratch
    from rewarm.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    return init_scratch(build_config("tiny", None, dict(SMALL_MODEL), len(tok), None, tok.eos_token_id), 0), tok


def test_real_disk_full_in_checkpoint_final_metrics_and_prepare(small_tmpfs, tokenizer_dir, monkeypatch):
    """ENOSPC for real, inside safetensors / torch.save / a plain append: DiskFull (exit 4), the partial gone."""
    model, tok = _tiny_model_and_tokenizer(tokenizer_dir)
    monkeypatch.setattr(atomic, "require_free", lambda *a, **k: None)  # get past the pre-check to the real write
    state = TrainerState(step=3, optimizer={"big": torch.zeros(200_000)})  # 800 KB: cannot fit in 300 KB
    with pytest.raises(DiskFull, match="disk full while writing checkpoint step 3"):
        checkpoint.save(small_tmpfs / "checkpoints", model, tok, state)
    assert list((small_tmpfs / "checkpoints").iterdir()) == []  # no partial .step_000003.tmp-PID
    filler = small_tmpfs / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as fh:  # fill the disk to the last byte
            fh.write(b"\0" * 400_000)
    from rewarm.model import save_model

    with pytest.raises(DiskFull, match="the model"):
        save_model(model, small_tmpfs / "final", tok)
    assert not (small_tmpfs / "final").exists() and not list(small_tmpfs.glob(".final.tmp-*"))
    from rewarm.rundir import MetricsWriter

    writer = MetricsWriter(small_tmpfs / "metrics.jsonl")
    with pytest.raises(DiskFull, match="metrics.jsonl"):
        for _ in range(100):
            writer.write({"event": "train", "padding": "x" * 10_000})
    with pytest.raises(DiskFull):
        atomic.write_json(small_tmpfs / "summary.json", {"x": "y" * 10_000})
    assert not list(small_tmpfs.glob(".summary.json.tmp-*"))
    filler.unlink()
    from rewarm.data.prepare import prepare

    with pytest.raises(DiskFull, match="the shards"):
        prepare([str(f) for f in code_files(2_000_000)], str(tokenizer_dir), small_tmpfs / "data", val_tokens=1000,
                progress=False)
    assert not list(small_tmpfs.glob(".data.tmp-*")) and not (small_tmpfs / "data").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"),
    type("SafetensorError", (Exception,), {})('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })'),
    type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: (os error 28)"),
    OSError(28, "No space left on device"),
])
def test_disk_full_of_any_exception_type_is_exit_4_with_the_partial_removed(tmp_path, shards, monkeypatch, error):
    cfg = small_run_config(tmp_path / "r", shards, **{"train.max_steps": 6, "checkpoint.interval": 3})
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's trainer state
            Path(f).write_bytes(b"partial")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    proc = cli_train(tmp_path, cfg)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "disk full while writing checkpoint step 6" in proc.stderr and "--resume" in proc.stderr
    ckpts = tmp_path / "r" / "checkpoints"
    assert [s for s, _ in checkpoint.list_steps(ckpts)] == [3] and checkpoint.verify(ckpts / "step_000003") is None
    assert not list(ckpts.glob(".step_*"))


def test_final_dir_checks_free_space_first(tmp_path, shards, monkeypatch):
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    real = shutil.disk_usage

    def full_for_final(path):
        usage = real(path)
        return usage._replace(free=10) if Path(path) == tmp_path / "r" else usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", full_for_final)
    with pytest.raises(DiskFull, match="not enough disk space for the model final/"):
        train(config_from_dict(cfg), progress=False)
    assert not (tmp_path / "r" / "final").exists() and not (tmp_path / "r" / "summary.json").exists()


def test_stale_temp_dirs_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{**SHORT, "checkpoint.interval": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = train(config_from_dict(cfg), progress=False)  # then interrupted after step 2, with leftovers of writers
        shutil.rmtree(run.final)
        shutil.rmtree(run.checkpoints / "step_000003")
        run.summary.unlink()
        for name in (f".final.tmp-{dead_pid}", f"checkpoints/.step_000001.tmp-{dead_pid}", f"checkpoints/.step_000002.tmp-{live.pid}"):
            (tmp_path / "r" / name).mkdir()
        (tmp_path / "r" / f".summary.json.tmp-{dead_pid}").write_text("{")
        train(config_from_dict(dict(cfg, init="resume")), progress=False)
        left = sorted(p.name for p in (tmp_path / "r").rglob(".*tmp-*"))
        assert left == [f".step_000002.tmp-{live.pid}"]  # a live writer's is never touched
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- values that make no sense

@pytest.mark.parametrize("key, value, needle", [
    ("schedule.const_lr", -0.001, "`schedule.const_lr` must be >= 0"),
    ("optimizer.weight_decay", -0.1, "`optimizer.weight_decay` must be >= 0"),
    ("optimizer.grad_clip", -1, "`optimizer.grad_clip` must be >= 0"),
    ("optimizer.eps", -1, "`optimizer.eps` must be > 0"),
    ("optimizer.betas", [0.9], "`optimizer.betas` must be two numbers in [0, 1)"),
    ("optimizer.betas", [1.5, 0.95], "`optimizer.betas` must be two numbers in [0, 1)"),
    ("seed", -1, "`seed` must be in [0, 4,294,967,295]"),
    ("seed", 12345678901234567890, "`seed` must be in [0"),
    ("schedule.max_lr", float("nan"), "`schedule.max_lr` must be >= 0"),
    ("schedule.decay_fraction", 1.5, "`schedule.decay_fraction` must be in [0, 1]"),
    ("checkpoint.keep_steps", ["a"], "`checkpoint.keep_steps` must be a list of step numbers"),
    ("out_dir", "", "`out_dir` is empty"),
    ("out_dir", "  ", "`out_dir` is empty"),
])
def test_nonsense_values_are_refused_before_anything_is_written(tmp_path, shards, key, value, needle):
    from rewarm.config import set_dotted

    cfg = set_dotted(small_run_config(tmp_path / "r", shards), key, value)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # an empty out_dir would mean this directory
    try:
        assert_user_error(cli_train(tmp_path, cfg), needle)
        assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]  # nothing written but the config we wrote
    finally:
        os.chdir(cwd)


def test_constant_schedule_warmup_beyond_the_run_is_refused(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **{"schedule.name": "constant", "schedule.warmup": 10, "train.max_steps": 6})
    assert_user_error(cli_train(tmp_path, cfg), "covers all 6 steps")


def config_fields(cls=None, prefix: str = ""):
    """(dotted key, type) of every leaf field of the run config (Optional[...] unwrapped)."""
    import dataclasses
    import typing

    from rewarm.config import RunConfig

    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        tp = ([a for a in typing.get_args(tp) if a is not type(None)] or [tp])[0]
        if dataclasses.is_dataclass(tp):
            yield from config_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def test_every_numeric_key_has_a_declared_range():
    from rewarm.config import LIST_ITEM_TYPES, RANGES

    keys = {k for k, tp in config_fields() if tp in (int, float)}
    for head, item in LIST_ITEM_TYPES.items():
        keys |= {f"{head}.{k}" for k, tp in config_fields(item) if tp in (int, float)}
    assert keys - set(RANGES) == set()


def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path, shards):
    import yaml

    text = yaml.safe_dump(small_run_config(tmp_path / "r", shards)) + "train:\n  max_steps: 99\n"
    (tmp_path / "dup.yaml").write_text(text)
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("train:"))
    last = len(text.splitlines()) - 1
    assert_user_error(run_cli("train", str(tmp_path / "dup.yaml"), "-q"), "`train` is given twice",
                      f"lines {first} and {last}")
    assert not (tmp_path / "r").exists()


def test_overwrite_never_deletes_a_directory_rewarm_did_not_make(tmp_path, shards):
    mine = tmp_path / "project"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "precious.txt").write_text("not rewarm's")
    cfg = small_run_config(mine, shards, **SHORT)
    assert_user_error(cli_train(tmp_path, cfg, "--overwrite"), "not a run directory rewarm made")
    assert (mine / "checkpoints" / "precious.txt").read_text() == "not rewarm's"


# --------------------------------------------------------------------------- data that lies about itself

def _copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_token_ids_beyond_the_vocab_inside_the_bins_are_found(tmp_path, shards):
    """meta.json says the ids fit; val.bin holds one that does not. Checked for real, then cached."""
    bad = _copy_shards(shards["downstream"], tmp_path / "bad")
    val = np.memmap(bad / "val.bin", dtype=np.uint16, mode="r+")
    val[7] = 600
    val.flush()
    del val
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    cfg["data"]["eval"][1]["path"] = str(bad)
    assert_user_error(cli_train(tmp_path, cfg), "holds token id 600", "vocab")
    cache = json.loads((bad / ".max_ids.json").read_text())
    assert sorted(int(v) for v in cache.values()) == sorted([600, int(np.fromfile(bad / "train.bin", np.uint16).max())])


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("dtype"), "`dtype` is missing"),
    (lambda m: m.update(dtype="float7"), "dtype `float7` is not a token dtype"),
    (lambda m: m["tokenizer"].pop("fingerprint"), "no tokenizer fingerprint"),
    (lambda m: m.clear() or m.update(vocab_size=50257, itos={}), "another tool, e.g. nanoGPT"),
    (lambda m: m.update(format_version=7), "format_version 7"),
])
def test_incomplete_or_foreign_meta_json(tmp_path, shards, edit, needle):
    bad = _copy_shards(shards["downstream"], tmp_path / "bad")
    meta = json.loads((bad / "meta.json").read_text())
    edit(meta)
    (bad / "meta.json").write_text(json.dumps(meta))
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    cfg["data"]["train"][0]["path"] = str(bad)
    assert_user_error(cli_train(tmp_path, cfg), needle, "rewarm prepare")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards):
    cfg = small_run_config(tmp_path_factory.mktemp("fin") / "run", shards, **{"checkpoint.interval": 3})
    return train(config_from_dict(cfg), progress=False), cfg


@pytest.mark.parametrize("damage", ["truncate_5k", "truncate_100", "empty", "pickle"])
def test_broken_weights_file_is_a_user_error(tmp_path, shards, finished, damage):
    model_dir = shutil.copytree(finished[0].final, tmp_path / "model")
    st = model_dir / "model.safetensors"
    data = st.read_bytes()
    if damage == "pickle":
        torch.save({"w": torch.zeros(3)}, st)
    else:
        st.write_bytes({"truncate_5k": data[:5000], "truncate_100": data[:100], "empty": b""}[damage])
    cfg = small_run_config(tmp_path / "r", shards, init="weights", **{**SHORT, "model": {"path": str(model_dir)}})
    assert_user_error(cli_train(tmp_path, cfg), "could not load model weights", "model")


def test_start_checkpoint_that_does_not_verify_is_refused(tmp_path, shards, finished):
    ck = shutil.copytree(finished[0].checkpoints / "step_000003", tmp_path / "step_000003")
    tok = ck / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<|endoftext|>", "<|endoftxet|>", 1))  # same size, different bytes
    cfg = small_run_config(tmp_path / "r", shards, init="weights", **{**SHORT, "model": {"path": str(ck)}})
    assert_user_error(cli_train(tmp_path, cfg), "does not verify", "tokenizer.json")


def test_eval_command_bad_values(shards, finished):
    final = str(finished[0].final)
    for flag, value, needle in (("--batch", "0", "--batch must be a positive"), ("--seq-len", "0", "--seq-len must be"),
                                ("--seq-len", "5000", "exceeds the model's max positions (1024)")):
        assert_user_error(run_cli("eval", final, "--data", f"d={shards['downstream']}", flag, value), needle)


# --------------------------------------------------------------------------- operations

def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path, shards, finished):
    """Killed before any checkpoint (the default saves only at the end): `--resume` is the one way forward."""
    cfg = small_run_config(tmp_path / "r", shards, **{"checkpoint.interval": 0})
    run = train(config_from_dict(cfg), progress=False)
    for p in (run.checkpoints, run.final):
        shutil.rmtree(p)
    run.summary.unlink()
    proc = cli_train(tmp_path, cfg, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped before its first checkpoint" in proc.stderr
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(run.path)) == strip(metrics(finished[0].path))


def test_resume_of_a_finished_run_changes_nothing(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    run = train(config_from_dict(cfg), progress=False)
    before = {p: p.read_bytes() for p in (run.metrics, run.summary, run.final / "model.safetensors")}
    stamp = run.final.stat().st_mtime_ns
    proc = cli_train(tmp_path, cfg, "--resume")
    assert proc.returncode == 0 and "already finished" in proc.stderr
    assert {p: p.read_bytes() for p in before} == before and run.final.stat().st_mtime_ns == stamp


def test_a_resumed_runs_summary_equals_the_uninterrupted_one(tmp_path, shards, finished):
    ref, cfg = finished
    cfg = dict(cfg, out_dir=str(tmp_path / "r"))
    run = train(config_from_dict(cfg), progress=False)
    shutil.rmtree(run.checkpoints / "step_000006")
    shutil.rmtree(run.final)
    run.summary.unlink()
    train(config_from_dict(dict(cfg, init="resume")), progress=False)
    a, b = (json.loads(r.summary.read_text()) for r in (run, ref))
    for key in ("final_dir", "peak_rss_mb", "peak_rss_train_mb"):  # where, and how much memory: not the run's numbers
        a.pop(key, None), b.pop(key, None)
    assert a == b and a["init"] == "scratch"


def test_downstream_results_survive_the_checkpoint_being_pruned(tmp_path, finished):
    from rewarm.downstream.record import record, run_context

    run = Path(shutil.copytree(finished[0].path, tmp_path / "run"))
    ck = run / "checkpoints" / "step_000003"
    ctx = run_context(ck)  # read before scoring
    shutil.rmtree(ck)  # the live run prunes it while lm-eval scores
    out = record(ck, {"arc_easy": {"acc": 0.5}}, {"limit": 2}, None, ctx)
    assert out == run / "downstream_step_000003.json"
    assert json.loads(out.read_text())["tasks"] == {"arc_easy": {"acc": 0.5}}
    assert metrics(run, "downstream")[-1]["step"] == 3


def test_downstream_under_fsdp_is_refused_before_training(tmp_path, shards):
    from rewarm.distributed import Dist
    from rewarm.start import _check_downstream

    cfg = config_from_dict(small_run_config(tmp_path / "r", shards, **{"eval.downstream.tasks": ["arc_easy"],
                                                                        "distributed.strategy": "fsdp"}))
    with pytest.raises(UserError, match="FSDP shards: use distributed.strategy=ddp"):
        _check_downstream(cfg, Dist(rank=0, world=2))


# --------------------------------------------------------------------------- any value of any field

def test_any_value_of_any_field_is_accepted_or_refused_with_a_message(tmp_path_factory):
    """Property: whatever value (of the field's type or not) a key gets, validation either accepts it
    or raises UserError, never anything else, and writes nothing. Values that pass are then valid
    for the loop's arithmetic (no division by zero, no negative counts)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from rewarm.config import load_config

    values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=12), st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=4)), max_size=3),
                       st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
    base = ["model.preset=tiny", "data.train=[{name: a, path: x}]"]
    root = tmp_path_factory.mktemp("prop")

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(key=st.sampled_from([k for k, _ in config_fields()]), value=values)
    def check(key, value):
        import yaml

        cwd = os.getcwd()
        os.chdir(root)
        try:
            cfg = load_config(None, [*base, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        except UserError:
            return
        finally:
            os.chdir(cwd)
            assert list(root.iterdir()) == []
        t = cfg.train
        assert t.log_interval >= 1 and cfg.eval.interval >= 1 and t.global_batch % t.micro_batch == 0
        assert cfg.checkpoint.keep_last >= 1 and cfg.checkpoint.interval >= 0 and cfg.out_dir.strip()
        assert all(0 <= b < 1 for b in cfg.optimizer.betas) and cfg.optimizer.eps > 0 and 0 <= cfg.seed < 2**32

    check()


# --------------------------------------------------------------------------- found by a hostile new user (second pass)

def test_outputs_never_replace_what_rewarm_did_not_write(tmp_path, shards, tokenizer_dir):
    """`tokenizer train -o` used to delete a non-empty directory; `train` wrote over a folder holding a
    user's own config.yaml / final/ without --overwrite."""
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    src = str(tmp_path / "t.txt")
    Path(src).write_text("def f(x):\n    return x\n" * 200)
    assert_user_error(run_cli("tokenizer", "train", src, "-o", str(mine), "--vocab-size", "300"), "holds other files")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert_user_error(run_cli("tokenizer", "train", src, "-o", str(mine / "thesis.tex"), "--vocab-size", "300"), "is a file")
    assert run_cli("tokenizer", "train", src, "-o", str(tmp_path / "tok"), "--vocab-size", "300").returncode == 0
    assert run_cli("tokenizer", "train", src, "-o", str(tmp_path / "tok"), "--vocab-size", "320").returncode == 0  # a tokenizer: replaced
    user = tmp_path / "project"
    (user / "final").mkdir(parents=True)
    (user / "final" / "model.bin").write_text("theirs")
    (user / "config.yaml").write_text("# my notes\n")
    cfg = small_run_config(user, shards, **SHORT)
    assert_user_error(cli_train(tmp_path, cfg), "already holds a run")
    assert_user_error(cli_train(tmp_path, cfg, "--overwrite"), "not a run directory rewarm made")
    assert (user / "final" / "model.bin").read_text() == "theirs" and (user / "config.yaml").read_text() == "# my notes\n"


def test_commit_sets_the_old_directory_aside_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    tmp = atomic.temp_path(final)
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between setting the old aside and renaming the new in
        return real(src, dst)
    monkeypatch.setattr(atomic.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        atomic.commit(tmp, final)
    aside = tmp_path / f".out.old-{os.getpid()}"
    assert (aside / "a").read_text() == "old" and (tmp / "a").read_text() == "new"  # nothing lost
    monkeypatch.setattr(atomic.os, "replace", real)
    atomic.commit(tmp, final)
    assert (final / "a").read_text() == "new" and (aside / "a").read_text() == "old"  # the old one, still recoverable


def test_manifest_disk_full_removes_the_whole_partial_checkpoint(tmp_path, shards, monkeypatch):
    cfg = small_run_config(tmp_path / "r", shards, **{"train.max_steps": 6, "checkpoint.interval": 3})
    real_write_json = atomic.write_json

    def full_at_second_manifest(path, obj):
        if Path(path).name == "manifest.json" and obj.get("step") == 6:
            raise OSError(28, "No space left on device")
        return real_write_json(path, obj)
    monkeypatch.setattr(checkpoint.atomic, "write_json", full_at_second_manifest)
    proc = cli_train(tmp_path, cfg)
    assert proc.returncode == 4 and "--resume" in proc.stderr, proc.stderr[-1500:]
    assert not list((tmp_path / "r" / "checkpoints").glob(".step_*"))


@pytest.mark.parametrize("text, needle", [
    ("? [a, b]\n: 1\n", "a key must be a name"),
    ("{a: 1}: 2\n", "a key must be a name"),
])
def test_odd_yaml_keys_and_encodings(tmp_path, text, needle):
    (tmp_path / "c.yaml").write_text(text)
    assert_user_error(run_cli("train", str(tmp_path / "c.yaml"), "-q"), needle)
    (tmp_path / "latin.yaml").write_bytes("seed: 0 # caf\xe9\n".encode("latin-1"))
    assert_user_error(run_cli("train", str(tmp_path / "latin.yaml"), "-q"), "not UTF-8 text")


def test_yaml_merge_keys_are_valid_yaml(tmp_path, shards):
    import yaml

    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    train_block = cfg.pop("train")
    text = "defaults: &d\n" + "".join(f"  {k}: {v}\n" for k, v in train_block.items()) + "train:\n  <<: *d\n  max_steps: 3\n"
    text = text.replace("defaults: &d", "x-defaults: &d")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg) + text)
    proc = run_cli("train", str(tmp_path / "c.yaml"), "-q")
    assert "not valid YAML" not in proc.stderr and "unknown config key `x-defaults`" in proc.stderr


@pytest.mark.parametrize("overrides, needle", [
    ({"num_attention_heads": 3}, "does not build or run"),
    ({"hidden_size": -1}, "does not build or run"),
])
def test_model_overrides_that_cannot_run_fail_before_anything_is_written(tmp_path, shards, overrides, needle):
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    cfg["model"]["overrides"].update(overrides)
    assert_user_error(cli_train(tmp_path, cfg), needle, "model.overrides")
    assert not (tmp_path / "r").exists()


def test_resume_with_a_changed_config_of_a_finished_run_is_refused(tmp_path, shards):
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    assert cli_train(tmp_path, cfg).returncode == 0
    assert_user_error(cli_train(tmp_path, cfg, "--resume", "--set", "train.max_steps=9"), "already finished",
                      "cannot be extended", "init: weights")


def test_lone_surrogates_and_bad_meta_fields(tmp_path, tokenizer_dir, shards):
    from rewarm.data.prepare import prepare

    (tmp_path / "d.jsonl").write_text('{"text": "fine text here"}\n{"text": "abc \\ud800"}\n{"text": "more fine text"}\n')
    meta = prepare([str(tmp_path / "d.jsonl")], str(tokenizer_dir), tmp_path / "o", val_fraction=0.0, progress=False)
    assert meta["skipped"]["non_utf8"] == 1 and meta["train"]["documents"] == 2
    bad = shutil.copytree(shards["downstream"], tmp_path / "bad")
    m = json.loads((bad / "meta.json").read_text())
    m["max_token_id"] = "5"
    (bad / "meta.json").write_text(json.dumps(m))
    cfg = small_run_config(tmp_path / "r", shards, **SHORT)
    cfg["data"]["train"][0]["path"] = str(bad)
    assert_user_error(cli_train(tmp_path, cfg), "`max_token_id` must be an integer")

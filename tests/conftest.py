"""Real but small: stdlib code + Shakespeare text, a BPE trained here, a 2-layer GPT-NeoX."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess as _sp
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rewarm import corpora  # noqa: E402
from rewarm.config import set_dotted  # noqa: E402
from rewarm.data.prepare import prepare  # noqa: E402
from rewarm.data.sources import ReadStats, file_documents  # noqa: E402
from rewarm.tokenizer import train_tokenizer  # noqa: E402

SMALL_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def code_files(limit_bytes: int = 300_000) -> list[Path]:
    return corpora.python_stdlib(limit_bytes=limit_bytes)


def prose_files(n: int = 3) -> list[Path]:
    return corpora.shakespeare_modern()[:n]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    stats = ReadStats()
    texts = list(file_documents(code_files(150_000) + prose_files(2), "text", stats))
    return train_tokenizer(texts, 512, out)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for name, files in (("upstream", prose_files(3)), ("downstream", code_files())):
        out[name] = root / name
        prepare([str(f) for f in files], str(tokenizer_dir), out[name], val_tokens=6000, progress=False)
    return out


def small_run_config(out_dir: Path, shards: dict, **overrides) -> dict:
    """A real 2-layer GPT-NeoX run on real shards: a few hundred ms per step."""
    cfg = {
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"preset": "tiny", "overrides": dict(SMALL_MODEL)},
        "data": {
            "train": [{"name": "downstream", "path": str(shards["downstream"])}],
            "eval": [{"name": n, "path": str(p)} for n, p in shards.items()],
        },
        # fp32 pinned: `auto` is bf16 on CPUs with bf16 units, and these runs are compared to the last bit
        "train": {"seq_len": 32, "global_batch": 8, "micro_batch": 4, "max_steps": 6, "precision": "fp32"},
        "schedule": {"name": "cosine", "max_lr": 1e-3, "min_lr": 1e-4, "warmup": 2},
        "eval": {"interval": 3, "tokens": 1024, "batch": 8},
        "checkpoint": {"interval": 3, "keep_last": 5},
    }
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, timeout: int = 300, env: dict | None = None, subprocess: bool = False) -> _sp.CompletedProcess:
    """The `rewarm` CLI as a user runs it: `cli.main` in this process (stdout, stderr and the exit
    code captured; ~4 s of interpreter and import start-up saved per call), or with
    `subprocess=True` a real `python -m rewarm` process, for what only a process shows
    (signals, kills, torchrun, "no traceback" on a real stderr)."""
    if subprocess:
        return _sp.run([sys.executable, "-m", "rewarm", *args], capture_output=True, text=True, timeout=timeout, env=env)
    from rewarm import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    return _sp.CompletedProcess(["rewarm", *args], code, out.getvalue(), err.getvalue())


def metrics(run_dir: Path, event: str | None = None, drop_timing: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    if event:
        rows = [r for r in rows if r["event"] == event]
    if drop_timing:
        for r in rows:
            r.pop("tokens_per_s", None)
            # a retriever's search time and cache hits depend on the clock and on the process's history (resume)
            r.pop("retrieval_ms_per_chunk", None)
            r.pop("retrieval_cache_hit", None)
    return rows


def assert_user_error(proc: _sp.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def interrupt_after(run, step_dir: str) -> None:
    """Leave `run` as if killed after its previous checkpoint: `step_dir`, final/ and the summary gone."""
    import shutil

    shutil.rmtree(run.checkpoints / step_dir)
    shutil.rmtree(run.final)
    run.summary.unlink()


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Two runs gave the same numbers (train and eval events, `==`) and the same final weights (to the bit)."""
    import torch
    from transformers import AutoModelForCausalLM

    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(a_dir)) == strip(metrics(b_dir))
    a = AutoModelForCausalLM.from_pretrained(Path(a_dir) / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(Path(b_dir) / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

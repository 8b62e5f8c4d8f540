"""Real multi-process training: torchrun, gloo, 2 ranks on CPU (DDP and FSDP2)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metrics, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict
from rewarm.train import train

STEPS = {"train.max_steps": 20, "eval.interval": 10, "checkpoint.interval": 10, "train.num_threads": 1}


def torchrun(cfg: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli("train", str(cfg), "-q", "--nproc", "2", *extra, timeout=timeout, subprocess=True)


def strip(events):
    return [e for e in events if e["event"] in ("train", "eval")]


@pytest.fixture(scope="module")
def single(tmp_path_factory, shards):
    """The 1-process reference with the same global batch (8 = 2 ranks x 4 x 1 micro-step)."""
    root = tmp_path_factory.mktemp("single")
    return train(config_from_dict(small_run_config(root / "run", shards, **STEPS)), progress=False)


def assert_close_per_step(a_dir, b_dir, rel=1e-4):
    a, b = metrics(a_dir, "train"), metrics(b_dir, "train")
    assert [e["step"] for e in a] == [e["step"] for e in b] and len(a) >= 20
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
        assert x["lr"] == y["lr"] and x["source_tokens"] == y["source_tokens"]
    ea, eb = metrics(a_dir, "eval"), metrics(b_dir, "eval")
    for x, y in zip(ea, eb):
        for name in x["sets"]:
            assert x["sets"][name]["loss"] == pytest.approx(y["sets"][name]["loss"], rel=rel)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path, shards, single, strategy):
    cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "run", shards, **STEPS, **{"distributed.strategy": strategy}))
    proc = torchrun(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = metrics(tmp_path / "run")[0]
    assert start["world_size"] == 2 and start["strategy"] == strategy
    assert_close_per_step(tmp_path / "run", single.path)
    # only rank 0 wrote: one line per step, one final/ that plain transformers loads
    assert len(metrics(tmp_path / "run", "train")) == 20
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ref = AutoModelForCausalLM.from_pretrained(single.final)
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


LLAMA = {"preset": "llama-tiny", "overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                               "num_key_value_heads": 2, "intermediate_size": 64}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_llama_two_ranks_match_one_process(tmp_path, shards, strategy):
    """The Llama family through DDP and FSDP2 (decoder layers found generically, tied head)."""
    one = small_run_config(tmp_path / "one", shards, **STEPS)
    one["model"] = dict(LLAMA)
    ref = train(config_from_dict(one), progress=False)
    two = small_run_config(tmp_path / "two", shards, **STEPS, **{"distributed.strategy": strategy})
    two["model"] = dict(LLAMA)
    proc = torchrun(write_config(tmp_path / "c.yaml", two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(tmp_path / "two")[0]["strategy"] == strategy
    assert_close_per_step(tmp_path / "two", ref.path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    for (k, a), b in zip(model.state_dict().items(), AutoModelForCausalLM.from_pretrained(ref.final).state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


# DDP with a mixer model once hung a rank at exit (the gloo Reducer outliving its process group):
# train() now frees the wrapped model before tearing the group down; this case guards that
@pytest.mark.parametrize("strategy,mixer", [("ddp", "mom/softmax@2"), ("fsdp", "deltanet")])
def test_mixer_models_two_ranks_match_one_process(tmp_path, shards, strategy, mixer):
    """rewarm.mixers' model through DDP and FSDP2 (MoM's load-balancing loss averaged over ranks)."""
    model_cfg = {**LLAMA, "mixer": mixer, "overrides": {**LLAMA["overrides"], "chunk_size": 16}}
    one = small_run_config(tmp_path / "one", shards, **STEPS)
    one["model"] = model_cfg
    ref = train(config_from_dict(one), progress=False)
    two = small_run_config(tmp_path / "two", shards, **STEPS, **{"distributed.strategy": strategy})
    two["model"] = model_cfg
    proc = torchrun(write_config(tmp_path / "c.yaml", two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close_per_step(tmp_path / "two", ref.path)
    if mixer.startswith("mom"):
        for a, b in zip(metrics(tmp_path / "two", "train"), metrics(ref.path, "train")):
            assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    assert type(model).__name__ == "MixerForCausalLM"
    for (k, a), b in zip(model.state_dict().items(), AutoModelForCausalLM.from_pretrained(ref.final).state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_save_at_two_ranks_resume_at_one(tmp_path, shards, single):
    raw = small_run_config(tmp_path / "run", shards, **STEPS, **{"distributed.strategy": "fsdp"})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert torchrun(cfg).returncode == 0
    run = tmp_path / "run"
    two_rank = strip(metrics(run))
    shutil.rmtree(run / "checkpoints" / "step_000020")
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    done = run_cli("train", str(cfg), "-q", "--resume")  # one process now
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = strip(metrics(run))
    assert resumed[: len(resumed) // 2] == two_rank[: len(resumed) // 2]  # history untouched up to step 10
    for x, y in zip(resumed, two_rank):
        if x["event"] == "train":
            assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert metrics(run)[-1]["event"] == "end"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_killing_one_rank_ends_the_job_and_resume_continues(tmp_path, shards, single):
    raw = small_run_config(tmp_path / "run", shards, **{**STEPS, "train.max_steps": 40, "checkpoint.interval": 5})
    cfg = write_config(tmp_path / "c.yaml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "rewarm", "train", str(cfg), "-q", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts / "step_000010").exists():
        time.sleep(0.05)
    workers = _children(proc.pid)  # torchrun's rank processes (--nproc execs torchrun in place)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)  # no hang: the job ends
    assert proc.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err
    assert not (tmp_path / "run" / "summary.json").exists()
    done = run_cli("train", str(cfg), "-q", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    events = strip(metrics(tmp_path / "run"))
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, 41))

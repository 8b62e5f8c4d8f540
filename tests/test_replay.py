"""`rewarm replay generate`: the initial model's own samples become an ordinary shard directory that a
run mixes in as replay; the same seed gives the same text; bad inputs exit 2."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXModel

from conftest import assert_same_run, assert_user_error, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict
from rewarm.train import train


@pytest.fixture(scope="module")
def initial(tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("initial")
    return train(config_from_dict(small_run_config(root / "run", shards, **{"train.max_steps": 4})), progress=False).final


def test_generated_replay_is_a_shard_directory_a_run_mixes_in(initial, tmp_path, shards):
    out = tmp_path / "self"
    proc = run_cli("replay", "generate", str(initial), "-o", str(out), "--tokens", "600", "--unconditional",
                   "--length", "24", "--batch", "8", "-q")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    g = meta["generated"]
    assert g["tokens_generated"] >= 600 and g["prompts"] == "unconditional" and g["temperature"] == 1.0
    assert meta["train"]["tokens"] > 0 and g["tokens_per_s"] > 0 and "tokens/s" in proc.stdout
    texts = [json.loads(x)["text"] for x in (out / "samples.jsonl").read_text().splitlines()]
    assert 0 < len(texts) <= g["samples"]  # samples of whitespace only are dropped
    # the same seed: the same text
    again = tmp_path / "again"
    assert run_cli("replay", "generate", str(initial), "-o", str(again), "--tokens", "600", "--unconditional",
                   "--length", "24", "--batch", "8", "-q").returncode == 0
    assert (again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()
    # prompts are continued
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nclass Foo:\n")
    assert run_cli("replay", "generate", str(initial), "-o", str(tmp_path / "p"), "--tokens", "100", "--prompts",
                   str(prompts), "--length", "16", "-q").returncode == 0
    # a run mixes it in like any replay source
    cfg = small_run_config(tmp_path / "run", shards, **{"init": "weights", "model": {"path": str(initial)},
                                                        "train.max_steps": 3})
    cfg["data"]["train"].append({"name": "self_replay", "path": str(out), "weight": 0.25})
    run = train(config_from_dict(cfg), progress=False)
    assert metrics(run.path, "train")[-1]["source_tokens"]["self_replay"] > 0
    assert run_cli("report", str(run.path), "-o", str(tmp_path / "rep")).returncode == 0
    table = (tmp_path / "rep" / "report.md").read_text().split("## Replay: real vs self-generated")[1]
    assert "self_replay 20% (self-generated)" in table and "downstream 80%" in table


def test_bad_replay_inputs_exit_2(initial, tmp_path):
    base = ["replay", "generate", str(initial), "-o", str(tmp_path / "o")]
    assert_user_error(run_cli(*base, "--tokens", "0", "--unconditional"), "--tokens must be a positive")
    assert_user_error(run_cli(*base, "--tokens", "10"), "--unconditional", "--prompts")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_user_error(run_cli(*base, "--tokens", "10", "--prompts", str(empty)), "holds no prompts")
    assert_user_error(run_cli(*base, "--tokens", "10", "--unconditional", "--temperature", "0"), "--temperature")
    headless = tmp_path / "headless"
    GPTNeoXModel(GPTNeoXConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=16)).save_pretrained(headless)
    AutoTokenizer.from_pretrained(initial).save_pretrained(headless)
    assert_user_error(run_cli("replay", "generate", str(headless), "-o", str(tmp_path / "h"), "--tokens", "10",
                              "--unconditional"), "no language-modelling head")
    assert not (tmp_path / "o").exists() and not (tmp_path / "h").exists()


def test_kl_to_the_initial_model_on_replay_rows(initial, tmp_path, shards):
    """replay.kl_coef: zero KL before the first update (student = teacher), positive after, a different
    run from the plain self-replay one, bit-exact resume; refused where it cannot apply."""
    out = tmp_path / "self"
    assert run_cli("replay", "generate", str(initial), "-o", str(out), "--tokens", "600", "--unconditional",
                   "--length", "24", "--batch", "8", "-q").returncode == 0

    def cfg(name, **extra):
        raw = small_run_config(tmp_path / name, shards, **{"init": "weights", "model": {"path": str(initial)},
                                                           "train.max_steps": 6, "checkpoint.interval": 3, **extra})
        raw["data"]["train"].append({"name": "self_replay", "path": str(out), "weight": 0.5})
        return raw

    plain = train(config_from_dict(cfg("plain")), progress=False)
    kl = train(config_from_dict(cfg("kl", **{"replay.kl_coef": 1.0})), progress=False)
    steps = metrics(kl.path, "train")
    assert abs(steps[0]["replay_kl"]) < 1e-6 and all(e["replay_kl"] > 0 for e in steps[2:] if e["replay_kl"] is not None)
    assert [e["loss"] for e in steps][1:] != [e["loss"] for e in metrics(plain.path, "train")][1:]
    # killed after step 3 and resumed: the same run (the teacher is loaded again from model.path)
    again = train(config_from_dict(cfg("again", **{"replay.kl_coef": 1.0})), progress=False)
    interrupt_after(again, "step_000006")
    train(config_from_dict({**cfg("again", **{"replay.kl_coef": 1.0}), "init": "resume"}), progress=False)
    assert_same_run(again.path, kl.path)
    # under DDP the term's gradients join the main ones (it runs inside no_sync, before the micro-batches)
    two = run_cli("train", str(write_config(tmp_path / "ddp.yaml", cfg("ddp", **{"replay.kl_coef": 1.0}))), "-q",
                  "--nproc", "2", subprocess=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ddp = metrics(tmp_path / "ddp", "train")
    assert len(ddp) == 6 and abs(ddp[0]["replay_kl"]) < 1e-6 and ddp[-1]["loss"] == ddp[-1]["loss"]
    bad = cfg("bad", **{"replay.kl_coef": 1.0, "replay.sources": ["nope"]})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "b.yaml", bad))), "not data.train sources")
    weightless = cfg("bad4", **{"replay.kl_coef": 1.0})
    weightless["data"]["train"][-1]["weight"] = 0.0
    assert_user_error(run_cli("train", str(write_config(tmp_path / "w.yaml", weightless))), "has weight 0")
    gone = cfg("bad5", **{"replay.kl_coef": 1.0, "model.path": str(tmp_path / "nowhere")})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "g.yaml", gone))), "KL teacher")
    uneven = cfg("bad6", **{"train.micro_batch": 8})
    proc = run_cli("train", str(write_config(tmp_path / "u.yaml", uneven)), "--nproc", "2", subprocess=True)
    assert_user_error(proc, "not divisible")
    assert proc.stderr.count("error:") == 1
    fsdp = cfg("bad1", **{"replay.kl_coef": 1.0, "distributed.strategy": "fsdp"})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "f.yaml", fsdp))), "distributed.strategy: ddp")
    scratch = {**cfg("bad2", **{"replay.kl_coef": 1.0}), "init": "scratch", "model": {"preset": "tiny"}}
    assert_user_error(run_cli("train", str(write_config(tmp_path / "s.yaml", scratch))), "from-scratch")
    none = small_run_config(tmp_path / "bad3", shards, **{"init": "weights", "model": {"path": str(initial)},
                                                         "replay.kl_coef": 1.0})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "n.yaml", none))), "no data.train source is a replay")

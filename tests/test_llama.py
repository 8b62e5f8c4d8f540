"""Llama-family models through rewarm: a tiny random Llama (GQA, RMSNorm, SwiGLU, tied embeddings)
on the same real shards as the GPT-NeoX tests — scratch, weights, resume, compile, eval CLI,
activation checkpointing, text samples, live views, generate. No download."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import assert_same_run, assert_user_error, interrupt_after, metrics, run_cli, small_run_config
from rewarm.config import config_from_dict
from rewarm.train import train

LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}


def llama_config(out_dir, shards, **overrides):
    cfg = small_run_config(out_dir, shards, **overrides)
    cfg["model"] = {"preset": "llama-tiny", "overrides": dict(LLAMA)}
    return cfg


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, shards):
    cfg = llama_config(tmp_path_factory.mktemp("llama") / "scratch", shards)
    return train(config_from_dict(cfg), progress=False), cfg


def test_scratch_llama_is_a_plain_llama_with_grouped_query_attention(llama_run):
    run, _ = llama_run
    model = AutoModelForCausalLM.from_pretrained(run.final)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads == 2
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    losses = [e["loss"] for e in metrics(run.path, "train")]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_eval_cli_equals_the_logged_eval_and_plain_transformers(llama_run, shards):
    run, cfg = llama_run
    logged = metrics(run.path, "eval")[-1]["sets"]
    proc = run_cli("eval", str(run.final), "--data", f"upstream={shards['upstream']}", "--data",
                   f"downstream={shards['downstream']}", "--seq-len", "32", "--eval-tokens", "1024", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    for name in ("upstream", "downstream"):
        assert got[name]["loss"] == pytest.approx(logged[name]["loss"], abs=1e-5)


def test_weights_then_resume_is_bit_exact(tmp_path, shards, llama_run):
    """Continual pre-training of the Llama (init: weights), interrupted after step 3 and resumed."""
    base = llama_config(tmp_path / "w", shards, init="weights")
    base["model"] = {"path": str(llama_run[0].final)}
    full = train(config_from_dict(base), progress=False)
    cont = dict(base, out_dir=str(tmp_path / "r"))
    interrupt_after(train(config_from_dict(cont), progress=False), "step_000006")
    resumed = train(config_from_dict(dict(cont, init="resume")), progress=False)
    assert_same_run(resumed.path, full.path)
    assert metrics(full.path)[0]["model_from"] == str(llama_run[0].final)


def test_untied_llama_and_compiled_body_train_like_eager(tmp_path, shards):
    eager = llama_config(tmp_path / "e", shards, **{"train.max_steps": 3})
    eager["model"]["overrides"]["tie_word_embeddings"] = False
    compiled = dict(eager, out_dir=str(tmp_path / "c"), train=dict(eager["train"], compile=True))
    a = metrics(train(config_from_dict(eager), progress=False).path, "train")
    b = metrics(train(config_from_dict(compiled), progress=False).path, "train")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    untied = AutoModelForCausalLM.from_pretrained(tmp_path / "e" / "final")
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_activation_checkpointing_gives_the_same_steps(tmp_path, shards, llama_run):
    cfg = llama_config(tmp_path / "ac", shards, **{"train.activation_checkpointing": True})
    run = train(config_from_dict(cfg), progress=False)
    for x, y in zip(metrics(run.path, "train"), metrics(llama_run[0].path, "train")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    summary = json.loads(run.summary.read_text())
    assert metrics(run.path)[0]["peak_rss_mb"] > 0 and summary["peak_rss_mb"] > 0
    assert 0 < summary["peak_rss_train_mb"] <= summary["peak_rss_mb"]  # the steps' own high-water mark (Linux)


def test_text_samples_are_logged_greedy_and_leave_training_unchanged(tmp_path, shards, llama_run):
    prompts = ["def main(", "To be, or not"]
    cfg = llama_config(tmp_path / "s", shards, **{"eval.samples": {"prompts": prompts, "max_new_tokens": 5}})
    run = train(config_from_dict(cfg), progress=False)
    samples = metrics(run.path, "samples")
    assert [e["step"] for e in samples] == [e["step"] for e in metrics(run.path, "eval")] == [0, 3, 6]
    assert [s["prompt"] for s in samples[0]["samples"]] == prompts and all(isinstance(s["text"], str) for s in samples[0]["samples"])
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(run.path)) == strip(metrics(llama_run[0].path))  # sampling does not touch the run's RNG
    # greedy: `rewarm generate` on the final weights prints the last logged continuations
    gen = run_cli("generate", str(run.final), "--prompt", prompts[0], "--max-new-tokens", "5")
    assert gen.returncode == 0 and gen.stdout.splitlines()[0] == prompts[0] + samples[-1]["samples"][0]["text"]
    assert_user_error(run_cli("generate", str(run.final), "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens")
    long = run_cli("generate", str(run.final), "--prompt", "To be, or not " * 400, "--max-new-tokens", "3")
    assert long.returncode == 0 and "continuing its last 1021 tokens" in long.stderr, long.stderr[-2000:]
    with pytest.raises(Exception, match="list of strings"):
        config_from_dict(llama_config(tmp_path / "bad", shards, **{"eval.samples": {"prompts": [1, 2]}}))


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path, shards):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = llama_config(tmp_path / "tb", shards, **{"logging.tensorboard": True})
    run = train(config_from_dict(cfg), progress=False)
    acc = EventAccumulator(str(run.path / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    logged = [(e["step"], e["loss"]) for e in metrics(run.path, "train")]
    assert [s for s, _ in loss] == [s for s, _ in logged]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(loss, logged))
    assert [e.step for e in acc.Scalars("eval/upstream/loss")] == [0, 3, 6]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])


def test_wandb_offline_run_gets_the_logged_scalars(tmp_path, shards, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = llama_config(tmp_path / "wb", shards, **{"logging.wandb": True})
    run = train(config_from_dict(cfg), progress=False)
    files = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run.path / "wandb").rglob("*"))[:20]
    # the offline record log holds each history item as its key and its JSON value (protobuf strings)
    data = files[0].read_bytes()
    last = metrics(run.path, "train")[-1]
    assert b"train/loss" in data and b"eval/upstream/loss" in data and json.dumps(last["loss"]).encode() in data
    assert json.dumps(metrics(run.path, "eval")[-1]["sets"]["upstream"]["loss"]).encode() in data

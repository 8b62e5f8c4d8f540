"""Mixer models through the whole pipeline (`model.mixer` on a Llama-family preset): train from
scratch, checkpoint, resume bit-exactly, load with AutoModelForCausalLM, `rewarm eval`, DDP/FSDP."""
from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from conftest import assert_same_run, assert_user_error, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict
from rewarm.train import train

SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64, "chunk_size": 16}


def mixer_config(out_dir, shards, mixer, **overrides):
    cfg = small_run_config(out_dir, shards, **overrides)
    cfg["model"] = {"preset": "llama-tiny", "mixer": mixer, "overrides": dict(SHAPE)}
    return cfg


@pytest.mark.parametrize("mixer", ["deltanet/softmax@2", "mom", "liger", "hedgehog", "gla", "transnormer", "lolcats"])
def test_mixer_model_trains_resumes_bit_exactly_and_loads_with_automodel(tmp_path, shards, mixer):
    cfg = mixer_config(tmp_path / "full", shards, mixer)
    full = train(config_from_dict(cfg), progress=False)
    assert len(metrics(full.path, "train")) == 6
    evals = [e["sets"]["downstream"]["loss"] for e in metrics(full.path, "eval")]  # the data it trains on
    assert evals[-1] < evals[0]
    if mixer == "mom":  # the load-balancing loss the model returns is added and logged
        aux = [e["aux_loss"] for e in metrics(full.path, "train")]
        assert all(0.01 * 0.99 <= a <= 0.01 * 3 for a in aux), aux
    else:
        assert "aux_loss" not in metrics(full.path, "train")[0]
    cont = dict(cfg, out_dir=str(tmp_path / "cut"))
    interrupt_after(train(config_from_dict(cont), progress=False), "step_000006")
    resumed = train(config_from_dict(dict(cont, init="resume")), progress=False)
    assert_same_run(resumed.path, full.path)
    model = AutoModelForCausalLM.from_pretrained(full.final)
    assert type(model).__name__ == "MixerForCausalLM"
    expected = {"deltanet/softmax@2": ["deltanet", "softmax"], "transnormer": ["diag_attention", "norm_attention"]}
    assert model.config.mixer == expected.get(mixer, [mixer] * 2)
    proc = run_cli("eval", str(full.final), "--data", f"upstream={shards['upstream']}", "--seq-len", "32",
                   "--eval-tokens", "1024", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = metrics(full.path, "eval")[-1]["sets"]["upstream"]["loss"]
    assert json.loads(proc.stdout)["upstream"]["loss"] == pytest.approx(logged, abs=1e-5)


def test_every_mixer_trains_in_bf16_on_any_cpu(tmp_path, shards):
    """bf16 autocast, pinned (what `precision: auto` picks on a CPU with bf16 units): the delta rule's
    triangular solve has no bf16 kernel on CPU and once crashed here; it now runs in fp32 inside."""
    for mixer in ("deltanet", "mom", "liger", "hedgehog", "transnormer", "lolcats"):
        cfg = mixer_config(tmp_path / mixer, shards, mixer, **{"train.precision": "bf16", "train.max_steps": 3,
                                                                "eval.interval": 3, "checkpoint.interval": 0})
        run = train(config_from_dict(cfg), progress=False)
        losses = [e["loss"] for e in metrics(run.path, "train")]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses), (mixer, losses)


def test_activation_checkpointing_gives_the_same_steps(tmp_path, shards):
    plain = train(config_from_dict(mixer_config(tmp_path / "a", shards, "deltanet")), progress=False)
    ckpt = train(config_from_dict(mixer_config(tmp_path / "b", shards, "deltanet",
                                               **{"train.activation_checkpointing": True})), progress=False)
    for a, b in zip(metrics(plain.path, "train"), metrics(ckpt.path, "train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_bad_mixer_settings_exit_2(tmp_path, shards):
    bad = mixer_config(tmp_path / "x", shards, "deltanett")
    assert_user_error(run_cli("train", str(write_config(tmp_path / "a.yaml", bad))), "did you mean `deltanet`")
    neox = small_run_config(tmp_path / "y", shards)
    neox["model"]["mixer"] = "deltanet"
    assert_user_error(run_cli("train", str(write_config(tmp_path / "b.yaml", neox))), "needs a Llama-family shape")
    weights = mixer_config(tmp_path / "z", shards, "hedgehog", init="weights")
    weights["model"]["path"] = str(tmp_path)
    assert_user_error(run_cli("train", str(write_config(tmp_path / "c.yaml", weights))), "rewarm linearize")
    odd = mixer_config(tmp_path / "w", shards, {"every": 2})
    assert_user_error(run_cli("train", str(write_config(tmp_path / "d.yaml", odd))), "`model.mixer` must be")
    backend = mixer_config(tmp_path / "v", shards, "mom")
    backend["model"]["mixer_backend"] = "triton"
    assert_user_error(run_cli("train", str(write_config(tmp_path / "e.yaml", backend))), "model.mixer_backend")
    for name, (mixer, needle) in enumerate([("transnormer/softmax@2", "whole-model pattern"),
                                            ("deltanet/softmax@-1", "between 1 and the number of layers"),
                                            ("deltanet/softmax@9", "between 1 and the number of layers")]):
        cfg = mixer_config(tmp_path / "u", shards, mixer)
        assert_user_error(run_cli("train", str(write_config(tmp_path / f"p{name}.yaml", cfg))), needle)
    zero = mixer_config(tmp_path / "u", shards, "hedgehog")
    zero["model"]["overrides"]["chunk_size"] = 0
    assert_user_error(run_cli("train", str(write_config(tmp_path / "z.yaml", zero))), "chunk_size must be a positive")
    soft = mixer_config(tmp_path / "u", shards, "softmax", init="weights")
    soft["model"]["path"] = str(tmp_path)
    assert_user_error(run_cli("train", str(write_config(tmp_path / "s.yaml", soft))), "rewarm linearize")
    for d in "xyzwvu":
        assert not (tmp_path / d).exists()


def test_a_mixer_list_follows_the_overridden_layer_count(tmp_path, shards):
    cfg = mixer_config(tmp_path / "l", shards, ["deltanet", "softmax"], **{"train.max_steps": 3})
    run = train(config_from_dict(cfg), progress=False)
    assert AutoModelForCausalLM.from_pretrained(run.final).config.mixer == ["deltanet", "softmax"]


def test_softmax_keeps_the_presets_own_llama(tmp_path, shards):
    from rewarm.model import build_config

    cfg = build_config("llama-tiny", None, {}, 300, None, 0, mixer="softmax")
    assert cfg.model_type == "llama"
    hybrid = build_config("llama-tiny", None, {}, 300, None, 0, mixer="hedgehog/softmax@2")
    assert hybrid.model_type == "rewarm_mixer" and hybrid.mixer == ["hedgehog", "softmax"] * 2
    model = AutoModelForCausalLM.from_config(hybrid)
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds == ["LinearAttention", "SoftmaxAttention"] * 2
    # the same shape as the preset's Llama: every Llama weight has a place in the mixer model
    llama = AutoModelForCausalLM.from_config(cfg)
    assert set(llama.state_dict()) <= set(model.state_dict())

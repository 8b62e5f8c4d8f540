"""`rewarm linearize` on a tiny Llama trained here: conversions that must reproduce the teacher
exactly, attention transfer that lowers its loss, LoRA merges that change nothing, the whole
command end to end, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_user_error, interrupt_after, metrics, run_cli, small_run_config, write_config
from rewarm.config import config_from_dict
from rewarm.linearize.convert import convert, new_parameter_fragments
from rewarm.mixers.modeling import MixerForCausalLM
from rewarm.rundir import RunDir
from rewarm.train import train

LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, shards):
    cfg = small_run_config(tmp_path_factory.mktemp("teacher") / "run", shards, **{"train.max_steps": 12})
    cfg["model"] = {"preset": "llama-tiny", "overrides": dict(LLAMA)}
    return train(config_from_dict(cfg), progress=False).final


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


def ids(n=40, seed=0):
    return torch.randint(0, 300, (2, n), generator=torch.Generator().manual_seed(seed))


def test_softmax_and_a_window_covering_the_sequence_reproduce_the_teacher(teacher):
    x = ids()
    want = teacher(x).logits
    same, new = convert(teacher, "softmax")
    assert new == [] and torch.allclose(same.eval()(x, use_cache=False).logits, want, atol=1e-5)
    hybrid, new = convert(teacher, "lolcats", window=40, feature_dim=16)  # no token left for the linear part
    assert set(new_parameter_fragments(new)) == {"self_attn.feature_map", "self_attn.window_factor"}
    assert torch.allclose(hybrid.eval()(x, use_cache=False).logits, want, atol=1e-5)
    short, _ = convert(teacher, "lolcats", window=8, feature_dim=16)
    assert not torch.allclose(short.eval()(x, use_cache=False).logits, want, atol=1e-3)


def test_attention_transfer_trains_only_the_new_parameters_and_lowers_its_loss(teacher):
    student, new = convert(teacher, "hedgehog", feature_dim=16)
    student.config.attention_transfer, student.config.trainable = True, new_parameter_fragments(new)
    student.apply_trainable()
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("feature_map" in n for n in trainable)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    student.train()
    losses = []
    before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    for step in range(30):
        out = student.model(input_ids=ids(seed=step % 3), use_cache=False)
        losses.append(out.aux_loss.item())
        out.aux_loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters() if not p.requires_grad)
    # the teacher path carries the hidden states: the LM loss on them is the teacher's
    x = ids()
    t_loss = torch.nn.functional.cross_entropy(teacher(x).logits[:, :-1].reshape(-1, teacher.config.vocab_size),
                                               x[:, 1:].reshape(-1))
    hidden = student.model(input_ids=x, use_cache=False).last_hidden_state
    s_loss = torch.nn.functional.cross_entropy(student.lm_head(hidden)[:, :-1].reshape(-1, teacher.config.vocab_size),
                                               x[:, 1:].reshape(-1))
    assert s_loss.item() == pytest.approx(t_loss.item(), abs=1e-5)


def test_lora_merge_leaves_outputs_unchanged_and_round_trips(teacher, tmp_path):
    from rewarm.mixers.lora import LoRALinear

    student, _ = convert(teacher, "liger", lora_rank=4, lora_targets=["q_proj", "v_proj", "down_proj"])
    adapters = [m for m in student.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 3 * 2
    for m in adapters:  # trained adapters are not zero
        torch.nn.init.normal_(m.lora_B, std=0.05)
    student.eval()
    x = ids()
    before = student(x, use_cache=False).logits
    assert student.merge_adapters() == 6
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    assert torch.allclose(student(x, use_cache=False).logits, before, atol=1e-5)
    student.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.lora_rank == 0 and torch.allclose(back(x, use_cache=False).logits, before, atol=1e-5)
    out = back.generate(x[:1, :6], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)


def linearize_config(tmp_path, shards, teacher_dir, **spec):
    cfg = small_run_config(tmp_path / "lin", shards, **{"eval.samples": {"prompts": ["def f(", "To be"],
                                                                          "max_new_tokens": 4}})
    cfg["model"] = {"path": str(teacher_dir)}
    cfg["linearize"] = {"recipe": "lolcats_hybrid", "window": 8, "feature_dim": 8, "stage1_steps": 6,
                        "stage2_steps": 4, "compare_contexts": [64, 4096], "compare_new_tokens": 4, **spec}
    return write_config(tmp_path / "lin.yaml", cfg)


def test_linearize_end_to_end(tmp_path, shards, teacher_dir):
    cfg = linearize_config(tmp_path, shards, teacher_dir)
    proc = run_cli("linearize", str(cfg), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "lin"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "lolcats_hybrid" and summary["lora_merged"] == 4 * 2
    s1 = metrics(out / "stage1_transfer", "train")
    assert s1[-1]["aux_loss"] < s1[0]["aux_loss"]  # attention transfer learns
    s2 = metrics(out / "stage2_lora")
    assert s2[0]["event"] == "start" and len(metrics(out / "stage2_lora", "train")) == 4
    held = summary["held_out"]
    assert set(held["teacher"]) == {"upstream", "downstream"} and set(held["student_linear_branch_zeroed"]) == set(held["teacher"])
    assert summary["decode"]["64"]["student_tok_s"] > 0 and "skipped" in summary["decode"]["4096"]
    assert summary["decode"]["64"]["teacher_state_mb"] > 0 and len(summary["samples"]) == 2
    assert "| upstream |" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "MixerForCausalLM" and model.config.lora_rank == 0
    assert model.config.mixer == ["lolcats", "lolcats"] and not model.config.attention_transfer
    # the final student's held-out loss is what `rewarm eval` says
    ev = run_cli("eval", str(out / "final"), "--data", f"upstream={shards['upstream']}", "--seq-len", "32",
                 "--eval-tokens", "1024", "--json")
    assert json.loads(ev.stdout)["upstream"]["loss"] == pytest.approx(held["student"]["upstream"], abs=1e-4)
    # again: finished stages are kept, the result is the same
    again = run_cli("linearize", str(cfg), "-q")
    assert again.returncode == 0 and json.loads((out / "summary.json").read_text())["held_out"] == held
    # a stage stopped before its first checkpoint starts again under the config as it is now (a fix applies)
    import shutil

    s2_dir = out / "stage2_lora"
    shutil.rmtree(s2_dir / "checkpoints"), shutil.rmtree(s2_dir / "final"), (s2_dir / "summary.json").unlink()
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(cfg.read_text().replace("precision: fp32", "precision: bf16"))
    assert run_cli("linearize", str(fixed), "-q").returncode == 0
    assert json.loads((s2_dir / "summary.json").read_text())["status"] == "completed"
    assert "bf16" in (s2_dir / "config.yaml").read_text()
    # a stage with a checkpoint resumes only under its own config: the message says what to do here
    interrupt_after(RunDir(s2_dir), "step_000004")
    assert_user_error(run_cli("linearize", str(cfg), "-q"), "put the setting back", "train.precision")
    # another recipe in the same out_dir would silently reuse this one's stages: refused
    other = linearize_config(tmp_path, shards, teacher_dir, recipe="deltanet")
    assert_user_error(run_cli("linearize", str(other)), "holds a different linearize run", "recipe")


def test_liger_skips_stage_1_and_tasks_compare_teacher_and_student(tmp_path, shards, teacher_dir):
    cache = tmp_path / "teacher.json"
    cfg = linearize_config(tmp_path, shards, teacher_dir, recipe="liger", stage2_steps=3, compare_contexts=[32],
                           compare_teacher_cache=str(cache))
    cfg.write_text(cfg.read_text().replace("\neval:\n", "\neval:\n  downstream: {tasks: [arc_easy], limit: 4, batch: 4}\n", 1))
    proc = run_cli("linearize", str(cfg), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = json.loads((tmp_path / "lin" / "summary.json").read_text())["downstream"]["arc_easy"]
    assert 0 <= task["teacher_acc"] <= 1 and 0 <= task["student_acc"] <= 1 and "arc_easy: accuracy teacher" in proc.stdout
    assert not (tmp_path / "lin" / "stage1_transfer").exists()
    summary = json.loads((tmp_path / "lin" / "summary.json").read_text())
    assert summary["new_parameters"] == [] and summary["lora_merged"] == 3 * 2
    # the tasks are scored once, in the comparison: the stage's own run never scores them
    assert not any("arc_easy" in json.dumps(r) for r in metrics(tmp_path / "lin" / "stage2_lora"))
    # the teacher's side is kept in the shared cache: a second recipe reads it instead of scoring again
    (key, kept), = json.loads(cache.read_text()).items()
    assert kept["held_out"] == summary["held_out"]["teacher"] and kept["downstream"]["arc_easy"]["acc"] == task["teacher_acc"]
    kept["held_out"] = {name: 123.0 for name in kept["held_out"]}  # a marker: only a cache hit can report it
    cache.write_text(json.dumps({key: kept}))
    second = tmp_path / "second.yaml"
    second.write_text(cfg.read_text().replace(str(tmp_path / "lin"), str(tmp_path / "lin2")))
    assert run_cli("linearize", str(second), "-q").returncode == 0
    assert set(json.loads((tmp_path / "lin2" / "summary.json").read_text())["held_out"]["teacher"].values()) == {123.0}
    cache.write_text("{not json")  # a damaged cache is recomputed, not trusted
    (tmp_path / "lin2" / "summary.json").unlink()
    assert run_cli("linearize", str(second), "-q").returncode == 0
    assert json.loads((tmp_path / "lin2" / "summary.json").read_text())["held_out"]["teacher"] == summary["held_out"]["teacher"]


def test_bad_linearize_input_exits_2(tmp_path, shards, teacher_dir):
    cases = [({"recipe": "lolcat"}, "did you mean `lolcats`"),
             ({"recipe": ["lolcats"]}, "unknown recipe"),
             ({"window": 32}, "not below `train.seq_len`"),
             ({"feature_dim": -4}, "`linearize.feature_dim` must be a positive integer"),
             ({"stage2_lr": "abc"}, "`linearize.stage2_lr` must be a positive number"),
             ({"stage1_lr": 0}, "`linearize.stage1_lr` must be a positive number"),
             ({"lora_alpha": "big"}, "`linearize.lora_alpha`"),
             ({"lora_targets": "q_proj"}, "non-empty list"),
             ({"compare_contexts": [True]}, "list of positive integers"),
             ({"compare_contexts": 64}, "list of positive integers"),
             ({"lora_targets": ["qkv_proj"]}, "LoRA target `qkv_proj`"),
             ({"stage1_steps": 0, "stage2_steps": 0}, "nothing would train"),
             ({"compare_teacher_cache": 5}, "path of a .json file"),
             ({"recipe": "liger", "stage1_steps": 3, "stage2_steps": 0}, "has no stage 1"),
             ({"windw": 4}, "did you mean `window`")]
    for spec, needle in cases:
        assert_user_error(run_cli("linearize", str(linearize_config(tmp_path, shards, teacher_dir, **spec))), needle)
    neox = small_run_config(tmp_path / "neox", shards, **{"train.max_steps": 3})
    neox_final = train(config_from_dict(neox), progress=False).final
    assert_user_error(run_cli("linearize", str(linearize_config(tmp_path, shards, neox_final))),
                      "cannot linearize a `gpt_neox` model", "LlamaAttention")
    assert not (tmp_path / "lin").exists()  # refused before anything was written: the teacher can be fixed
    ok = run_cli("linearize", str(linearize_config(tmp_path, shards, teacher_dir, stage1_steps=1, stage2_steps=0)), "-q")
    assert ok.returncode == 0, ok.stderr[-2000:]
    cfg = linearize_config(tmp_path, shards, teacher_dir)
    cfg.write_text(cfg.read_text().replace(str(teacher_dir), str(tmp_path / "no-such-teacher")))
    assert_user_error(run_cli("linearize", str(cfg)), "does not exist")


def test_mixer_model_is_a_student_class(teacher):
    student, _ = convert(teacher, "deltanet")
    assert isinstance(student, MixerForCausalLM)
    assert {"self_attn.b_proj", "self_attn.q_conv", "self_attn.o_norm"} <= set(new_parameter_fragments(_))

"""The training loop end to end on real shards, a real BPE and a real GPT-NeoX."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_same_run, interrupt_after, metrics, small_run_config
from rewarm.config import config_from_dict
from rewarm.data.mixture import Mixture, Source
from rewarm.data.shards import TokenShards
from rewarm.schedules import build_schedule
from rewarm.train import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, shards):
    cfg = config_from_dict(small_run_config(tmp_path_factory.mktemp("runs") / "a", shards))
    return train(cfg, progress=False), cfg


def test_run_directory_layout(finished_run):
    run, cfg = finished_run
    assert (run.path / "config.yaml").is_file() and run.summary.is_file()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_000003", "step_000006"]
    for ck in run.checkpoints.iterdir():
        assert {"config.json", "model.safetensors", "trainer_state.pt", "manifest.json", "tokenizer.json"} <= {p.name for p in ck.iterdir()}
    events = metrics(run.path)
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "end"
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 3, 6]
    first = next(e for e in events if e["event"] == "train")
    assert set(first) >= {"step", "tokens", "lr", "loss", "grad_norm", "source_tokens"}
    assert first["tokens"] == 8 * 32 and first["source_tokens"] == {"downstream": 8 * 32}
    lr = build_schedule(cfg.schedule, cfg.train.max_steps)
    assert [e["lr"] for e in events if e["event"] == "train"] == [lr(s) for s in range(6)]
    summary = json.loads(run.summary.read_text())
    evals = [e for e in events if e["event"] == "eval"]
    assert summary["final"]["upstream"] == evals[-1]["sets"]["upstream"]["loss"]
    assert summary["initial"]["downstream"] == evals[0]["sets"]["downstream"]["loss"]


def test_final_loads_in_plain_transformers_with_the_logged_eval_loss(finished_run):
    """Independent computation: HF model + tokenizer from final/, windows cut by hand."""
    run, cfg = finished_run
    model = AutoModelForCausalLM.from_pretrained(run.final).eval()
    tok = AutoTokenizer.from_pretrained(run.final)
    assert tok.eos_token == "<|endoftext|>"
    logged = [e for e in metrics(run.path, "eval")][-1]["sets"]
    for name in ("upstream", "downstream"):
        val = np.fromfile(f"{cfg.data.eval[0].path if name == 'upstream' else cfg.data.eval[1].path}/val.bin", dtype=np.uint16)
        L, n = cfg.train.seq_len, cfg.eval.tokens // cfg.train.seq_len
        W = (len(val) - 1) // L  # non-overlapping windows in the split; n of them, evenly spaced
        losses = []
        with torch.no_grad():
            for i in (k * W // n for k in range(n)):
                w = torch.tensor(val[i * L : i * L + L + 1].astype(np.int64))[None]
                logits = model(input_ids=w[:, :-1]).logits
                losses.append(F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item())
        assert sum(losses) / (n * L) == pytest.approx(logged[name]["loss"], abs=1e-4)
        assert logged[name]["ppl"] == pytest.approx(math.exp(logged[name]["loss"]))


def test_same_seed_same_numbers(tmp_path, shards, finished_run):
    run, _ = finished_run
    again = train(config_from_dict(small_run_config(tmp_path / "b", shards)), progress=False)
    a = [{k: v for k, v in e.items() if k not in ("summary",)} for e in metrics(run.path) if e["event"] in ("train", "eval")]
    b = [{k: v for k, v in e.items() if k not in ("summary",)} for e in metrics(again.path) if e["event"] in ("train", "eval")]
    assert a == b
    other = train(config_from_dict(small_run_config(tmp_path / "c", shards, seed=1)), progress=False)
    assert metrics(other.path, "train")[0]["loss"] != metrics(run.path, "train")[0]["loss"]


def test_init_weights_starts_everything_but_the_weights_from_zero(tmp_path, shards, finished_run):
    src_run, _ = finished_run
    start = src_run.checkpoints / "step_000003"
    cfg = small_run_config(tmp_path / "cont", shards, init="weights", **{"model": {"path": str(start)}, "train.max_steps": 4})
    cont = train(config_from_dict(cfg), progress=False)
    events = metrics(cont.path)
    assert events[0]["init"] == "weights" and events[0]["optimizer_from"] == "fresh" and events[0]["step"] == 0
    trains = [e for e in events if e["event"] == "train"]
    assert trains[0]["step"] == 1 and trains[0]["tokens"] == 8 * 32
    assert trains[0]["lr"] == 0.0  # the schedule restarts at step 0 (warmup from 0)
    # data position 0 + the checkpoint's weights: step 1's loss, recomputed independently
    c = config_from_dict(cfg)
    mix = Mixture([Source("downstream", TokenShards(c.data.train[0].path), 1.0)], 32, 8, c.seed)
    windows = torch.from_numpy(mix.batch(0)[0])
    model = AutoModelForCausalLM.from_pretrained(start)
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(input_ids=m[:, :-1]).logits.reshape(-1, model.config.vocab_size),
                                   m[:, 1:].reshape(-1)).item() / 2 for m in windows.split(4))
    assert trains[0]["loss"] == pytest.approx(loss, abs=1e-5)
    # the step-0 eval of the continual run equals the source run's eval at that checkpoint
    src_eval = next(e for e in metrics(src_run.path, "eval") if e["step"] == 3)["sets"]
    cont_eval = metrics(cont.path, "eval")[0]["sets"]
    for name in src_eval:
        assert cont_eval[name]["loss"] == pytest.approx(src_eval[name]["loss"], abs=1e-6)
    # optimizer moments started from zero: AdamW's per-parameter step count is this run's, not 3 + 4
    state = torch.load(cont.checkpoints / "step_000004" / "trainer_state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {4.0}


def test_optimizer_state_from_checkpoint(tmp_path, shards, finished_run):
    src_run, _ = finished_run
    cfg = small_run_config(tmp_path / "keep", shards, init="weights", **{
        "model": {"path": str(src_run.checkpoints / "step_000003")}, "optimizer.state": "from_checkpoint", "train.max_steps": 3})
    cont = train(config_from_dict(cfg), progress=False)
    state = torch.load(cont.checkpoints / "step_000003" / "trainer_state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {6.0}
    assert metrics(cont.path)[0]["optimizer_from"].endswith("step_000003")


def test_resume_continues_exactly(tmp_path, shards, finished_run):
    """Interrupted after the step-3 checkpoint (step 6's files gone), resumed: same numbers, same weights."""
    cfg = small_run_config(tmp_path / "r", shards)
    interrupt_after(train(config_from_dict(cfg), progress=False), "step_000006")
    resumed = train(config_from_dict(dict(cfg, init="resume")), progress=False)
    assert_same_run(resumed.path, finished_run[0].path)


def test_stop_at_tokens_ends_early_on_the_full_schedule(tmp_path, shards, finished_run):
    """Gupta et al.'s 50B-token studies: stop at step 4 of 6 while the LR follows the 6-step cosine."""
    per_step = 8 * 32
    cfg = small_run_config(tmp_path / "s", shards, **{"train.stop_at_tokens": 3 * per_step + 1})
    run = train(config_from_dict(cfg), progress=False)
    full = [e for e in metrics(finished_run[0].path, "train") if e["step"] <= 4]
    assert metrics(run.path, "train") == full  # same LRs and losses as the full run's first 4 steps
    summary = json.loads(run.summary.read_text())
    assert summary["steps"] == 4 and summary["schedule_steps"] == 6 and summary["tokens"] == 4 * per_step
    assert metrics(run.path, "eval")[-1]["step"] == 4 and (run.checkpoints / "step_000004").exists()
    from rewarm.errors import UserError

    with pytest.raises(UserError, match="never stop early"):
        config_from_dict(small_run_config(tmp_path / "t", shards, **{"train.stop_at_tokens": 7 * per_step}))
    # resumed past the stop: refused (it would record a step it never ended at)
    part = small_run_config(tmp_path / "p", shards)
    interrupt_after(train(config_from_dict(part), progress=False), "step_000006")
    late = dict(part, init="resume", train=dict(part["train"], stop_at_tokens=2 * per_step))
    with pytest.raises(UserError, match="already at step 3"):
        train(config_from_dict(late), progress=False)


def test_compiled_body_trains_like_eager(tmp_path, shards, finished_run):
    """train.compile compiles the model body and keeps the fused head + loss: same losses as eager."""
    run = train(config_from_dict(small_run_config(tmp_path / "c", shards, **{"train.compile": True})), progress=False)
    eager, compiled = metrics(finished_run[0].path, "train"), metrics(run.path, "train")
    assert [e["step"] for e in compiled] == [e["step"] for e in eager]
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]


def test_eval_windows_are_spread_over_the_whole_val_split(tmp_path, tokenizer_dir):
    """Not the first N tokens (one document of one source): n windows evenly over all W of the split."""
    from conftest import code_files
    from rewarm.data.prepare import prepare
    from rewarm.evaluate import EvalSet

    docs = tmp_path / "docs"
    docs.mkdir()
    text = "".join(f.read_text() for f in code_files(120_000))
    for i in range(60):  # 60 documents of ~2k characters
        (docs / f"{i:02d}.py").write_text(text[i * 2000 : (i + 1) * 2000])
    prepare([str(docs)], str(tokenizer_dir), tmp_path / "sh", val_fraction=0.5, progress=False)
    sh = TokenShards(tmp_path / "sh")
    val = np.asarray(sh.split("val"), dtype=np.int64)
    es = EvalSet.from_shards("code", sh, 32, 1024)
    W, n = (len(val) - 1) // 32, 1024 // 32
    expected = np.stack([val[i * 32 : i * 32 + 33] for i in (k * W // n for k in range(n))])
    assert np.array_equal(es.windows.numpy(), expected)
    eos = sh.meta["tokenizer"]["eos_token_id"]
    held_out = int((val == eos).sum())
    assert es.coverage["of_documents"] == held_out >= 20 and es.coverage["windows"] == n and es.coverage["of_windows"] == W
    # the windows reach documents all over the split, far more than its first 1,024 tokens hold
    first = int((val[: n * 32 + 1] == eos).sum()) + 1
    assert es.coverage["documents"] > first

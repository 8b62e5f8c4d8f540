"""Run health: Hutchinson's Hessian trace (unbiased on a quadratic, = the exact trace of a real tiny
model's Hessian within 3 standard errors, logged during training without changing the run, and
reproduced by `rewarm flatness`), and the collapse alarm (trips when the weights are wrecked
mid-run, then warns, stops or rolls back; quiet in normal training)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

import rewarm.train as train_module
from conftest import assert_user_error, metrics, run_cli, small_run_config, write_config
from rewarm.analysis.collapse import load_sentences
from rewarm.analysis.flatness import hutchinson_trace, model_flatness
from rewarm.config import config_from_dict
from rewarm.errors import Diverged
from rewarm.train import train


def test_hutchinson_is_unbiased_on_a_quadratic():
    torch.manual_seed(0)
    b = torch.randn(30, 30, dtype=torch.float64)
    a = b @ b.T / 30 + torch.diag(torch.linspace(-1, 3, 30, dtype=torch.float64))  # indefinite, known trace
    x = torch.randn(30, dtype=torch.float64, requires_grad=True)
    estimates = [hutchinson_trace(lambda: 0.5 * x @ a @ x, [x], samples=20, seed=s) for s in range(200)]
    mean = sum(e["trace"] for e in estimates) / len(estimates)
    spread = torch.tensor([e["trace"] for e in estimates]).std().item() / len(estimates) ** 0.5
    assert abs(mean - torch.trace(a).item()) < 3 * spread
    # each estimate's own standard error describes its scatter
    within = sum(abs(e["trace"] - torch.trace(a).item()) < 2 * e["stderr"] for e in estimates) / len(estimates)
    assert 0.85 < within <= 1.0


def test_hutchinson_matches_the_exact_trace_of_a_tiny_real_model():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=12, hidden_size=4, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                        max_position_embeddings=16, attn_implementation="eager")
    model = GPTNeoXForCausalLM(cfg).double()
    n = sum(p.numel() for p in model.parameters())
    assert 100 < n < 600  # small enough for the full Hessian
    windows = torch.randint(0, 12, (3, 9))
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i:i + shape.numel()].view(shape)
            i += shape.numel()
        logits = torch.func.functional_call(model, params, (windows[:, :-1],)).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 12), windows[:, 1:].reshape(-1))

    exact = torch.autograd.functional.hessian(loss_of, flat0).diagonal().sum().item()
    est = model_flatness(model, windows, samples=300, seed=1)
    assert est["params"] == n and est["samples"] == 300
    assert abs(est["trace"] - exact) < 3 * est["stderr"], (est["trace"], exact, est["stderr"])


def test_flatness_is_logged_without_changing_the_run_and_the_cli_reproduces_it(tmp_path, shards):
    plain = train(config_from_dict(small_run_config(tmp_path / "plain", shards)), progress=False)
    cfg = small_run_config(tmp_path / "flat", shards, **{"eval.flatness": {"every": 3, "samples": 4, "tokens": 64}})
    run = train(config_from_dict(cfg), progress=False)
    strip = lambda es: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in es]  # noqa: E731
    assert strip(metrics(run.path, "train")) == strip(metrics(plain.path, "train"))  # the run is the same run
    flat = metrics(run.path, "flatness")
    assert [e["step"] for e in flat] == [0, 3, 6]
    assert all(e["trace"] == e["trace"] and e["stderr"] > 0 and e["samples"] == 4 for e in flat)
    name, path = next(iter(shards.items()))
    out = tmp_path / "f.json"
    proc = run_cli("flatness", str(run.final), "--data", f"{name}={path}", "--samples", "4", "--tokens", "64",
                   "--seq-len", "32", "--seed", "6", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())[name]
    assert got["trace"] == pytest.approx(flat[-1]["trace"], rel=1e-4) and "tr(H) =" in proc.stdout
    assert run_cli("report", str(run.path), "-o", str(tmp_path / "rep")).returncode == 0
    assert "## Flatness (Hessian trace) vs tokens" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "flatness.png").exists()
    assert_user_error(run_cli("flatness", str(run.final), "--data", f"{name}={path}", "--tokens", "100000000"),
                      "fewer than")
    assert_user_error(run_cli("flatness", str(run.final), "--data", f"{name}={path}", "--samples", "1"), "at least 2")
    assert_user_error(run_cli("flatness", str(run.final), "--data", f"{name}={path}", "--json", str(tmp_path)),
                      "is a directory")
    assert_user_error(run_cli("flatness", str(run.final), "--data", f"{name}={path}", "--data", f"{name}={path}"),
                      "unique")
    assert_user_error(run_cli("flatness", str(run.final), "--data", "nopath"), "NAME=PATH")


def _wreck_weights_at(monkeypatch, step: int):
    """From the given step on, once: the weights are multiplied by 8 after the update (a bad edit)."""
    real = train_module.train_step
    done = []

    def step_then_wreck(st, fns):
        result = real(st, fns)
        if st.state.step == step and not done:
            done.append(step)
            with torch.no_grad():
                for p in st.raw_model.parameters():
                    p.mul_(8.0)
        return result

    monkeypatch.setattr(train_module, "train_step", step_then_wreck)


COLLAPSE = {"train.max_steps": 8, "eval.interval": 2, "checkpoint.interval": 2, "eval.collapse.sentences": "builtin"}


def test_normal_training_does_not_trip_the_alarm(tmp_path, shards):
    run = train(config_from_dict(small_run_config(tmp_path / "r", shards, **COLLAPSE)), progress=False)
    checks = metrics(run.path, "me_ppl")
    assert [e["step"] for e in checks] == [0, 2, 4, 6, 8] and checks[0]["sentences"] == 100
    assert all(e["ratio"] < 3 for e in checks) and not metrics(run.path, "collapse")


@pytest.mark.parametrize("action", ["warn", "stop", "rollback"])
def test_wrecked_weights_trip_the_alarm_and_the_action_happens(tmp_path, shards, monkeypatch, action):
    _wreck_weights_at(monkeypatch, 3)
    cfg = config_from_dict(small_run_config(tmp_path / "r", shards, **COLLAPSE, **{"eval.collapse.action": action}))
    if action == "stop":
        with pytest.raises(Diverged, match="collapse alarm"):
            train(cfg, progress=False)
    else:
        train(cfg, progress=False)
    events = metrics(tmp_path / "r")
    if action == "rollback":  # back to step 2's checkpoint; the alarm's reason stays in the rollback event
        rb = [e for e in events if e["event"] == "rollback"]
        assert len(rb) == 1 and rb[0]["step"] == 2 and rb[0]["from_step"] == 4 and "collapse" in rb[0]["reason"]
        assert events[-1]["event"] == "end" and max(e["ratio"] for e in metrics(tmp_path / "r", "me_ppl")) < 3
    else:
        alarm = [e for e in events if e["event"] == "collapse"]
        assert len(alarm) >= 1 and alarm[0]["step"] == 4 and alarm[0]["ratio"] > 3 and alarm[0]["action"] == action
        assert events[-1]["event"] == ("end" if action == "warn" else "diverged")
    assert run_cli("report", str(tmp_path / "r"), "-o", str(tmp_path / "rep")).returncode == 0
    table = (tmp_path / "rep" / "report.md").read_text().split("## Collapse alarm")[1].split("\n## ")[0]
    assert ("rolled back 4 → 2" if action == "rollback" else f"step 4: {action}") in table


def test_bad_collapse_settings_exit_2(tmp_path, shards):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(bytes(range(256)) * 4)
    for extra, needle in (({"eval.collapse.sentences": str(empty)}, "no sentences"),
                          ({"eval.collapse.sentences": str(binary)}, "not UTF-8 text"),
                          ({"eval.collapse.sentences": str(tmp_path / "none.txt")}, "not a file"),
                          ({"eval.collapse.sentences": "builtin", "eval.collapse.action": "explode"}, "warn, stop, rollback"),
                          ({"eval.collapse.sentences": "builtin", "eval.collapse.factor": 0.5}, "eval.collapse.factor"),
                          ({"eval.flatness": {"every": 2, "samples": 1}}, "eval.flatness.samples")):
        cfg = write_config(tmp_path / "c.yaml", small_run_config(tmp_path / "r", shards, **extra))
        assert_user_error(run_cli("train", str(cfg)), needle)
    assert len(load_sentences("builtin")) == 100

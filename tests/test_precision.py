"""The bf16 path, tested on purpose on every CPU (autocast bf16 runs anywhere, slowly without
bf16 units), and `precision: auto` resolved both ways by faking what /proc/cpuinfo says."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_MODEL, assert_same_run, interrupt_after, metrics, small_run_config
from rewarm import start
from rewarm.config import config_from_dict
from rewarm.data.shards import TokenShards
from rewarm.evaluate import EvalSet, evaluate
from rewarm.fused_loss import autocast, lm_loss
from rewarm.model import build_config, init_scratch
from rewarm.train import train

BF16_LOSS = dict(rel=2e-2)  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few roundings deep


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(True) makes this CPU report AVX512-BF16, fake_cpu(False) makes it report none."""
    def fake(has_bf16: bool) -> None:
        flags = "flags : fpu sse2 avx2 avx512f" + (" avx512_bf16" if has_bf16 else "")
        monkeypatch.setattr(start, "read_cpuinfo", lambda: flags)
    return fake


@pytest.mark.parametrize("flags, expected", [("avx512f avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16"),
                                             ("avx2 avx512f avx512_vnni", "fp32"), ("", "fp32")])
def test_auto_resolves_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(start, "read_cpuinfo", lambda: f"flags : fpu {flags}")
    assert start.resolve_precision("auto", torch.device("cpu")) == expected
    assert start.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert start.resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_a_run_with_auto_trains_in_what_auto_resolves_to(tmp_path, shards, fake_cpu, has_bf16):
    fake_cpu(has_bf16)
    cfg = small_run_config(tmp_path / "r", shards, **{"train.precision": "auto", "train.max_steps": 3, "eval.interval": 3,
                                                      "checkpoint.interval": 0})
    run = train(config_from_dict(cfg), progress=False)
    assert metrics(run.path, "start")[0]["precision"] == ("bf16" if has_bf16 else "fp32")
    ref = train(config_from_dict(dict(cfg, out_dir=str(tmp_path / "ref"), train={**cfg["train"], "precision":
                                                                                  "bf16" if has_bf16 else "fp32"})), progress=False)
    assert [e["loss"] for e in metrics(run.path, "train")] == [e["loss"] for e in metrics(ref.path, "train")]


@pytest.fixture(scope="module")
def bf16_and_fp32_runs(tmp_path_factory, shards):
    root = tmp_path_factory.mktemp("prec")
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = small_run_config(root / precision, shards, **{"train.precision": precision})
        runs[precision] = (train(config_from_dict(cfg), progress=False), cfg)
    return runs


def test_bf16_training_steps_track_fp32(bf16_and_fp32_runs):
    fp32, bf16 = (metrics(bf16_and_fp32_runs[p][0].path, "train") for p in ("fp32", "bf16"))
    assert metrics(bf16_and_fp32_runs["bf16"][0].path, "start")[0]["precision"] == "bf16"
    assert len(bf16) == len(fp32) == 6
    for a, b in zip(bf16, fp32):
        assert a["loss"] == pytest.approx(b["loss"], **BF16_LOSS), a["step"]
        assert a["loss"] != b["loss"]  # it really ran in bf16
    evals = [metrics(bf16_and_fp32_runs[p][0].path, "eval")[-1]["sets"] for p in ("fp32", "bf16")]
    for name in evals[0]:
        assert evals[1][name]["loss"] == pytest.approx(evals[0][name]["loss"], **BF16_LOSS)


def test_bf16_resume_is_bit_exact(tmp_path, shards, bf16_and_fp32_runs):
    """Interrupted after the step-3 checkpoint and resumed under bf16: the same numbers and weights, to the bit."""
    ref, cfg = bf16_and_fp32_runs["bf16"]
    cfg = dict(cfg, out_dir=str(tmp_path / "r"))
    interrupt_after(train(config_from_dict(cfg), progress=False), "step_000006")
    resumed = train(config_from_dict(dict(cfg, init="resume")), progress=False)
    assert_same_run(resumed.path, ref.path)


def test_bf16_eval_matches_an_unfused_bf16_forward(shards):
    """`evaluate` in bf16 (fused head + loss under autocast) against plain HF logits under autocast."""
    torch.manual_seed(0)
    cfg = build_config("tiny", None, dict(SMALL_MODEL), 512, None, 0)
    model = init_scratch(cfg, 0).eval()
    es = EvalSet.from_shards("downstream", TokenShards(shards["downstream"]), 32, 512)
    got = evaluate(model, [es], 8, torch.device("cpu"), "bf16")["downstream"]["loss"]
    fp32 = evaluate(model, [es], 8, torch.device("cpu"), "fp32")["downstream"]["loss"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=es.windows[:, :-1]).logits
    independent = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), es.windows[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(independent, rel=5e-3)
    assert got == pytest.approx(fp32, **BF16_LOSS) and got != fp32


def test_bf16_fused_loss_and_gradients_match_unfused():
    torch.manual_seed(0)
    windows = torch.randint(0, 512, (3, 41))
    cfg = build_config("tiny", None, dict(SMALL_MODEL), 512, None, 0)
    losses, grads = [], []
    for fused in (False, True):
        model = init_scratch(cfg, 0)
        with autocast(torch.device("cpu"), "bf16"):
            loss = lm_loss(model, windows, fused=fused)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=5e-3)
    for name in grads[0]:
        g0, g1 = grads[0][name], grads[1][name]
        assert torch.linalg.vector_norm(g1 - g0) <= 0.05 * torch.linalg.vector_norm(g0) + 1e-6, name

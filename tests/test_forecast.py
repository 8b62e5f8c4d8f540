"""`rewarm forecast`: the laws recover what generated synthetic data and their intervals cover it,
the early-curve forecast predicts a power-law curve's end, loss → error recovers its curve, and the
commands run on real (tiny) run directories and refuse inputs a law cannot be fitted to."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from conftest import assert_user_error, run_cli, small_run_config, write_config
from rewarm.analysis import curves, laws, loss_to_error
from rewarm.config import config_from_dict
from rewarm.errors import UserError
from rewarm.train import train

# a grid like a user's pilots: 3 sizes × 4 token multipliers, and a held-out run ~30× the largest compute
SIZES, MULTIPLIERS = np.array([2e5, 6e5, 2e6]), np.array([5.0, 20.0, 80.0, 320.0])
N = np.repeat(SIZES, len(MULTIPLIERS))
D = N * np.tile(MULTIPLIERS, len(SIZES))
HELD_OUT = (1e7, 1e7 * 20)
TRUTH = {"overtrain": np.log([1.8, 40.0, 15.0]).tolist() + [0.12],
         "chinchilla": [np.log(1.7), np.log(120.0), 0.32, np.log(400.0), 0.28]}


def draw(law, seed, noise=0.004):
    rng = np.random.default_rng(seed)
    return law(np.array(TRUTH[law.name]), N, D) * np.exp(rng.normal(0, noise, len(N)))


@pytest.mark.parametrize("name", ["overtrain", "chinchilla"])
def test_each_law_recovers_what_generated_the_data(name):
    law = laws.LAWS[name]
    fit = laws.fit(law, N, D, draw(law, 0), bootstrap=60)
    truth = law(np.array(TRUTH[name]), *HELD_OUT)
    lo, hi = fit.interval(*HELD_OUT)  # whether it covers the truth is a rate (next test), not a per-draw fact
    assert lo < hi and fit.predict(*HELD_OUT) == pytest.approx(truth, rel=0.02)
    assert fit.rms_log_error < 0.01  # the noise is 0.4%
    for k, true_value in enumerate(TRUTH[name]):  # every parameter inside its bootstrap 99% interval
        p_lo, p_hi = np.percentile(fit.boot[:, k], [0.5, 99.5])
        assert p_lo - 1e-6 <= true_value <= p_hi + 1e-6, (law.params[k], true_value, p_lo, p_hi)
    again = laws.Fit.from_dict(json.loads(json.dumps(fit.to_dict())))  # the law file round-trips
    assert again.predict(*HELD_OUT) == fit.predict(*HELD_OUT) and again.interval(*HELD_OUT) == (lo, hi)


def test_the_bootstrap_interval_covers_the_truth_at_about_its_level():
    law = laws.LAWS["overtrain"]
    truth = law(np.array(TRUTH["overtrain"]), *HELD_OUT)
    covered = [lo <= truth <= hi for lo, hi in
               (laws.fit(law, N, D, draw(law, seed), bootstrap=40, seed=seed).interval(*HELD_OUT, level=0.9)
                for seed in range(1, 21))]
    # a 90% interval from 12 runs: 20 draws must cover it at least 14 times (P < 1% if the real rate were 90%)
    assert sum(covered) >= 14, covered


def test_too_few_runs_and_bad_losses_are_refused():
    law = laws.LAWS["chinchilla"]
    with pytest.raises(UserError, match="needs more runs than that"):
        laws.fit(law, N[:5], D[:5], draw(law, 0)[:5])
    bad = draw(law, 0)
    bad[3] = 0.0
    with pytest.raises(UserError, match="positive number"):
        laws.fit(law, N, D, bad)


def test_early_curve_forecast_predicts_the_end_of_a_power_law_within_half_a_percent():
    truth = np.array([2.0, 30.0, np.log(0.35), np.log(2e5)])
    tokens = np.linspace(1e5, 1e7, 41)
    for at in (0.2, 0.3, 0.5):
        seen = tokens <= at * tokens[-1]
        f = curves.forecast(tokens[seen], curves.curve(truth, tokens[seen]), bootstrap=20)
        assert f.predict(tokens[-1]) == pytest.approx(curves.curve(truth, tokens[-1]), rel=0.005)
    # a rising curve (forgetting: the upstream loss of a continual run) is forecast as well
    rising = np.array([3.0, -2.0, np.log(0.5), np.log(1e5)])
    noisy = curves.curve(rising, tokens) + np.random.default_rng(0).normal(0, 0.002, len(tokens))
    f = curves.forecast(tokens[:13], noisy[:13], bootstrap=40)
    lo, hi = f.interval(tokens[-1])
    assert f.predict(tokens[-1]) == pytest.approx(curves.curve(rising, tokens[-1]), rel=0.005) and lo < hi
    with pytest.raises(UserError, match="at least 5 evals"):
        curves.forecast(tokens[:4], noisy[:4])


def test_loss_to_error_recovers_its_curve():
    truth = np.array([0.75, np.log(8.0), 1.1])
    loss = np.linspace(2.5, 6.0, 15)
    err = loss_to_error.error_curve(truth, loss) + np.random.default_rng(0).normal(0, 0.003, len(loss))
    f = loss_to_error.fit_error(loss, err)
    assert f.predict(2.0) == pytest.approx(loss_to_error.error_curve(truth, 2.0), abs=0.02)
    assert f.to_dict()["params"]["epsilon"] == pytest.approx(0.75, abs=0.03)
    with pytest.raises(UserError, match="errors in \\[0, 1\\]"):
        loss_to_error.fit_error(loss, err + 1)


@pytest.fixture(scope="module")
def pilots(tmp_path_factory, shards):
    """Six real from-scratch runs: two widths × three token budgets, evals on both sets."""
    root = tmp_path_factory.mktemp("pilots")
    for width in (16, 32):
        for steps in (4, 8, 16):
            cfg = small_run_config(root / f"w{width}_s{steps}", shards, **{
                "train.max_steps": steps, "eval.interval": 2, "checkpoint.interval": 0,
                "model.overrides.hidden_size": width, "model.overrides.intermediate_size": 2 * width,
                "schedule.warmup": 1})
            train(config_from_dict(cfg), progress=False)
    return root


def test_fit_and_predict_on_real_runs(pilots, tmp_path):
    law_file = tmp_path / "law.json"
    proc = run_cli("forecast", "fit", str(pilots), "-o", str(law_file), "--set", "upstream", "--bootstrap", "20",
                   "--plot", str(tmp_path / "law.png"))
    assert proc.returncode == 0, proc.stderr
    law = json.loads(law_file.read_text())
    assert law["set"] == "upstream" and len(law["runs"]) == 6 and law["params_count"] == "non-embedding"
    assert "params" in law["laws"]["overtrain"] and "params" in law["laws"]["chinchilla"]  # 6 runs > 5 parameters
    starts = [json.loads(line) for line in (pilots / "w16_s4" / "metrics.jsonl").read_text().splitlines()][0]
    row = next(r for r in law["runs"] if r["run"] == "w16_s4")
    assert row["params"] == starts["params_non_embedding"] and row["tokens"] == 4 * 8 * 32
    assert "overtrain:" in proc.stdout and (tmp_path / "law.png").read_bytes()[:4] == b"\x89PNG"
    out = run_cli("forecast", "predict", str(law_file), "--params", "50000", "--tokens", "2e6")
    assert out.returncode == 0, out.stderr
    low, high = (float(x) for x in out.stdout.split("overtrain")[1].split("interval ")[1].split(")")[0].split(" – "))
    assert 0 < low <= high and "overtrain: loss" in out.stdout
    # 6 runs for Chinchilla's 5 parameters: almost no resample has 6 distinct runs, so no interval (said so)
    assert "chinchilla: loss" in out.stdout and "too few runs for the bootstrap" in out.stdout
    assert_user_error(run_cli("forecast", "predict", str(law_file), "--params", "-1", "--tokens", "5"), "positive numbers")
    for args, needle in ((("--level", "1.5"), "in (0, 1)"), (("--params", "1e300", "--tokens", "1e300"), "says anything there")):
        base = {"--params": "50000", "--tokens": "2e6"}
        extra = dict(zip(args[::2], args[1::2]))
        flat = [x for k, v in {**base, **extra}.items() for x in (k, v)]
        assert_user_error(run_cli("forecast", "predict", str(law_file), *flat), needle)
    damaged = json.loads(law_file.read_text())
    damaged["laws"]["overtrain"]["theta"] = [1.0, 2.0]
    (tmp_path / "damaged.json").write_text(json.dumps(damaged))
    assert_user_error(run_cli("forecast", "predict", str(tmp_path / "damaged.json"), "--params", "1", "--tokens", "5"),
                      "damaged law file")
    assert_user_error(run_cli("forecast", "predict", str(tmp_path / "none.json"), "--params", "1", "--tokens", "5"),
                      "does not exist")
    assert_user_error(run_cli("forecast", "fit", str(pilots), "-o", str(tmp_path / "b.json"), "--set", "upstream",
                              "--bootstrap", "0"), "at least 10")
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert_user_error(run_cli("forecast", "predict", str(tmp_path / "junk.json"), "--params", "1", "--tokens", "5"),
                      "not a law file")


def test_fit_refuses_runs_it_cannot_use(pilots, tmp_path, shards):
    out = str(tmp_path / "law.json")
    assert_user_error(run_cli("forecast", "fit", str(pilots), "-o", out), "several eval sets", "--set")
    assert_user_error(run_cli("forecast", "fit", *[str(pilots / f"w16_s{s}") for s in (4, 8, 16)], "-o", out,
                              "--set", "upstream"), "needs more runs")
    assert_user_error(run_cli("forecast", "fit", str(pilots), "-o", out, "--set", "nope"), "missing from run")
    continual = small_run_config(tmp_path / "cont", shards, **{"init": "weights", "model": {"path": str(pilots / "w16_s4" / "final")},
                                                                "train.max_steps": 3})
    train(config_from_dict(continual), progress=False)
    assert_user_error(run_cli("forecast", "fit", str(pilots), str(tmp_path / "cont"), "-o", out, "--set", "upstream"),
                      "from-scratch runs", "init: weights")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text((pilots / "w16_s4" / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    assert_user_error(run_cli("forecast", "fit", str(pilots), str(unfinished), "-o", out, "--set", "upstream"),
                      "not finished")
    assert not (tmp_path / "law.json").exists()


def test_forecast_a_run_from_its_first_part(pilots, tmp_path):
    run = pilots / "w32_s16"
    proc = run_cli("forecast", "run", str(run), "--at", "0.7", "--set", "upstream", "--bootstrap", "10",
                   "--json", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png"))
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "f.json").read_text())["sets"]["upstream"]
    assert row["points"] == 5 and math.isfinite(row["predicted"]) and row["low"] <= row["high"]
    assert row["measured"] == pytest.approx(
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]["sets"]["upstream"]["loss"])
    assert "measured" in proc.stdout and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert_user_error(run_cli("forecast", "run", str(run), "--at", "0.2"), "at least 5 evals")
    assert_user_error(run_cli("forecast", "run", str(run), "--json", str(tmp_path)), "is a directory")
    assert_user_error(run_cli("forecast", "run", str(run), "--at", "0.7", "--plot", str(tmp_path / "f.txt")), ".png")
    assert not list(tmp_path.glob(".*.tmp-*"))
    assert run_cli("forecast", "run", str(run), "--at", "0.7", "--json", str(tmp_path / "new" / "f.json")).returncode == 0
    assert_user_error(run_cli("forecast", "run", str(run), "--at", "1.5"), "in (0, 1)")


def test_report_draws_forecast_bands_and_tabulates_them(pilots, tmp_path):
    proc = run_cli("report", str(pilots / "w32_s16"), str(pilots / "w16_s4"), "-o", str(tmp_path / "rep"),
                   "--forecast", "0.7")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    table = text.split("Early-curve forecast")[1].split("\n## ")[0]
    single = run_cli("forecast", "run", str(pilots / "w32_s16"), "--at", "0.7", "--set", "upstream",
                     "--json", str(tmp_path / "f.json"))
    assert single.returncode == 0, single.stderr
    row = json.loads((tmp_path / "f.json").read_text())["sets"]["upstream"]
    # the same forecast as `rewarm forecast run` (same fit and cut), and the too-short run says why it has none
    assert f"| w32_s16 | upstream | {row['predicted']:.4f} |" in table
    assert f"{100 * row['relative_error']:+.2f}%" in table
    assert "| w16_s4 | upstream | – | – |" in table and "at least 5 evals" in table
    assert (tmp_path / "rep" / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert run_cli("report", str(pilots), "-o", str(tmp_path / "plain")).returncode == 0
    assert "Early-curve" not in (tmp_path / "plain" / "report.md").read_text()
    assert_user_error(run_cli("report", str(pilots), "-o", str(tmp_path / "bad"), "--forecast", "1.5"), "in (0, 1)")


def test_grid_writes_a_sweep_of_pilot_runs(tmp_path, shards):
    base = write_config(tmp_path / "base.yaml", small_run_config(tmp_path / "unused", shards))
    sweep = tmp_path / "grid.yaml"
    proc = run_cli("forecast", "grid", str(base), "--size", "tiny", "--size", "tiny:hidden_size=64,num_hidden_layers=2",
                   "--multipliers", "2,8", "-o", str(sweep))
    assert proc.returncode == 0, proc.stderr
    spec = yaml.safe_load(sweep.read_text())
    assert [r["name"] for r in spec["runs"]] == ["tiny_M2", "tiny_M8", "tiny_hidden_size64_num_hidden_layers2_M2",
                                                 "tiny_hidden_size64_num_hidden_layers2_M8"]
    small = spec["runs"][2]["set"]
    assert small["model.overrides"] == {"hidden_size": 64, "num_hidden_layers": 2}
    # the steps give M × N tokens: N of that shape is counted from a real model of it
    from rewarm.analysis.forecast import non_embedding_params
    n = non_embedding_params(config_from_dict(small_run_config(tmp_path / "x", shards)), "tiny",
                             {"hidden_size": 64, "num_hidden_layers": 2})
    assert small["train.max_steps"] == math.ceil(2 * n / (8 * 32)) and spec["runs"][3]["set"]["train.max_steps"] > small["train.max_steps"]
    dry = run_cli("sweep", str(sweep), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert_user_error(run_cli("forecast", "grid", str(base), "--size", "tiny:hidden_size", "-o", str(sweep)), "key=value")
    assert_user_error(run_cli("forecast", "grid", str(base), "--size", "tiny", "--size", "tiny", "-o", str(sweep)),
                      "repeats runs")
    assert_user_error(run_cli("forecast", "grid", str(base), "--size", "", "-o", str(sweep)), "names no preset")
    assert_user_error(run_cli("forecast", "grid", str(base), "--size", "tiny:hidden_size=abc", "-o", str(sweep)),
                      "does not build a model")
    assert_user_error(run_cli("forecast", "grid", str(base), "--size", "tiny", "--multipliers", "5,x", "-o", str(sweep)),
                      "comma-separated numbers")


def test_non_embedding_count_is_pythias():
    """N of the laws leaves out the input and (untied) output embeddings, as Pythia's published
    counts do (Pythia-70M: 70,426,624 parameters, 18,915,328 non-embedding); a tied head once."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    from rewarm.model import count_params

    with torch.device("meta"):
        pythia = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                                                                num_attention_heads=8, intermediate_size=2048))
        smol = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                                            num_attention_heads=9, num_key_value_heads=3,
                                                            intermediate_size=1536, tie_word_embeddings=True))
    assert (count_params(pythia), count_params(pythia, exclude_embeddings=True)) == (70_426_624, 18_915_328)
    assert count_params(smol) - count_params(smol, exclude_embeddings=True) == 49152 * 576

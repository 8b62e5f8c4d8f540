"""Sweeps (expand, skip, resume, continue past failures, launchers) and reports."""

import pytest
import yaml

from conftest import assert_same_run, assert_user_error, metrics, run_cli, small_run_config
from rewarm.config import config_from_dict, last_step
from rewarm.errors import UserError
from rewarm.runs import RunData
from rewarm.sweep import expand, run_name


def sweep_file(tmp_path, shards, extra_runs=None, **axes):
    base = small_run_config(tmp_path / "unused", shards, **{"train.max_steps": 4, "eval.interval": 2,
                                                             "checkpoint.interval": 2, "schedule.warmup": 1,
                                                             "eval.interval_warmup": 1})
    base.pop("out_dir")
    spec = {"name": "t", "out_dir": str(tmp_path / "sweep"), "base": base,
            "axes": axes or {"schedule.max_lr": [1e-3, 2e-3]}}
    if extra_runs:
        spec["runs"] = extra_runs
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def test_expand_names_and_overrides(tmp_path, shards):
    _, spec = sweep_file(tmp_path, shards, extra_runs=[{"name": "constant", "set": {"schedule.name": "constant"}}],
                         **{"schedule.max_lr": [3e-4, 6e-4], "schedule.warmup": [0, 0.5]})
    runs = expand(spec)
    assert [r.name for r in runs] == ["maxlr0.0003_warmup0", "maxlr0.0003_warmup0.5", "maxlr0.0006_warmup0",
                                      "maxlr0.0006_warmup0.5", "constant"]
    assert runs[3].raw["schedule"]["max_lr"] == 6e-4 and runs[3].raw["schedule"]["warmup"] == 0.5
    assert runs[-1].raw["schedule"]["name"] == "constant"
    assert runs[0].raw["out_dir"] == str(tmp_path / "sweep" / "maxlr0.0003_warmup0")
    assert run_name({"train.seq_len": 64}) == "seqlen64"
    spec["axes"] = {"schedule.max_lrr": [1]}
    with pytest.raises(UserError, match="did you mean `max_lr`"):
        expand(spec)


def test_launchers(tmp_path, shards):
    path, _ = sweep_file(tmp_path, shards)
    dry = run_cli("sweep", str(path), "--dry-run")
    assert dry.returncode == 0 and "todo" in dry.stdout and "2 runs" in dry.stdout
    cmds = run_cli("sweep", str(path), "--print-commands", "--nproc", "4")
    lines = cmds.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rewarm train ") and "--nproc_per_node 4 -m rewarm train" in lines[1]
    slurm = tmp_path / "array.sbatch"
    assert run_cli("sweep", str(path), "--slurm-array", str(slurm)).returncode == 0
    text = slurm.read_text()
    assert "#SBATCH --array=0-1" in text and "maxlr0.002.yaml" in text and "torchrun" in text
    assert not (tmp_path / "sweep" / "maxlr0.001").exists()  # nothing was run


def test_sweep_runs_skips_resumes_and_continues_past_failures(tmp_path, shards):
    path, spec = sweep_file(tmp_path, shards, extra_runs=[{"name": "broken", "set": {"data.eval": [{"name": "x", "path": str(tmp_path / "missing")}]}}])
    first = run_cli("sweep", str(path), "-q")
    assert first.returncode == 1, first.stderr[-2000:]
    assert "broken" in first.stdout and "failed" in first.stdout and "2 ok, 1 failed" in first.stdout
    done = tmp_path / "sweep" / "maxlr0.002"
    assert (done / "summary.json").exists()
    # interrupt one run after its step-2 checkpoint: resumed on the next sweep, the other skipped
    import shutil

    part = tmp_path / "sweep" / "maxlr0.001"
    before = metrics(part)
    shutil.rmtree(part / "final")
    (part / "summary.json").unlink()
    shutil.rmtree(part / "checkpoints" / "step_000004")
    second = run_cli("sweep", str(path), "-q")
    assert "skipped (already finished)" in second.stdout and "resumed and finished" in second.stdout
    strip = lambda evs: [e for e in evs if e["event"] in ("train", "eval")]  # noqa: E731
    assert strip(metrics(part)) == strip(before)


def test_parallel_sweep_gives_the_numbers_of_a_sequential_one(tmp_path, shards):
    path, spec = sweep_file(tmp_path, shards, extra_runs=[{"name": "broken", "set": {"data.eval": [{"name": "x", "path": str(tmp_path / "missing")}]}}])
    spec["base"]["train"]["num_threads"] = 1
    path.write_text(yaml.safe_dump(spec))
    par = run_cli("sweep", str(path), "-q", "--jobs", "2")
    assert par.returncode == 1 and "2 ok, 1 failed" in par.stdout, par.stdout + par.stderr[-2000:]
    spec["out_dir"] = str(tmp_path / "seq")
    path.write_text(yaml.safe_dump(spec))
    seq = run_cli("sweep", str(path), "-q")
    assert seq.returncode == 1
    reason = lambda out: out.split("broken", 1)[1].splitlines()[0].strip()  # noqa: E731
    assert reason(par.stdout) == reason(seq.stdout).replace(str(tmp_path / "seq"), str(tmp_path / "sweep"))
    for name in ("maxlr0.001", "maxlr0.002"):
        assert_same_run(tmp_path / "sweep" / name, tmp_path / "seq" / name)
    assert "skipped (already finished)" in run_cli("sweep", str(path), "-q", "--jobs", "2").stdout
    assert_user_error(run_cli("sweep", str(path), "--jobs", "0"), "--jobs must be at least 1")


def test_parallel_sweep_stopped_by_sigterm_resumes_to_the_same_numbers(tmp_path, shards):
    import signal
    import subprocess
    import sys
    import time

    # three runs, two at a time: the third is still waiting when the signal comes, and must not be started
    path, spec = sweep_file(tmp_path, shards, **{"schedule.max_lr": [1e-3, 2e-3, 3e-3]})
    spec["base"]["train"].update(max_steps=120, num_threads=1)
    spec["base"]["checkpoint"]["interval"] = 10
    spec["base"]["eval"].update(interval=40, interval_warmup=0)
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "rewarm", "sweep", str(path), "-q", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [tmp_path / "sweep" / n for n in ("maxlr0.001", "maxlr0.002")]
    deadline = time.time() + 120
    # any checkpoint (older ones are pruned as the run goes on): both runs are past step 10 and still running
    while not all(any((r / "checkpoints").glob("step_*")) for r in runs) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err[-2000:])
    assert "resumes" in err and "Traceback" not in err
    assert not any((r / "summary.json").exists() for r in runs)  # stopped mid-run, not after
    assert not (tmp_path / "sweep" / "maxlr0.003").exists()  # the waiting run was not started
    assert run_cli("sweep", str(path), "-q", "--jobs", "2").returncode == 0
    spec["out_dir"] = str(tmp_path / "seq")
    path.write_text(yaml.safe_dump(spec))
    assert run_cli("sweep", str(path), "-q").returncode == 0
    for r in runs:
        assert_same_run(r, tmp_path / "seq" / r.name)


def parse_table(md: str) -> dict[str, dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(header):
            rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_numbers_match_metrics_jsonl(tmp_path, shards):
    path, _ = sweep_file(tmp_path, shards, **{"schedule.max_lr": [1e-3, 4e-3], "train.max_steps": [10]})
    assert run_cli("sweep", str(path), "-q").returncode == 0
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("report", str(sweep_dir), "-o", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    table = parse_table(md)
    for name in ("maxlr0.001_maxsteps10", "maxlr0.004_maxsteps10"):
        evals = [e for e in metrics(sweep_dir / name) if e["event"] == "eval"]
        up0, upN = evals[0]["sets"]["upstream"]["loss"], evals[-1]["sets"]["upstream"]["loss"]
        d0, dN = evals[0]["sets"]["downstream"]["loss"], evals[-1]["sets"]["downstream"]["loss"]
        assert evals[0]["step"] == 0 and evals[-1]["step"] == 10
        row = table[name]
        assert float(row["forgetting"]) == pytest.approx(upN - up0, abs=6e-5)
        assert float(row["adaptation"]) == pytest.approx(d0 - dN, abs=6e-5)
        assert float(row["upstream step 0"]) == pytest.approx(up0, abs=6e-5)
        assert float(row["downstream final"]) == pytest.approx(dN, abs=6e-5)
        early = [e["sets"]["upstream"]["loss"] for e in evals if 0 < e["step"] <= 1]
        assert float(row["spike (first 10%)"]) == pytest.approx(max(early) - up0, abs=6e-5)
        assert RunData.load(sweep_dir / name).forgetting() == upN - up0
    for png in ("loss_vs_tokens.png", "lr.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in md
    assert "tradeoff.png" not in md  # runs from scratch never knew upstream: no forgetting scatter
    html = run_cli("report", str(sweep_dir), "-o", str(tmp_path / "rep"), "--format", "html")
    assert html.returncode == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "maxlr0.004_maxsteps10" in page
    bad = run_cli("report", str(tmp_path / "nothing"), "-o", str(tmp_path / "rep"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # Ibrahim et al.'s final loss: mean training loss over the last N steps (10 logged: N=11 has no value)
    for n, expect in ((4, "mean"), (11, None)):
        assert run_cli("report", str(sweep_dir), "-o", str(tmp_path / "rep"), "--final", f"mean_last_train:{n}").returncode == 0
        cell = parse_table((tmp_path / "rep" / "report.md").read_text())["maxlr0.004_maxsteps10"][
            f"train loss (mean of last {n} logged steps)"]
        losses = [e["loss"] for e in metrics(sweep_dir / "maxlr0.004_maxsteps10", "train")]
        assert cell == ("–" if expect is None else f"{sum(losses[-n:]) / n:.4f}")
    assert_user_error(run_cli("report", str(sweep_dir), "-o", str(tmp_path / "rep"), "--final", "mean_last:5"),
                      "mean_last_train:N")


@pytest.mark.parametrize("name,count", [("gupta2023", 17), ("ibrahim2024", 11)])
def test_paper_sweeps_expand_to_valid_runs(name, count):
    from pathlib import Path

    from rewarm.sweep import load_sweep

    runs = expand(load_sweep(Path(__file__).parents[1] / "configs" / "paper" / f"{name}.yaml"))
    assert len(runs) == count
    by = {r.name: r.raw for r in runs}
    if name == "gupta2023":
        assert by["maxlr6e-4"]["schedule"]["min_lr"] == 6e-5 and by["from_step10000"]["model"]["revision"] == "step10000"
        assert by["warmup2pct"]["schedule"]["name"] == "cosine_neox_clipped"
        assert by["warmup1pct"]["train"]["max_steps"] == 131297 and by["warmup1pct"]["train"]["precision"] == "fp16"
        assert by["pile_constant3e-5"]["train"]["max_steps"] == 22113
        assert by["from_step10000_warmup0pct"]["schedule"]["warmup"] == 0
        assert by["warmup0pct"]["train"]["stop_at_tokens"] == 50_000_000_000 and "stop_at_tokens" not in by["warmup1pct"]["train"]
        assert last_step(config_from_dict(dict(by["warmup2pct"], out_dir="x")).train) == 22115  # the first step whose tokens reach 50B: 22,115 x 2,260,992
    else:
        assert [s["weight"] for s in by["replay5pct"]["data"]["train"]] == [0.95, 0.05]
        assert by["infinite_invsqrt"]["schedule"]["cooldown_shape"] == "inv_sqrt"
        assert by["replay0pct"]["train"]["max_steps"] == 132366 and by["union_from_scratch"]["init"] == "scratch"
    from rewarm.sweep import roles_of

    if name == "gupta2023":
        assert roles_of(load_sweep(Path(__file__).parents[1] / "configs" / "paper" / "gupta2023.yaml"), runs).start_reference == "warmup1pct_50b"

    roles = roles_of(load_sweep(Path(__file__).parents[1] / "configs" / "paper" / f"{name}.yaml"), runs)
    assert roles is not None and all(n in by for n in [roles.reference, *roles.warmups, *roles.max_lrs] if n)


def test_paper_style_sweep_with_roles_and_seeds_gets_a_findings_table(tmp_path, shards):
    """A sweep with the paper's run names declares its roles and 3 seeds of its reference; `rewarm
    report` on the sweep directory computes every finding from them (none "incomplete"), with the noise."""
    from rewarm.config import config_from_dict
    from rewarm.train import train

    pre = small_run_config(tmp_path / "pre", shards, **{"train.max_steps": 12, "checkpoint.interval": 0,
                                                         "checkpoint.keep_steps": [2, 4], "eval.interval": 6})
    pre["data"]["train"][0] = {"name": "upstream", "path": str(shards["upstream"])}
    train(config_from_dict(pre), progress=False)
    base = small_run_config(tmp_path / "unused", shards, init="weights", **{
        "model": {"path": str(tmp_path / "pre" / "final")}, "train.max_steps": 10, "eval.interval": 5,
        "eval.interval_warmup": 1, "eval.dense_until": 0.1, "schedule.warmup": 2, "checkpoint.interval": 0,
        "eval.tokens": 256})
    base.pop("out_dir")
    ck = lambda s: str(tmp_path / "pre" / "checkpoints" / f"step_{s:06d}")  # noqa: E731
    replay = [{"name": "downstream", "path": str(shards["downstream"]), "weight": 0.95},
              {"name": "upstream", "path": str(shards["upstream"]), "weight": 0.05}]
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    spec = {
        "name": "gupta-tiny", "out_dir": str(tmp_path / "sweep"), "base": base,
        "runs": [{"name": "warmup0pct", "set": {"schedule.warmup": 0}}, {"name": "warmup1pct", "set": {}, "seeds": [0, 1, 2]},
                 {"name": "maxlr5e-4", "set": {"schedule.max_lr": 5e-4}}, {"name": "maxlr2e-3", "set": {"schedule.max_lr": 2e-3}},
                 {"name": "constant", "set": {"schedule": {"name": "constant", "max_lr": 1e-4, "min_lr": 1e-4, "warmup": 0}}},
                 {"name": "replay5pct", "set": {"data.train": replay}}, {"name": "from_step2", "set": {"model.path": ck(2)}},
                 {"name": "scratch", "set": {"init": "scratch", "model": {"preset": "tiny", "overrides": small}}}],
        "roles": {"reference": "warmup1pct", "warmups": ["warmup0pct", "warmup1pct"],
                  "max_lrs": ["maxlr5e-4", "warmup1pct", "maxlr2e-3"], "constant": "constant", "replay": "replay5pct",
                  "early_starts": ["from_step2"], "scratch": "scratch"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = expand(spec)
    assert [r.name for r in runs][:4] == ["warmup0pct", "warmup1pct_seed0", "warmup1pct_seed1", "warmup1pct_seed2"]
    assert runs[2].raw["seed"] == 1 and len(runs) == 10
    proc = run_cli("sweep", str(path), "-q")
    assert proc.returncode == 0, proc.stderr[-3000:]
    roles = yaml.safe_load((tmp_path / "sweep" / "roles.yaml").read_text())
    assert roles["reference"] == "warmup1pct_seed0" and roles["reference_seeds"] == [f"warmup1pct_seed{s}" for s in (0, 1, 2)]
    assert roles["max_lrs"] == ["maxlr5e-4", "warmup1pct_seed0", "maxlr2e-3"]
    assert run_cli("report", str(tmp_path / "sweep"), "-o", str(tmp_path / "rep")).returncode == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip(" *") for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in list("abcdefs")}
    assert sorted(rows) == list("abcdefs")
    assert set(rows.values()) <= {"holds", "does not hold at this scale", "within noise", "degenerate"}, rows
    assert "seed noise over 3 replicates" in md and "## Seed replicates (mean ± spread)" in md
    assert "| warmup1pct | 3 |" in md
    path.write_text(yaml.safe_dump(dict(spec, roles={"reference": "warmup1pct", "constant": "nope"})))
    assert "names a run the sweep does not have: `nope`" in run_cli("sweep", str(path), "--dry-run").stderr

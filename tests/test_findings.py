"""`findings.compute` on synthetic runs whose numbers are chosen by hand: each verdict and the
numbers it prints follow from the definitions in docs/findings.md, with no training involved."""
from __future__ import annotations

from pathlib import Path

import pytest

from rewarm import findings as F
from rewarm.runs import RunData

STEPS = [0, 5, 10, 50, 100]  # evals; the first 10% of 100 steps holds steps 5 and 10
R = F.DEMO_ROLES


def run(name: str, up: list[float], down: list[float], warmup: float = 4, finished: bool = True) -> RunData:
    r = RunData(name, Path(name), {"train": {"max_steps": 100}, "schedule": {"warmup": warmup}}, finished=finished)
    r.evals = [(s, s * 1000, {"upstream": u, "downstream": d}) for s, u, d in zip(STEPS, up, down)]
    return r


def paper_like() -> dict[str, RunData]:
    """Every finding holds, by margins far above the seed noise (0.01)."""
    runs = [
        run("lr_mid_warmup0", [3.0, 3.6, 3.5, 3.3, 3.30], [5.0, 4.2, 3.9, 3.2, 3.00], warmup=0),
        run("lr_mid_warmup2", [3.0, 3.6, 3.5, 3.3, 3.31], [5.0, 4.2, 3.9, 3.2, 3.01], warmup=2),
        run("lr_mid_warmup4", [3.0, 3.6, 3.5, 3.3, 3.30], [5.0, 4.2, 3.9, 3.2, 3.00], warmup=4),
        run("lr_mid_warmup8", [3.0, 3.5, 3.5, 3.3, 3.32], [5.0, 4.3, 3.9, 3.2, 3.02], warmup=8),
        run("lr_mid_warmup4_seed1", [3.0, 3.6, 3.5, 3.3, 3.31], [5.0, 4.2, 3.9, 3.2, 3.01]),
        run("lr_mid_warmup4_seed2", [3.0, 3.6, 3.5, 3.3, 3.29], [5.0, 4.2, 3.9, 3.2, 3.00]),
        run("lr_low_warmup4", [3.0, 3.4, 3.3, 3.2, 3.10], [5.0, 4.4, 4.1, 3.5, 3.30]),
        run("lr_high_warmup4", [3.0, 3.9, 3.8, 3.6, 3.60], [5.0, 4.0, 3.7, 3.0, 2.90]),
        run("constant_lr", [3.0, 3.05, 3.05, 3.05, 3.05], [5.0, 4.8, 4.6, 4.2, 4.00], warmup=0),
        run("replay5pct", [3.0, 3.3, 3.2, 3.1, 3.10], [5.0, 4.2, 3.9, 3.2, 3.05]),
        run("from_ckpt7pct", [4.0, 4.3, 4.2, 4.0, 4.00], [6.0, 5.0, 4.5, 3.6, 3.40]),
        run("from_ckpt19pct", [3.5, 3.9, 3.8, 3.6, 3.60], [5.5, 4.6, 4.2, 3.4, 3.20]),
        run("scratch", [9.0, 8.0, 7.5, 6.0, 5.50], [9.0, 7.0, 6.0, 4.5, 3.90]),
    ]
    return {r.name: r for r in runs}


def by_id(found):
    return {f.id: f for f in found}


def test_every_finding_holds_on_paper_like_numbers():
    found = by_id(F.compute(paper_like(), R))
    assert list(found) == ["a", "b", "c", "d", "e", "f", "s"]
    assert {k: f.verdict for k, f in found.items()} == dict.fromkeys(found, "holds")
    # the numbers printed are the definitions evaluated on these runs
    assert "warmups 0.0200 vs max LRs 0.4000" in found["a"].detail  # downstream spreads 3.02-3.00, 3.30-2.90
    assert "forgetting 0.3000 → 0.1000 (falls by 0.2000)" in found["f"].detail
    assert "final downstream rises by 0.0500" in found["f"].detail
    assert "vs the constant-LR run's 3.0500" in found["s"].detail
    assert "lr_high_warmup4 +0.9000 / +0.3000" in found["s"].detail  # peak 3.9: minus step 0 (3.0), minus final (3.6)
    assert "replay5pct +0.3000 / +0.2000" in found["s"].detail and "from_ckpt7pct" in found["s"].detail
    assert "scratch 3.9000, worst re-warmed 3.3000" in found["d"].detail
    assert "below from 100,000 tokens to the end" in found["d"].detail  # 3.90 < 4.00 only at the last eval
    noise = "seed noise over 3 replicates: upstream 0.0200, downstream 0.0100"
    assert all(noise in f.detail for f in found.values())


def test_each_finding_can_fail():
    runs = paper_like()
    runs["lr_high_warmup4"] = run("lr_high_warmup4", [3.0, 3.9, 3.8, 3.6, 3.20], [5.0, 4.0, 3.7, 3.0, 2.90])
    runs["constant_lr"] = run("constant_lr", [3.0, 3.05, 3.05, 3.5, 3.50], [5.0, 4.8, 4.6, 4.2, 4.00], warmup=0)
    runs["replay5pct"] = run("replay5pct", [3.0, 3.3, 3.2, 3.1, 3.25], [5.0, 4.2, 3.9, 3.2, 3.40])
    runs["from_ckpt19pct"] = run("from_ckpt19pct", [3.5, 3.9, 3.8, 3.2, 3.10], [5.5, 4.6, 4.2, 3.4, 2.95])
    runs["scratch"] = run("scratch", [9.0, 8.0, 7.5, 6.0, 5.50], [9.0, 7.0, 4.5, 3.2, 3.10])
    found = by_id(F.compute(runs, R))
    assert found["b"].verdict == F.FAILS  # upstream falls mid -> high by 0.10, more than the noise
    assert found["c"].verdict == F.FAILS  # constant LR now forgets the most
    assert found["d"].verdict == F.FAILS  # scratch beats the low-LR run
    assert "below from 10,000 tokens to the end" in found["d"].detail  # 4.5 < 4.6, 3.2 < 4.2, 3.1 < 4.0
    assert found["e"].verdict == F.FAILS  # the 19% start ends lowest
    assert found["f"].verdict == F.FAILS  # downstream rises by 0.40 > forgetting falls by 0.05
    runs["constant_lr"] = run("constant_lr", [3.0, 4.5, 3.05, 3.05, 3.05], [5.0, 4.8, 4.6, 4.2, 4.00], warmup=0)
    assert by_id(F.compute(runs, R))["s"].verdict == F.FAILS  # the control spikes higher than every re-warmed run


def test_differences_smaller_than_the_seed_noise_are_within_noise():
    runs = paper_like()
    # replicates that disagree by 0.5 nats: every margin above is now inside the noise
    runs["lr_mid_warmup4_seed1"] = run("lr_mid_warmup4_seed1", [3.0, 3.6, 3.5, 3.3, 3.80], [5.0, 4.2, 3.9, 3.2, 3.50])
    found = by_id(F.compute(runs, R))
    assert found["b"].verdict == F.NOISE and found["f"].verdict == F.NOISE
    assert "upstream 0.5100, downstream 0.5000" in found["b"].detail
    # b flipped between two demo runs on float rounding alone: a 0.001 reversal inside the noise no longer
    # makes "downstream does not rise" fail (without the noise it would)
    runs = paper_like()
    runs["lr_high_warmup4"] = run("lr_high_warmup4", [3.0, 3.9, 3.8, 3.6, 3.60], [5.0, 4.0, 3.7, 3.0, 3.001])
    assert by_id(F.compute(runs, R))["b"].verdict == F.HOLDS
    no_reps = {k: v for k, v in runs.items() if "_seed" not in k}
    assert by_id(F.compute(no_reps, R))["b"].verdict == F.FAILS


def test_without_replicates_the_noise_is_said_to_be_unknown():
    runs = {k: v for k, v in paper_like().items() if "_seed" not in k}
    found = by_id(F.compute(runs, R))
    assert found["a"].verdict == F.HOLDS and "noise unknown" in found["a"].detail


def test_incomplete_sets_unfinished_runs_and_missing_step0_are_not_judged():
    runs = {k: v for k, v in paper_like().items() if k not in ("scratch", "replay5pct")}
    runs["from_ckpt7pct"].finished = False
    runs["lr_low_warmup4"].evals = runs["lr_low_warmup4"].evals[1:]  # no step-0 eval
    found = by_id(F.compute(runs, R))
    assert found["d"].verdict == F.INCOMPLETE and "missing scratch" in found["d"].detail
    assert found["f"].verdict == F.INCOMPLETE and "missing replay5pct" in found["f"].detail
    assert found["e"].verdict == F.INCOMPLETE and "unfinished from_ckpt7pct" in found["e"].detail
    assert found["b"].verdict == F.INCOMPLETE and "no step-0 eval in lr_low_warmup4" in found["b"].detail
    assert found["c"].verdict == F.INCOMPLETE  # one run missing from its set is enough
    # a single run present never yields a verdict
    only = {k: v for k, v in paper_like().items() if k == "constant_lr"}
    assert {f.verdict for f in F.compute(only, R)} == {F.INCOMPLETE}


def test_roles_that_a_study_does_not_have_are_incomplete_not_vacuous():
    """The real-model study has no warmup sweep, earlier checkpoints or scratch run: a, d, e must
    say so instead of crashing on an empty sweep or holding vacuously."""
    from dataclasses import replace

    roles = replace(R, warmups=[], early_starts=[], scratch=None, reference_seeds=[])
    found = by_id(F.compute(paper_like(), roles))
    for fid in ("a", "d", "e"):
        assert found[fid].verdict == F.INCOMPLETE and "no run has this role" in found[fid].detail
    assert all(found[fid].verdict == F.HOLDS for fid in ("b", "c", "f", "s"))


def test_a_spike_that_never_rises_above_step_0_is_degenerate_not_a_verdict():
    """Seen on the real-model study: evals at steps 1-2 with the LR still 0 at step 1 -> no run rose;
    comparing those flat 'peaks' with the constant-LR run's would 'hold' vacuously."""
    runs = paper_like()
    for n in list(runs):
        if n != "constant_lr":
            r = runs[n]
            r.evals = [(s, t, dict(sets, upstream=min(sets["upstream"], r.evals[0][2]["upstream"])) if s > 0 else sets)
                       for s, t, sets in r.evals]
    found = by_id(F.compute(runs, R))
    assert found["s"].verdict == F.DEGENERATE and "no re-warmed run" in found["s"].detail


def test_warmup_runs_that_share_a_warmup_length_are_degenerate():
    runs = paper_like()
    runs["lr_mid_warmup2"].config["schedule"]["warmup"] = 0.001  # rounds to 0 steps of 100, like warmup0
    assert by_id(F.compute(runs, R))["a"].verdict == F.DEGENERATE


def test_roles_from_any_sweep():
    """Findings for runs with the paper sweep's names, through a roles mapping."""
    demo = paper_like()
    rename = {"lr_mid_warmup0": "warmup0pct", "lr_mid_warmup2": "warmup0.5pct", "lr_mid_warmup4": "warmup1pct",
              "lr_mid_warmup8": "warmup2pct", "lr_low_warmup4": "maxlr1.5e-4", "lr_high_warmup4": "maxlr6e-4",
              "constant_lr": "constant3e-5", "replay5pct": "replay5pct", "from_ckpt7pct": "from_step10000",
              "from_ckpt19pct": "from_step27000", "scratch": "scratch"}
    runs = {}
    for old, new in rename.items():
        r = demo[old]
        r.name = new
        runs[new] = r
    roles = F.Roles(reference="warmup1pct", warmups=["warmup0pct", "warmup0.5pct", "warmup1pct", "warmup2pct"],
                    max_lrs=["maxlr1.5e-4", "warmup1pct", "maxlr6e-4"], constant="constant3e-5", replay="replay5pct",
                    early_starts=["from_step10000", "from_step27000"], scratch="scratch")
    assert {f.verdict for f in F.compute(runs, roles)} == {F.HOLDS}
    assert F.Roles.from_dict(roles.to_dict()) == roles
    with pytest.raises(Exception, match="unknown keys"):
        F.Roles.from_dict({"reference": "x", "refrence": "y"})


@pytest.mark.parametrize("name", ["lr_mid_warmup4", "constant_lr"])
def test_forgetting_adaptation_and_spike_definitions(name):
    r = paper_like()[name]
    up, down = [s["upstream"] for _, _, s in r.evals], [s["downstream"] for _, _, s in r.evals]
    assert r.forgetting() == pytest.approx(up[-1] - up[0])
    assert r.adaptation() == pytest.approx(down[0] - down[-1])
    assert r.spike() == pytest.approx(max(up[1:3]) - up[0])
    assert r.early_steps() == [5, 10] and r.peak("upstream", [5, 10]) == max(up[1:3])

"""`findings.compute` on synthetic runs whose numbers are chosen by hand: each verdict and the
numbers it prints follow from the definitions, with no training involved."""
from __future__ import annotations

from pathlib import Path

import pytest

from rewarm import findings as F
from rewarm.runs import RunData

STEPS = [0, 5, 10, 50, 100]  # evals; the first 10% of 100 steps holds steps 5 and 10


def run(name: str, up: list[float], down: list[float]) -> RunData:
    r = RunData(name, Path(name), {"train": {"max_steps": 100}})
    r.evals = [(s, s * 1000, {"upstream": u, "downstream": d}) for s, u, d in zip(STEPS, up, down)]
    return r


def paper_like() -> dict[str, RunData]:
    """Every finding holds: warmups differ little, max LR orders forgetting and adaptation, ..."""
    runs = [
        run("lr_mid_warmup0pct", [3.0, 3.6, 3.5, 3.3, 3.30], [5.0, 4.2, 3.9, 3.2, 3.00]),
        run("lr_mid_warmup0.5pct", [3.0, 3.6, 3.5, 3.3, 3.31], [5.0, 4.2, 3.9, 3.2, 3.01]),
        run("lr_mid_warmup1pct", [3.0, 3.6, 3.5, 3.3, 3.30], [5.0, 4.2, 3.9, 3.2, 3.00]),
        run("lr_mid_warmup2pct", [3.0, 3.5, 3.5, 3.3, 3.32], [5.0, 4.3, 3.9, 3.2, 3.02]),
        run("lr_low_warmup1pct", [3.0, 3.4, 3.3, 3.2, 3.10], [5.0, 4.4, 4.1, 3.5, 3.30]),
        run("lr_high_warmup1pct", [3.0, 3.9, 3.8, 3.6, 3.60], [5.0, 4.0, 3.7, 3.0, 2.90]),
        run("constant_lr", [3.0, 3.05, 3.05, 3.05, 3.05], [5.0, 4.8, 4.6, 4.2, 4.00]),
        run("replay5pct", [3.0, 3.3, 3.2, 3.1, 3.10], [5.0, 4.2, 3.9, 3.2, 3.05]),
        run("from_ckpt7pct", [4.0, 4.3, 4.2, 4.0, 4.00], [6.0, 5.0, 4.5, 3.6, 3.40]),
        run("from_ckpt19pct", [3.5, 3.9, 3.8, 3.6, 3.60], [5.5, 4.6, 4.2, 3.4, 3.20]),
        run("scratch", [9.0, 8.0, 7.5, 6.0, 5.50], [9.0, 7.0, 6.0, 4.5, 3.90]),
    ]
    return {r.name: r for r in runs}


def by_id(found):
    return {f.id: f for f in found}


def test_every_finding_holds_on_paper_like_numbers():
    found = by_id(F.compute(paper_like()))
    assert list(found) == ["a", "b", "c", "d", "e", "f", "s"]
    assert {k: f.verdict for k, f in found.items()} == dict.fromkeys(found, "holds")
    # the numbers printed are the definitions evaluated on these runs
    assert "warmups 0.0200 vs max LRs 0.4000" in found["a"].detail  # downstream spreads 3.02-3.00, 3.30-2.90
    assert "forgetting 0.3000 → 0.1000 (falls by 0.2000)" in found["f"].detail
    assert "final downstream rises by 0.0500" in found["f"].detail
    assert "lr_high_warmup1pct +0.9000" in found["s"].detail  # peak 3.9 over steps 5, 10 minus 3.0
    assert "scratch 3.9000, worst re-warmed 3.3000" in found["d"].detail
    assert "at 100,000 tokens" in found["d"].detail  # 3.90 < 4.00; at 50k 4.5 > 4.2 still


def test_each_finding_can_fail():
    runs = paper_like()
    runs["lr_high_warmup1pct"] = run("lr_high_warmup1pct", [3.0, 3.9, 3.8, 3.6, 3.20], [5.0, 4.0, 3.7, 3.0, 2.90])
    runs["constant_lr"] = run("constant_lr", [3.0, 3.05, 3.05, 3.5, 3.50], [5.0, 4.8, 4.6, 4.2, 4.00])
    runs["replay5pct"] = run("replay5pct", [3.0, 3.3, 3.2, 3.1, 3.25], [5.0, 4.2, 3.9, 3.2, 3.40])
    runs["from_ckpt19pct"] = run("from_ckpt19pct", [3.5, 3.9, 3.8, 3.2, 3.10], [5.5, 4.6, 4.2, 3.4, 2.95])
    runs["scratch"] = run("scratch", [9.0, 8.0, 7.5, 6.0, 5.50], [9.0, 7.0, 4.5, 3.2, 3.10])
    found = by_id(F.compute(runs))
    assert found["b"].verdict == "does not hold at this scale"  # upstream no longer rises low -> mid -> high
    assert found["c"].verdict == "does not hold at this scale"  # constant LR now forgets the most
    assert found["d"].verdict == "does not hold at this scale"  # scratch beats the low-LR run
    assert "at 10,000 tokens" in found["d"].detail  # 4.5 < the constant-LR run's 4.6 there
    assert found["e"].verdict == "does not hold at this scale"  # the 19% start ends lowest
    assert found["f"].verdict == "does not hold at this scale"  # downstream rises by 0.40 > forgetting falls by 0.05


def test_missing_runs_are_reported_not_judged():
    runs = {k: v for k, v in paper_like().items() if k not in ("scratch", "replay5pct")}
    found = by_id(F.compute(runs))
    assert found["d"].holds is None and found["f"].holds is None
    assert found["a"].verdict == "holds"


@pytest.mark.parametrize("name", ["lr_mid_warmup1pct", "constant_lr"])
def test_forgetting_adaptation_and_spike_definitions(name):
    r = paper_like()[name]
    up, down = [s["upstream"] for _, _, s in r.evals], [s["downstream"] for _, _, s in r.evals]
    assert r.forgetting() == pytest.approx(up[-1] - up[0])
    assert r.adaptation() == pytest.approx(down[0] - down[-1])
    assert r.spike() == pytest.approx(max(up[1:3]) - up[0])

"""Each schedule's formula at hand-computed points."""
import math

import pytest

from rewarm.config import ScheduleConfig
from rewarm.errors import UserError
from rewarm.schedules import SCHEDULES, build_schedule, parse_spec, warmup_steps


def S(**kw):
    return ScheduleConfig(**kw)


def test_warmup_spec_fraction_or_steps():
    assert warmup_steps(0.01, 1000) == 10
    assert warmup_steps(0.0, 1000) == 0
    assert warmup_steps(25, 1000) == 25


def test_linear_warmup_from_start_lr():
    lr = build_schedule(S(name="cosine", max_lr=1.0, min_lr=0.1, warmup=10, warmup_start_lr=0.2), 110)
    assert lr(0) == pytest.approx(0.2)
    assert lr(5) == pytest.approx(0.6)
    assert lr(10) == pytest.approx(1.0)


def test_cosine_points():
    lr = build_schedule(S(name="cosine", max_lr=1.0, min_lr=0.1, warmup=10), 110)
    assert lr(0) == 0.0
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway: min + (max-min)/2
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    vals = [lr(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_cosine_neox_clipped_flattens_at_80_percent():
    # max/2 (1 + cos(pi p)) = 0.1 max  <=>  p = acos(-0.8)/pi = 0.7952
    lr = build_schedule(S(name="cosine_neox_clipped", max_lr=1.0, min_lr=0.1, warmup=0), 1000)
    assert lr(0) == pytest.approx(1.0)
    assert lr(500) == pytest.approx(0.5)
    assert lr(790) > 0.1 and lr(800) == pytest.approx(0.1)
    assert lr(1000) == pytest.approx(0.1)


def test_constant_linear_inverse_sqrt():
    assert build_schedule(S(name="constant", max_lr=3e-5, warmup=0), 100)(57) == 3e-5
    c = build_schedule(S(name="constant", max_lr=3e-5, warmup=10), 100)
    assert c(5) == pytest.approx(1.5e-5) and c(99) == 3e-5
    lin = build_schedule(S(name="linear", max_lr=1.0, min_lr=0.0, warmup=0), 100)
    assert lin(0) == 1.0 and lin(25) == pytest.approx(0.75) and lin(100) == 0.0
    inv = build_schedule(S(name="inverse_sqrt", max_lr=1.0, min_lr=0.01, warmup=4), 1000)
    assert inv(4) == pytest.approx(1.0)
    assert inv(4 + 12) == pytest.approx(math.sqrt(4 / 16))
    assert inv(10**6) == pytest.approx(0.01)


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("1-sqrt", 1 - math.sqrt(0.5)), ("cosine", 0.5)])
def test_wsd(shape, mid):
    lr = build_schedule(S(name="wsd", max_lr=1.0, min_lr=0.0, warmup=10, decay_fraction=0.2, decay_shape=shape), 100)
    assert lr(10) == 1.0 and lr(79) == 1.0
    assert lr(80) == pytest.approx(1.0)  # p = 0 at the start of the cooldown
    assert lr(90) == pytest.approx(mid)
    assert lr(100) == pytest.approx(0.0)


def test_wsd_1_sqrt_quarter():
    lr = build_schedule(S(name="wsd", max_lr=2.0, min_lr=0.2, warmup=0, decay_fraction=0.4, decay_shape="1-sqrt"), 100)
    assert lr(70) == pytest.approx(0.2 + 1.8 * (1 - math.sqrt(0.25)))


def test_infinite_cosine_phases():
    s = S(name="infinite", max_lr=3e-4, min_lr=3e-5, const_lr=1.65e-4, warmup=0.01,
          cooldown_fraction=0.6, constant_fraction=0.85, cooldown_shape="cosine")
    lr = build_schedule(s, 1000)
    assert lr(10) == pytest.approx(3e-4)  # end of warmup
    assert lr(305) == pytest.approx(1.65e-4 + (3e-4 - 1.65e-4) * 0.5)  # halfway through the cooldown
    assert lr(600) == pytest.approx(1.65e-4) and lr(849) == pytest.approx(1.65e-4)
    assert lr(925) == pytest.approx(1.65e-4 * (3e-5 / 1.65e-4) ** 0.5)  # exponential anneal midpoint
    assert lr(1000) == pytest.approx(3e-5)


def test_infinite_inv_sqrt_cooldown():
    s = S(name="infinite", max_lr=3e-4, min_lr=3e-5, const_lr=1.65e-4, warmup=0, cooldown_fraction=0.5,
          constant_fraction=0.8, cooldown_shape="inv_sqrt", timescale=10.0)
    lr = build_schedule(s, 1000)
    h = lambda x: 1 / math.sqrt(1 + 10 * x) - 1  # noqa: E731
    assert lr(0) == pytest.approx(3e-4)
    assert lr(250) == pytest.approx(3e-4 + (1.65e-4 - 3e-4) * h(0.5) / h(1))
    assert lr(500) == pytest.approx(1.65e-4)
    vals = [lr(t) for t in range(0, 1001)]
    assert all(a >= b - 1e-15 for a, b in zip(vals, vals[1:]))


def test_repeated_cosine_rewarms_each_cycle():
    lr = build_schedule(S(name="repeated_cosine", max_lr=1.0, min_lr=0.1, warmup=0.1, num_cycles=2), 200)
    assert lr(0) == 0.0 and lr(10) == pytest.approx(1.0)
    assert lr(99) < 0.2
    # the second cycle re-warms from min_lr (where the first ended), linearly: 0.1 + 0.9 * 5/10 halfway
    assert lr(100) == pytest.approx(0.1) and lr(105) == pytest.approx(0.55) and lr(110) == pytest.approx(1.0)
    assert lr(200) == pytest.approx(0.1)


def test_every_schedule_is_positive_and_ends_at_its_floor():
    for name in SCHEDULES:
        lr = build_schedule(S(name=name, max_lr=1e-3, min_lr=1e-4, warmup=0.05), 400)
        vals = [lr(t) for t in range(401)]
        assert min(vals) >= 0, name
        if name != "constant":
            assert vals[-1] == pytest.approx(1e-4, rel=1e-6) or name == "inverse_sqrt", name


def test_parse_spec():
    s = parse_spec("wsd:max_lr=6e-4,decay_shape=linear,warmup=0.02")
    assert (s.name, s.max_lr, s.decay_shape, s.warmup) == ("wsd", 6e-4, "linear", 0.02)
    with pytest.raises(UserError, match="max_lr"):
        parse_spec("cosine:max_lrr=1")


def test_config_declares_exactly_the_schedules_that_exist():
    """config validates `schedule.name` against its own list (it does not import schedules)."""
    from rewarm.config import SCHEDULE_NAMES

    assert set(SCHEDULE_NAMES) == set(SCHEDULES)


def test_config_does_not_import_schedules():
    import subprocess
    import sys

    code = "import sys, rewarm.config; print('rewarm.schedules' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"

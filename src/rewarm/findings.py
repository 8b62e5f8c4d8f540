"""The papers' findings as computable checks over a set of runs (definitions: docs/findings.md).

Each check reads runs by **role** (the reference run, the warmup sweep, the max-LR sweep, the
constant-LR control, ...): `Roles` maps roles to run names, so any sweep that declares its roles
gets the findings (the demo's roles are `DEMO_ROLES`; a sweep writes its own to `roles.yaml`).

Verdicts are judged against seed-to-seed noise: the spread (max − min) of the final losses of
the reference run's seed replicates. A difference in the finding's direction larger than the
noise **holds**; one against it larger than the noise **does not hold at this scale**; anything
else is **within noise**. A finding whose comparison set is not all there, finished and with a
step-0 eval is **incomplete**. Nothing here is tuned to make a verdict come out one way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from rewarm.errors import UserError
from rewarm.runs import RunData

HOLDS, FAILS, NOISE, INCOMPLETE, DEGENERATE = ("holds", "does not hold at this scale", "within noise", "incomplete",
                                               "degenerate")


@dataclass
class Roles:
    """Which run plays which part in the papers' comparisons (run names)."""

    reference: str  # mid max LR, the reference warmup, from the final pre-training checkpoint
    warmups: list[str] = field(default_factory=list)  # the warmup sweep at the reference max LR
    max_lrs: list[str] = field(default_factory=list)  # low, mid, high max LR at the reference warmup
    constant: str | None = None  # constant LR at the pre-training minimum
    replay: str | None = None  # the reference setting with a few % replay of upstream data
    early_starts: list[str] = field(default_factory=list)  # the reference setting from earlier checkpoints, earliest first
    start_reference: str | None = None  # the final-checkpoint run early_starts are compared with (default: reference)
    scratch: str | None = None  # random init, the same tokens
    reference_seeds: list[str] = field(default_factory=list)  # replicates of the reference (incl. itself)
    upstream: str = "upstream"  # eval-set names
    downstream: str = "downstream"

    @classmethod
    def from_dict(cls, raw: dict) -> "Roles":
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown or "reference" not in raw:
            raise UserError(f"roles: unknown keys {sorted(unknown)} or no `reference`; valid keys: {', '.join(sorted(known))}.")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rewarmed(self) -> list[str]:
        """Re-warmed runs without replay from the final checkpoint: the warmup and max-LR sweeps."""
        return list(dict.fromkeys(self.warmups + self.max_lrs))


# `rewarm demo`'s runs: warmups 0 / 2 / 4 / 8 steps of 80 (distinct; the paper's 0 / 0.5 / 1 / 2 % shape)
DEMO_ROLES = Roles(
    reference="lr_mid_warmup4",
    warmups=["lr_mid_warmup0", "lr_mid_warmup2", "lr_mid_warmup4", "lr_mid_warmup8"],
    max_lrs=["lr_low_warmup4", "lr_mid_warmup4", "lr_high_warmup4"],
    constant="constant_lr",
    replay="replay5pct",
    early_starts=["from_ckpt7pct", "from_ckpt19pct"],
    scratch="scratch",
    reference_seeds=["lr_mid_warmup4", "lr_mid_warmup4_seed1", "lr_mid_warmup4_seed2", "lr_mid_warmup4_seed3"],
)


@dataclass
class Finding:
    id: str
    claim: str
    verdict: str
    detail: str

    @property
    def holds(self) -> bool | None:
        return {HOLDS: True, FAILS: False}.get(self.verdict)


@dataclass
class Noise:
    """Seed-to-seed spread (max − min) of the reference's final losses; 0 when there are no replicates."""

    up: float = 0.0
    down: float = 0.0
    mean: float = 0.0
    replicates: int = 0

    def describe(self) -> str:
        if self.replicates < 2:
            return "no seed replicates of the reference: noise unknown, judged as 0"
        return f"seed noise over {self.replicates} replicates: upstream {self.up:.4f}, downstream {self.down:.4f}"


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def judge(strict: list[tuple[float, float]], weak: list[tuple[float, float]] = ()) -> str:
    """`strict`: (margin, noise) pairs that must be clearly positive (margin > noise); `weak`: pairs
    that must only not be clearly negative (margin >= -noise). Any margin below -noise: does not hold."""
    pairs = list(strict) + list(weak)
    if any(m < -n for m, n in pairs):
        return FAILS
    if all(m > n for m, n in strict):
        return HOLDS
    return NOISE


def noise_of(runs: dict[str, RunData], roles: Roles) -> Noise:
    reps = [runs[n] for n in roles.reference_seeds if n in runs and runs[n].finished]
    if len(reps) < 2:
        return Noise()
    up = [r.final(roles.upstream) for r in reps]
    down = [r.final(roles.downstream) for r in reps]
    means = [(u + d) / 2 for u, d in zip(up, down)]
    return Noise(max(up) - min(up), max(down) - min(down), max(means) - min(means), len(reps))


def compute(runs: dict[str, RunData], roles: Roles = DEMO_ROLES) -> list[Finding]:
    up_name, down_name = roles.upstream, roles.downstream
    noise = noise_of(runs, roles)
    nu, nd = noise.up, noise.down

    def missing(names: list[str | None]) -> str | None:
        """Why this comparison set cannot be judged, or None when it is whole."""
        if not names or any(n is None for n in names):
            return "no run has this role"
        gone = [n for n in names if n not in runs]
        unfinished = [n for n in names if n in runs and not runs[n].finished]
        no_start = [n for n in names if n in runs and runs[n].start(up_name) is None]
        parts = ([f"missing {', '.join(gone)}"] if gone else []) + ([f"unfinished {', '.join(unfinished)}"] if unfinished else [])
        parts += [f"no step-0 eval in {', '.join(no_start)}"] if no_start else []
        return "; ".join(parts) or None

    out: list[Finding] = []

    def add(fid: str, claim: str, names: list[str | None], check, needs: tuple[list, ...] = ()) -> None:
        """`needs`: role lists that must each name at least one run (an empty sweep is not a finding)."""
        why = "no run has this role" if any(not group for group in needs) else missing(list(dict.fromkeys(names)))
        if why:
            out.append(Finding(fid, claim, INCOMPLETE, why))
            return
        verdict, detail = check()
        out.append(Finding(fid, claim, verdict, detail))

    R = lambda n: runs[n]  # noqa: E731
    rewarmed = roles.rewarmed

    def a():
        steps = [R(n).warmup_steps() for n in roles.warmups]
        if len(set(steps)) < len(steps):
            return DEGENERATE, f"warmup runs share a warmup length (steps {steps}): nothing to compare"
        spread = lambda names, s: max(R(n).final(s) for n in names) - min(R(n).final(s) for n in names)  # noqa: E731
        wd, md, wu, mu = spread(roles.warmups, down_name), spread(roles.max_lrs, down_name), \
            spread(roles.warmups, up_name), spread(roles.max_lrs, up_name)
        return judge([(md - wd, nd), (mu - wu, nu)]), (
            f"spread of final downstream: warmups {wd:.4f} vs max LRs {md:.4f}; upstream: warmups {wu:.4f} vs "
            f"max LRs {mu:.4f} (warmup steps {steps})")

    add("a", "Warmup length barely matters (Gupta 2023 §4.1)", roles.warmups + roles.max_lrs, a,
        needs=(roles.warmups, roles.max_lrs))

    def b():
        ups = [R(n).final(up_name) for n in roles.max_lrs]
        downs = [R(n).final(down_name) for n in roles.max_lrs]
        verdict = judge([(ups[i + 1] - ups[i], nu) for i in range(len(ups) - 1)],
                        [(downs[i] - downs[i + 1], nd) for i in range(len(downs) - 1)])
        saturates = len(downs) == 3 and downs[1] - downs[2] < 0.25 * (downs[0] - downs[1])
        sat = f" (downstream saturates: mid→high gains {downs[1] - downs[2]:.4f})" if saturates else ""
        return verdict, f"final upstream low→high {', '.join(map(_f, ups))}; final downstream {', '.join(map(_f, downs))}{sat}"

    add("b", "Higher max LR: more adaptation, more forgetting (Gupta §4.2)", roles.max_lrs, b, needs=(roles.max_lrs,))

    def c():
        cst = R(roles.constant)
        strict = [(R(n).forgetting(up_name) - cst.forgetting(up_name), nu) for n in rewarmed]
        strict += [(R(n).adaptation(down_name) - cst.adaptation(down_name), nd) for n in rewarmed]
        return judge(strict), (
            f"constant: forgetting {_f(cst.forgetting(up_name))}, adaptation {_f(cst.adaptation(down_name))}; "
            f"re-warmed minimum: forgetting {_f(min(R(n).forgetting(up_name) for n in rewarmed))}, "
            f"adaptation {_f(min(R(n).adaptation(down_name) for n in rewarmed))}")

    add("c", "Constant small LR forgets least and adapts least (Gupta §4.2)", [roles.constant] + rewarmed, c,
        needs=(rewarmed,))

    def d():
        s = R(roles.scratch)
        verdict = judge([(s.final(down_name) - R(n).final(down_name), nd) for n in rewarmed])
        worst = max(R(n).final(down_name) for n in rewarmed)
        return verdict, (f"final downstream: scratch {_f(s.final(down_name))}, worst re-warmed {_f(worst)}; "
                         f"scratch vs the constant-LR run: {_crossing(s, runs.get(roles.constant), down_name)}")

    add("d", "Re-warmed continual runs beat training from scratch (Gupta §4.2)", [roles.scratch] + rewarmed, d,
        needs=(rewarmed,))

    start_ref = roles.start_reference or roles.reference

    def e():
        starts = roles.early_starts + [start_ref]
        ref = R(start_ref)
        mean = lambda r: (r.final(up_name) + r.final(down_name)) / 2  # noqa: E731
        strict = [(R(n).final(down_name) - ref.final(down_name), nd) for n in roles.early_starts]
        strict += [(mean(R(n)) - mean(ref), noise.mean) for n in roles.early_starts]
        return judge(strict), ("final downstream " + ", ".join(f"{n} {_f(R(n).final(down_name))}" for n in starts) +
                               "; final mean(up, down) " + ", ".join(f"{n} {_f(mean(R(n)))}" for n in starts))

    add("e", "The last pre-training checkpoint is the best start (Gupta §4.3)", roles.early_starts + [start_ref], e,
        needs=(roles.early_starts,))

    def f():
        m, r = R(roles.reference), R(roles.replay)
        fall = m.forgetting(up_name) - r.forgetting(up_name)
        rise = r.final(down_name) - m.final(down_name)
        return judge([(fall, nu), (fall - rise, max(nu, nd))]), (
            f"forgetting {_f(m.forgetting(up_name))} → {_f(r.forgetting(up_name))} (falls by {fall:.4f}); "
            f"final downstream rises by {rise:.4f}")

    add("f", "5% replay cuts forgetting at little downstream cost (Ibrahim 2024)", [roles.reference, roles.replay], f)

    spiking = [n for n in dict.fromkeys(rewarmed + [roles.replay] + roles.early_starts) if n]

    def s():
        cst = R(roles.constant)
        window = cst.early_steps()
        c_peak = cst.peak(up_name, window)
        no_evals = [n for n in spiking + [roles.constant] if R(n).peak(up_name, window) is None]
        if no_evals:
            return INCOMPLETE, f"no upstream evals in the first 10% of steps ({window}) in {', '.join(no_evals)}"
        if all(R(n).peak(up_name, window) <= R(n).start(up_name) for n in spiking):
            # e.g. the window holds only evals before the first nonzero-LR update: nothing spiked to compare
            return DEGENERATE, (f"no re-warmed run's upstream loss rose above its step-0 value in the evals at steps "
                                f"{window}: there is no early spike to compare with the constant-LR run")
        strict, parts = [], []
        for n in spiking:
            peak = R(n).peak(up_name, window)
            strict.append((peak - c_peak, nu))
            parts.append(f"{n} {peak - R(n).start(up_name):+.4f} / {peak - R(n).final(up_name):+.4f}")
        return judge(strict), (f"early upstream peak (evals at steps {window}) vs the constant-LR run's "
                               f"{c_peak:.4f}; per run, peak − step 0 / peak − final: " + ", ".join(parts))

    add("s", "Re-warming spikes the upstream loss early (both papers)", [roles.constant] + spiking, s, needs=(spiking,))
    for finding in out:
        if finding.verdict not in (INCOMPLETE, DEGENERATE):
            finding.detail += f" [{noise.describe()}]"
    return out


def _crossing(scratch: RunData, constant: RunData | None, name: str) -> str:
    """From which eval on scratch's loss stays below the constant-LR run's to the end (same tokens)."""
    if constant is None:
        return "no constant-LR run"
    const = dict(constant.series(name))
    pairs = [(tok, loss, const[tok]) for tok, loss in scratch.series(name) if tok in const]
    if not pairs:
        return "no evals at the same tokens"
    above = [i for i, (_, loss, c) in enumerate(pairs) if loss >= c]
    if not above:
        return "below from the first eval"
    if above[-1] == len(pairs) - 1:
        return "never stays below (above at the last eval)"
    return f"below from {pairs[above[-1] + 1][0]:,} tokens to the end"


def as_markdown(findings: list[Finding]) -> str:
    rows = ["| id | finding | result | numbers |", "|---|---|---|---|"]
    rows += [f"| {f.id} | {f.claim} | **{f.verdict}** | {f.detail} |" for f in findings]
    return "\n".join(rows)


ROLES_FILE = "roles.yaml"


def write_roles(directory: Path, roles: Roles) -> Path:
    import yaml

    from rewarm import atomic

    return atomic.write_text(Path(directory) / ROLES_FILE, yaml.safe_dump(roles.to_dict(), sort_keys=False))


def find_roles(paths: list[str], names: set[str], roles_file: str | None = None) -> Roles | None:
    """The roles for a report: an explicit file, else a roles.yaml in a given directory, else the
    demo's when its reference run is among the runs, else None (no findings table)."""
    from rewarm.config import read_yaml

    candidates = [Path(roles_file)] if roles_file else [Path(p) / ROLES_FILE for p in paths]
    for c in candidates:
        if c.is_file():
            raw = read_yaml(c)
            if not isinstance(raw, dict):
                raise UserError(f"{c} must hold a mapping of roles (reference, warmups, max_lrs, ...).")
            return Roles.from_dict(raw)
    if roles_file:
        raise UserError(f"roles file {roles_file} does not exist.")
    return DEMO_ROLES if DEMO_ROLES.reference in names else None


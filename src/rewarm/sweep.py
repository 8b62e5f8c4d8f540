"""Sweeps: a base config + axes (dotted key -> values) + explicit extra runs -> named runs.

    name: gupta2023                       # optional
    out_dir: runs/gupta2023               # each run lands in out_dir/<run name>/
    base: {...run config...}              # or a path to a YAML run config
    axes:
      schedule.max_lr: [1.5e-4, 3e-4, 6e-4]
      schedule.warmup: [0, 0.01]
    runs:                                 # optional explicit runs (overrides on the base)
      - {name: constant, set: {schedule.name: constant, schedule.max_lr: 3.0e-5}}
    seeds: [0, 1, 2]                      # optional: every run once per seed, named <run>_seed<k>
                                          # (or per run: {name: x, set: {...}, seeds: [0, 1, 2]})
    roles: {reference: ..., ...}          # optional: which run plays which part in the papers'
                                          # findings (findings.Roles), written to out_dir/roles.yaml

Runs are executed one after another; finished runs are skipped, interrupted ones resumed,
and a failed run does not stop the others (they are listed at the end, exit code 1).
"""
from __future__ import annotations

import copy
import itertools
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rewarm import atomic
from rewarm.config import config_from_dict, dump_yaml, read_mapping, read_yaml, set_dotted
from rewarm.errors import UserError
from rewarm.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class PlannedRun:
    name: str
    raw: dict  # the run config as a dict (validated by config_from_dict when built)

    @property
    def out_dir(self) -> Path:
        return Path(self.raw["out_dir"])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "-")


def run_name(assignment: dict[str, Any]) -> str:
    """{'schedule.max_lr': 3e-4, 'schedule.warmup': 0.01} -> 'maxlr3e-04_warmup0.01'."""
    return "_".join(f"{key.rsplit('.', 1)[-1].replace('_', '')}{_fmt(v)}" for key, v in assignment.items()) or "base"


def _set(raw: dict, assignment: dict[str, Any]) -> dict:
    out = copy.deepcopy(raw)
    for key, value in assignment.items():
        set_dotted(out, key, value)
    return out


def load_sweep(path: str | Path) -> dict:
    p = Path(path)
    spec = read_mapping(p, "sweep file", "name, out_dir, base, axes, runs")
    unknown = set(spec) - {"name", "out_dir", "base", "axes", "runs", "seeds", "roles"}
    if unknown:
        raise UserError(f"sweep file {p}: unknown top-level keys {sorted(unknown)}; valid: name, out_dir, base, axes, runs, "
                        f"seeds, roles.")

    if isinstance(spec.get("base"), str):
        base_path = (p.parent / spec["base"]) if not Path(spec["base"]).is_absolute() else Path(spec["base"])
        if not base_path.is_file():
            raise UserError(f"sweep file {p}: base config {base_path} does not exist.")
        spec["base"] = read_yaml(base_path)
    spec.setdefault("out_dir", f"runs/{spec.get('name', p.stem)}")
    return spec


def expand(spec: dict) -> list[PlannedRun]:
    """The grid of `axes` (every combination) followed by the explicit `runs`."""
    base = spec.get("base") or {}
    axes = spec.get("axes") or {}
    root = Path(spec["out_dir"])
    planned: list[PlannedRun] = []
    if axes:
        for values in itertools.product(*axes.values()):
            assignment = dict(zip(axes, values))
            name = run_name(assignment)
            planned.append(PlannedRun(name, dict(_set(base, assignment), out_dir=str(root / name))))
    elif not spec.get("runs"):
        planned.append(PlannedRun("base", dict(copy.deepcopy(base), out_dir=str(root / "base"))))
    top_seeds = _check_seeds(spec.get("seeds"), "`seeds`")
    seeds_of = {r.name: top_seeds for r in planned}
    for extra in spec.get("runs") or []:
        if "name" not in extra:
            raise UserError("every entry of `runs:` needs a `name`.")
        unknown = set(extra) - {"name", "set", "seeds"}
        if unknown:
            raise UserError(f"sweep run `{extra['name']}`: unknown keys {sorted(unknown)}; valid: name, set, seeds.")
        planned.append(PlannedRun(extra["name"], dict(_set(base, extra.get("set") or {}), out_dir=str(root / extra["name"]))))
        seeds_of[extra["name"]] = _check_seeds(extra.get("seeds"), f"`seeds` of run `{extra['name']}`") or top_seeds
    replicated: list[PlannedRun] = []
    for r in planned:  # replicates: once per seed (the model init for scratch runs, the data order for continual)
        seeds = seeds_of[r.name]
        if len(seeds) > 1:
            replicated += [PlannedRun(seeded_name(r.name, s), dict(r.raw, seed=s, out_dir=str(root / seeded_name(r.name, s))))
                           for s in seeds]
        else:
            replicated.append(PlannedRun(r.name, dict(r.raw, seed=seeds[0]) if seeds else r.raw))
    planned = replicated
    names = [r.name for r in planned]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UserError(f"sweep run names must be unique; repeated: {sorted(dupes)}.")
    for r in planned:
        try:
            config_from_dict(r.raw)
        except UserError as exc:
            raise UserError(f"sweep run `{r.name}`: {exc}") from None
    return planned


def seeded_name(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


def _check_seeds(seeds, what: str) -> list[int]:
    if seeds is None:
        return []
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds)):
        raise UserError(f"{what} must be a list of distinct integers >= 0, e.g. [0, 1, 2]; got {seeds!r}.")
    return seeds


def roles_of(spec: dict, runs: list[PlannedRun]):
    """The sweep's `roles:` as findings.Roles over the planned run names: a role whose run was
    replicated (`<run>_seed<k>`) is played by its first replicate, and the reference's replicates
    measure the seed noise."""
    import re

    from rewarm.findings import Roles

    raw = spec.get("roles")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError("sweep `roles:` must be a mapping, e.g. {reference: warmup1pct, constant: constant3e-5, ...}.")
    roles = Roles.from_dict(dict(raw))
    names = [r.name for r in runs]

    def replicas(name: str) -> list[str]:
        return [n for n in names if n == name or re.fullmatch(re.escape(name) + r"_seed\d+", n)]

    def play(name):
        if name is None:
            return None
        found = replicas(name)
        if not found:
            raise UserError(f"sweep `roles:` names a run the sweep does not have: `{name}`.")
        return found[0]

    out = {k: ([play(n) for n in v] if isinstance(v, list) else play(v)) for k, v in roles.to_dict().items()
           if k not in ("upstream", "downstream", "reference_seeds")}
    reps = replicas(roles.reference)
    out["reference_seeds"] = [play(n) for n in roles.reference_seeds] or (reps if len(reps) > 1 else [])
    return Roles(**out, upstream=roles.upstream, downstream=roles.downstream)


def write_configs(runs: list[PlannedRun], root: Path) -> list[Path]:
    """Resolved config of every run in <out_dir>/configs/<name>.yaml (for launchers)."""
    paths = []
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for r in runs:
        path = root / "configs" / f"{r.name}.yaml"
        atomic.write_text(path, dump_yaml(config_from_dict(r.raw)))
        paths.append(path)
    return paths


def status(run: PlannedRun) -> str:
    rd = RunDir(run.out_dir)
    if rd.is_finished():
        return "done"
    if rd.checkpoints.exists() and any(rd.checkpoints.glob("step_*")):
        return "partial"
    return "todo"


def launch_commands(config_paths: list[Path], nproc: int = 1) -> list[str]:
    out = []
    for p in config_paths:
        q = shlex.quote(str(p))
        out.append(f"rewarm train {q}")
        out.append(f"torchrun --standalone --nproc_per_node {nproc} -m rewarm train {q}")
    return out


def slurm_array(config_paths: list[Path], job_name: str) -> str:
    lines = "\n".join(f"  {shlex.quote(str(p.resolve()))}" for p in config_paths)
    return f"""#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{len(config_paths) - 1}
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --output=slurm-%A_%a.out
# One array task per sweep run; re-submitting skips nothing by itself, but each task resumes
# its run from its newest checkpoint when one exists.
CONFIGS=(
{lines}
)
CFG=${{CONFIGS[$SLURM_ARRAY_TASK_ID]}}
OUT=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['out_dir'])" "$CFG")
if [ -f "$OUT/summary.json" ]; then echo "already done: $OUT"; exit 0; fi
if ls "$OUT"/checkpoints/step_* >/dev/null 2>&1; then RESUME=--resume; else RESUME=--overwrite; fi
srun torchrun --standalone --nproc_per_node ${{SLURM_GPUS_ON_NODE:-1}} -m rewarm train "$CFG" $RESUME
"""


def run_all(runs: list[PlannedRun], progress: bool = True, jobs: int = 1) -> dict[str, str]:
    """Run each planned run (in this process, or `jobs` child processes at a time);
    returns {name: finished|skipped|failed: reason}. A failed run does not stop the others."""
    from rewarm.errors import Preempted
    from rewarm.train import train

    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    results: dict[str, str] = {}
    bar = tqdm(total=len(runs), desc="sweep", unit="run", disable=not progress, position=0, dynamic_ncols=True)
    states = {r.name: status(r) for r in runs}
    for r in runs:
        if states[r.name] == "done":
            results[r.name] = "skipped (already finished)"
            bar.update(1)
    todo = [r for r in runs if states[r.name] != "done"]
    if jobs > 1 and len(todo) > 1:
        from rewarm.launcher import run_parallel

        try:
            results.update(run_parallel(todo, jobs, states, bar))
        finally:
            bar.close()
        return {r.name: results[r.name] for r in runs if r.name in results}
    for r in todo:
        bar.set_postfix_str(r.name)
        partial = states[r.name] == "partial"
        raw = dict(r.raw, init="resume") if partial else r.raw
        try:
            train(config_from_dict(raw), overwrite=not partial, progress=progress)
            results[r.name] = "resumed and finished" if partial else "finished"
        except Preempted:
            raise  # the machine is being taken away: stop the sweep, the run resumes next time
        except Exception as exc:  # divergence, a full disk, a bad path: this run failed, the others go on
            log.error("run %s failed: %s", r.name, exc)
            results[r.name] = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        bar.update(1)
    bar.close()
    return {r.name: results[r.name] for r in runs}

"""`rewarm upcycle PLAN.yaml`: branch → mix → train the mixture → routing per domain.

    out_dir: runs/upcycle
    base: {...run config...}     # or a path: every run's settings; model.path = the dense seed
    branches:                    # one continual run per domain, all from the seed (init: weights)
      - {name: shakespeare, data: data/shakespeare}        # a prepared dir, or a list of {name, path, weight}
      - {name: code, data: data/code, set: {train.max_steps: 40}}
    upcycle: {mode: bam, kv_sharing: false, seed_expert: false, top_k: 2}
    moe_run: {set: {train.max_steps: 30, moe.lbl_scope: global_batch}}   # the mixture's own run

On disk: out_dir/branches/<name>/ (ordinary runs), out_dir/moe_model/ (the mixed model, an HF
directory), out_dir/moe/ (the mixture's run, trained on every branch's data with equal weights unless
`moe_run.set` says otherwise; its routing.json holds the routing per eval set), out_dir/configs/.
Finished stages are skipped and interrupted runs resumed, so the command can simply be run again.
The branches are independent: `--print-commands` / `--slurm-array` hand them to a cluster instead.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rewarm import atomic
from rewarm.config import config_from_dict, read_mapping, read_yaml, set_dotted
from rewarm.errors import UserError
from rewarm.moe.mix import MODES
from rewarm.rundir import RunDir
from rewarm.sweep import PlannedRun

log = logging.getLogger(__name__)
TOP_KEYS = {"out_dir", "base", "branches", "upcycle", "moe_run"}
UPCYCLE_KEYS = {"mode": "bam", "kv_sharing": False, "seed_expert": False, "top_k": 2, "router_init_std": 0.02}


@dataclass
class Plan:
    out_dir: Path
    base: dict
    branches: list[PlannedRun]
    upcycle: dict
    moe_set: dict = field(default_factory=dict)

    @property
    def moe_model(self) -> Path:
        return self.out_dir / "moe_model"

    def moe_run(self) -> PlannedRun:
        raw = copy.deepcopy(self.base)
        raw.update(out_dir=str(self.out_dir / "moe"), init="weights")
        set_dotted(raw, "model.path", str(self.moe_model))
        sources = []
        for b in self.branches:  # each branch's data gets an equal share; its own sources keep their ratios
            cfg = config_from_dict(b.raw)
            total = sum(s.weight for s in cfg.data.train)
            if total <= 0:
                raise UserError(f"branch `{b.name}`: its data sources all have weight 0.")
            sources += [{"name": s.name, "path": s.path, "weight": s.weight / total} for s in cfg.data.train]
        set_dotted(raw, "data.train", sources)
        for key, value in self.moe_set.items():
            set_dotted(raw, key, value)
        return PlannedRun("moe", raw)


def _mapping(value, what: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"upcycle plan {where}: `{what}` must be a mapping (key: value), got {value!r}.")
    return value


def _check_upcycle_settings(up: dict, n_branches: int, where: str) -> None:
    if up["mode"] not in MODES:
        raise UserError(f"upcycle plan {where}: upcycle.mode must be one of {', '.join(MODES)}, not {up['mode']!r}.")
    for key in ("kv_sharing", "seed_expert"):
        if not isinstance(up[key], bool):
            raise UserError(f"upcycle plan {where}: upcycle.{key} must be true or false, got {up[key]!r}.")
    n_ffn = n_branches + (1 if up["seed_expert"] else 0)
    k = up["top_k"]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_ffn:
        raise UserError(f"upcycle plan {where}: upcycle.top_k must be an integer between 1 and the number of FFN experts "
                        f"({n_ffn}), got {k!r}.")
    std = up["router_init_std"]
    if not isinstance(std, (int, float)) or isinstance(std, bool) or not 0 <= std < 10:
        raise UserError(f"upcycle plan {where}: upcycle.router_init_std must be a number in [0, 10), got {std!r}.")
    if up["kv_sharing"] and up["mode"] != "bam":
        raise UserError(f"upcycle plan {where}: upcycle.kv_sharing needs mode: bam (btx averages attention).")
    if k == n_ffn:
        log.warning("upcycle.top_k = %d = the number of FFN experts: every token goes to every expert, so the "
                    "load-balancing loss is constant and the routing per domain shows nothing. Use a smaller top_k "
                    "(or more branches) to let experts specialise.", k)


def _sources(data, name: str, where: str) -> list[dict]:
    """A branch's `data`: one prepared directory, or a list of {name, path[, weight]} sources."""
    if isinstance(data, str) and data.strip():
        return [{"name": name, "path": data}]
    if isinstance(data, list) and data and all(isinstance(s, dict) for s in data):
        return data
    raise UserError(f"upcycle plan {where}: branch `{name}`: `data` must be a prepared directory (a path) or a list "
                    f"of {{name, path[, weight]}} sources, got {data!r}.")


def _check_seed(path: str, where: str) -> None:
    """The seed is read by every branch: a local path that is missing fails here, not in each branch."""
    local = Path(path)
    if local.is_absolute() or path.startswith(".") or local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"upcycle plan {where}: the dense seed model `{path}` (base.model.path) "
                            f"{'is not an HF model directory (no config.json)' if local.exists() else 'does not exist'}. "
                            f"Point it at a model directory (a run's final/) or an installed model's name.")


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan: every run's config is validated before any of them starts.
    `base` given as a path is relative to the plan file; `out_dir` and data paths, as in run configs,
    to the working directory."""
    p = Path(path)
    spec = read_mapping(p, "upcycle plan", ", ".join(sorted(TOP_KEYS)))
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise UserError(f"upcycle plan {p}: unknown top-level keys {sorted(unknown)}; valid: {', '.join(sorted(TOP_KEYS))}.")
    base = spec.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else p.parent / base
        if not base_path.is_file():
            raise UserError(f"upcycle plan {p}: base config {base_path} does not exist.")
        base = read_yaml(base_path)
    if not isinstance(base, dict) or not isinstance(base.get("model"), dict) or not base["model"].get("path"):
        raise UserError(f"upcycle plan {p}: `base` must be a run config whose model.path is the dense seed model "
                        f"every branch starts from.")
    if not isinstance(base["model"]["path"], str):
        raise UserError(f"upcycle plan {p}: base.model.path must be a path or a model name, got {base['model']['path']!r}.")
    out_dir = spec.get("out_dir") or f"runs/{p.stem}"
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise UserError(f"upcycle plan {p}: `out_dir` must be a directory path, got {out_dir!r}.")
    out_dir = Path(out_dir)
    branches = spec.get("branches")
    if not isinstance(branches, list) or len(branches) < 2:
        raise UserError(f"upcycle plan {p}: `branches` must list at least two {{name, data}} entries (one per domain); "
                        f"got {branches!r}.")
    given = _mapping(spec.get("upcycle"), "upcycle", str(p))
    if set(given) - set(UPCYCLE_KEYS):
        raise UserError(f"upcycle plan {p}: `upcycle` takes {', '.join(UPCYCLE_KEYS)}; got {given!r}.")
    up = {**UPCYCLE_KEYS, **given}
    _check_upcycle_settings(up, len(branches), str(p))
    planned, names = [], set()
    for i, b in enumerate(branches):
        if not isinstance(b, dict) or not b.get("name") or not b.get("data") or set(b) - {"name", "data", "set"}:
            raise UserError(f"upcycle plan {p}: branch {i} must be {{name, data[, set]}}; got {b!r}.")
        if b["name"] in names or b["name"] in ("seed", "moe") or not str(b["name"]).replace("-", "_").isidentifier():
            raise UserError(f"upcycle plan {p}: branch name `{b['name']}` is used twice, is reserved (seed, moe) or is "
                            f"not a plain name (letters, digits, - and _).")
        names.add(b["name"])
        raw = copy.deepcopy(base)
        raw.update(out_dir=str(out_dir / "branches" / b["name"]), init="weights")
        set_dotted(raw, "data.train", _sources(b["data"], b["name"], str(p)))
        for key, value in _mapping(b.get("set"), f"branches[{i}].set", str(p)).items():
            set_dotted(raw, key, value)
        planned.append(PlannedRun(b["name"], raw))
    moe_set = _mapping(_mapping(spec.get("moe_run"), "moe_run", str(p)).get("set"), "moe_run.set", str(p))
    plan = Plan(out_dir, base, planned, up, moe_set)
    for run in planned:
        _validated(run, p)
    moe = _validated(plan.moe_run(), p)
    if not moe.data.eval:
        raise UserError(f"upcycle plan {p}: the mixture's run has no eval sets (base.data.eval): the per-domain "
                        f"losses and the routing per domain are measured on them. Add one held-out set per domain.")
    _check_seed(base["model"]["path"], str(p))
    return plan


def _validated(run: PlannedRun, where: Path):
    try:
        return config_from_dict(run.raw)  # every run's config checked before any of them starts
    except UserError as exc:
        raise UserError(f"upcycle plan {where}, run `{run.name}`: {exc}") from None


def _mix_record(plan: Plan) -> dict:
    """What a mixed model is made of: compared with the plan on every later call."""
    return {"branches": {b.name: str(b.out_dir / "final") for b in plan.branches}, "seed": plan.base["model"]["path"],
            **plan.upcycle}


def _check_record(plan: Plan) -> None:
    """A plan edited after its mix (other settings or branches) must not silently keep the old model."""
    import json

    made = json.loads((plan.moe_model / "upcycle.json").read_text())
    want = _mix_record(plan)
    changed = [k for k in want if made.get(k) != want[k]]
    if changed:
        raise UserError(f"{plan.moe_model} was mixed with other settings ({', '.join(f'{k}: {made.get(k)!r}' for k in changed)}; "
                        f"the plan now says {', '.join(f'{k}: {want[k]!r}' for k in changed)}). Restore the plan, or "
                        f"delete {plan.moe_model} and {plan.out_dir / 'moe'} to mix and train again (or use another out_dir).")


def mix_branches(plan: Plan, progress: bool = True) -> Path:
    """The branches' final models → out_dir/moe_model; upcycle.json, written last, marks it finished."""
    import torch

    from rewarm.model import load_pretrained, save_model
    from rewarm.moe.mix import identity_gap, mix
    from rewarm.tokenizer import load_tokenizer

    atomic.remove_stale_temps(plan.out_dir)  # a mix killed while saving left a temp directory
    if (plan.moe_model / "upcycle.json").is_file():
        _check_record(plan)
        log.info("%s is there: not mixed again", plan.moe_model)
        return plan.moe_model
    if RunDir(plan.out_dir / "moe").has_started():
        raise UserError(f"{plan.out_dir / 'moe'} holds a mixture run trained on an earlier mix, but the mixed model "
                        f"{plan.moe_model} is gone. Delete (or move) {plan.out_dir / 'moe'} to mix and train again.")
    if plan.moe_model.exists():  # a mix killed between saving the model and recording it
        import shutil

        shutil.rmtree(plan.moe_model)
    finals = []
    for b in plan.branches:
        final = b.out_dir / "final"
        if not RunDir(b.out_dir).is_finished():
            raise UserError(f"branch `{b.name}` has not finished ({b.out_dir}); run its stage first: "
                            f"rewarm upcycle PLAN --stage branches")
        if not (final / "config.json").is_file():
            raise UserError(f"branch `{b.name}` finished but its model {final} is missing or incomplete. Train the "
                            f"branch again: rewarm train {plan.out_dir / 'configs' / (b.name + '.yaml')} --overwrite")
        finals.append((b.name, final))
    up = plan.upcycle
    models = [(name, load_pretrained(str(final)).eval()) for name, final in finals]
    seed = load_pretrained(plan.base["model"]["path"]).eval() if up["seed_expert"] else None
    gap = identity_gap(models[0][1], n=len(models), mode=up["mode"], kv_sharing=up["kv_sharing"])
    if gap > 1e-4:
        raise UserError(f"upcycle's built-in check failed: an MoE of identical branches differs from the dense model by "
                        f"{gap:.3g} in the logits (expected float rounding). This architecture is not supported correctly.")
    torch.manual_seed(0)
    moe = mix(models, mode=up["mode"], kv_sharing=up["kv_sharing"], seed_model=seed, top_k=up["top_k"],
              router_init_std=up["router_init_std"])
    tokenizer = load_tokenizer(str(finals[0][1]))
    save_model(moe, plan.moe_model, tokenizer)
    atomic.write_json(plan.moe_model / "upcycle.json", {
        **_mix_record(plan), "identity_check_max_abs_logit_gap": gap, "params": sum(p.numel() for p in moe.parameters()),
        "dense_params": sum(p.numel() for p in models[0][1].parameters())})
    return plan.moe_model


def write_routing_for(run: PlannedRun) -> dict:
    """routing.json of the finished mixture run: its final model on each of its eval sets."""
    import torch

    from rewarm.data.shards import TokenShards
    from rewarm.evaluate import EvalSet
    from rewarm.model import load_pretrained
    from rewarm.moe.specialisation import write_routing

    cfg = config_from_dict(run.raw)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = load_pretrained(str(run.out_dir / "final")).to(device).eval()
    sets = [EvalSet.from_shards(e.name, TokenShards(e.path), cfg.train.seq_len, cfg.eval.tokens) for e in cfg.data.eval]
    precision = "fp32" if cfg.train.precision in ("auto", "fp16") else cfg.train.precision
    return write_routing(run.out_dir, model, sets, device, precision, model.config.expert_names)


STAGES = ("all", "branches", "mix", "moe")


def _check_finished_unchanged(runs: list[PlannedRun]) -> None:
    """A finished run is skipped: refuse when the plan now asks for something else of it."""
    from rewarm.start import check_unchanged

    for r in runs:
        rd = RunDir(r.out_dir)
        if rd.is_finished():
            saved = read_yaml(rd.config) if rd.config.is_file() else {}
            where = saved.get("out_dir", r.raw["out_dir"]) if isinstance(saved, dict) else r.raw["out_dir"]
            try:  # the same run if only its directory moved (or is reached through a link)
                check_unchanged(config_from_dict(dict(r.raw, out_dir=where)), rd)
            except UserError as exc:
                changes = [line.strip() for line in str(exc).splitlines() if line.startswith(("  ", "-", "\t"))]
                raise UserError(f"the plan changed run `{r.name}`, which already finished ({'; '.join(changes) or exc}). "
                                f"Restore the plan, or delete {r.out_dir} (and what was made from it) to run it again.") from None


def run_plan(plan: Plan, stage: str = "all", progress: bool = True) -> dict:
    """Run the plan's stages in order (or one of them); returns what happened to each part."""
    from rewarm.sweep import run_all, write_configs

    moe = plan.moe_run()
    _check_finished_unchanged(plan.branches + [moe])
    write_configs(plan.branches + [moe], plan.out_dir)
    out: dict = {}
    if stage in ("all", "branches"):
        out["branches"] = run_all(plan.branches, progress)
        failed = [n for n, what in out["branches"].items() if what.startswith("failed")]
        if failed:
            why = ", ".join(f"{n} ({out['branches'][n]})" for n in failed)
            raise UserError(f"branch runs failed: {why}. "
                            f"Fix them and run the same command again (finished branches are skipped).")
    if stage in ("all", "mix"):
        out["moe_model"] = str(mix_branches(plan, progress))
    if stage in ("all", "moe"):
        if not (plan.moe_model / "upcycle.json").is_file():
            raise UserError(f"the mixed model {plan.moe_model} is not there yet: run --stage mix first.")
        _check_record(plan)
        out["moe"] = run_all([moe], progress)["moe"]
        if out["moe"].startswith("failed"):
            raise UserError(f"the mixture's run failed: {out['moe']}")
        out["routing"] = write_routing_for(moe)
    return out


def launch_lines(plan: Plan, nproc: int = 1) -> list[str]:
    """One command per branch (independent: run them anywhere, in any order), then what follows them."""
    import shlex

    def train(path: Path) -> str:
        q = shlex.quote(str(path))
        return f"torchrun --standalone --nproc_per_node {nproc} -m rewarm train {q}" if nproc > 1 else f"rewarm train {q}"

    lines = [train(plan.out_dir / "configs" / f"{b.name}.yaml") for b in plan.branches]
    lines += ["# when every branch has finished:", "rewarm upcycle PLAN --stage mix"]
    if nproc > 1:
        lines += [train(plan.out_dir / "configs" / "moe.yaml"),
                  "rewarm upcycle PLAN --stage moe   # the finished run is skipped; writes routing.json"]
    else:
        lines += ["rewarm upcycle PLAN --stage moe"]
    return lines

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
        for b in self.branches:
            own = b.raw["data"]["train"]
            sources += [dict(s, weight=float(s.get("weight", 1.0)) / sum(float(x.get("weight", 1.0)) for x in own))
                        for s in own]
        set_dotted(raw, "data.train", sources)
        for key, value in self.moe_set.items():
            set_dotted(raw, key, value)
        return PlannedRun("moe", raw)


def load_plan(path: str | Path) -> Plan:
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
    if not isinstance(base, dict) or not (base.get("model") or {}).get("path"):
        raise UserError(f"upcycle plan {p}: `base` must be a run config whose model.path is the dense seed model "
                        f"every branch starts from.")
    out_dir = Path(spec.get("out_dir") or f"runs/{p.stem}")
    branches = spec.get("branches")
    if not isinstance(branches, list) or len(branches) < 2:
        raise UserError(f"upcycle plan {p}: `branches` must list at least two {{name, data}} entries (one per domain); "
                        f"got {branches!r}.")
    up = dict(UPCYCLE_KEYS)
    given = spec.get("upcycle") or {}
    if not isinstance(given, dict) or set(given) - set(UPCYCLE_KEYS):
        raise UserError(f"upcycle plan {p}: `upcycle` takes {', '.join(UPCYCLE_KEYS)}; got {given!r}.")
    up.update(given)
    if up["mode"] not in MODES:
        raise UserError(f"upcycle plan {p}: upcycle.mode must be one of {', '.join(MODES)}, not {up['mode']!r}.")
    n_ffn = len(branches) + (1 if up["seed_expert"] else 0)
    if not isinstance(up["top_k"], int) or not 1 <= up["top_k"] <= n_ffn:
        raise UserError(f"upcycle plan {p}: upcycle.top_k must be an integer between 1 and the number of FFN experts "
                        f"({n_ffn}), got {up['top_k']!r}.")
    if up["kv_sharing"] and up["mode"] != "bam":
        raise UserError(f"upcycle plan {p}: upcycle.kv_sharing needs mode: bam (btx averages attention).")
    planned, names = [], set()
    for i, b in enumerate(branches):
        if not isinstance(b, dict) or not b.get("name") or not b.get("data") or set(b) - {"name", "data", "set"}:
            raise UserError(f"upcycle plan {p}: branch {i} must be {{name, data[, set]}}; got {b!r}.")
        if b["name"] in names or b["name"] in ("seed", "moe") or not str(b["name"]).replace("-", "_").isidentifier():
            raise UserError(f"upcycle plan {p}: branch name `{b['name']}` is used twice, is reserved (seed, moe) or is "
                            f"not a plain name (letters, digits, - and _).")
        names.add(b["name"])
        data = b["data"]
        sources = [{"name": b["name"], "path": str(data)}] if isinstance(data, (str, Path)) else data
        raw = copy.deepcopy(base)
        raw.update(out_dir=str(out_dir / "branches" / b["name"]), init="weights")
        set_dotted(raw, "data.train", sources)
        for key, value in (b.get("set") or {}).items():
            set_dotted(raw, key, value)
        planned.append(PlannedRun(b["name"], raw))
    moe_set = (spec.get("moe_run") or {}).get("set") or {}
    plan = Plan(out_dir, base, planned, up, moe_set)
    for run in planned + [plan.moe_run()]:
        try:
            config_from_dict(run.raw)  # every run's config checked before any of them starts
        except UserError as exc:
            raise UserError(f"upcycle plan {p}, run `{run.name}`: {exc}") from None
    return plan


def mix_branches(plan: Plan, progress: bool = True) -> Path:
    """The branches' final models → out_dir/moe_model (skipped when it is there: written atomically)."""
    import torch

    from rewarm.model import load_pretrained, save_model
    from rewarm.moe.mix import identity_gap, mix
    from rewarm.tokenizer import load_tokenizer

    if (plan.moe_model / "config.json").is_file():
        log.info("%s is there: not mixed again (delete it to re-mix)", plan.moe_model)
        return plan.moe_model
    finals = []
    for b in plan.branches:
        final = b.out_dir / "final"
        if not (b.out_dir / "summary.json").is_file() or not final.is_dir():
            raise UserError(f"branch `{b.name}` has not finished ({b.out_dir}); run its stage first: "
                            f"rewarm upcycle PLAN --stage branches")
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
        "branches": {n: str(f) for n, f in finals}, "seed": plan.base["model"]["path"], **up,
        "identity_check_max_abs_logit_gap": gap, "params": sum(p.numel() for p in moe.parameters()),
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
    model = load_pretrained(str(run.out_dir / "final")).eval()
    sets = [EvalSet.from_shards(e.name, TokenShards(e.path), cfg.train.seq_len, cfg.eval.tokens) for e in cfg.data.eval]
    precision = "fp32" if cfg.train.precision in ("auto", "fp16") else cfg.train.precision
    return write_routing(run.out_dir, model, sets, torch.device("cpu"), precision, model.config.expert_names)


STAGES = ("all", "branches", "mix", "moe")


def run_plan(plan: Plan, stage: str = "all", progress: bool = True) -> dict:
    """Run the plan's stages in order (or one of them); returns what happened to each part."""
    from rewarm.sweep import run_all, write_configs

    write_configs(plan.branches + [plan.moe_run()], plan.out_dir)
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
        if not (plan.moe_model / "config.json").is_file():
            raise UserError(f"the mixed model {plan.moe_model} is not there yet: run --stage mix first.")
        moe = plan.moe_run()
        out["moe"] = run_all([moe], progress)["moe"]
        if out["moe"].startswith("failed"):
            raise UserError(f"the mixture's run failed: {out['moe']}")
        out["routing"] = write_routing_for(moe)
    return out


def launch_lines(plan: Plan, nproc: int = 1) -> list[str]:
    """The branches' commands (independent: run them anywhere, in any order), then what follows them."""
    from rewarm.sweep import launch_commands

    paths = [plan.out_dir / "configs" / f"{b.name}.yaml" for b in plan.branches]
    return launch_commands(paths, nproc) + [
        "# when every branch has finished: mix, then train the mixture (or run the two stages of this command)",
        "rewarm upcycle PLAN --stage mix",
        f"rewarm train {plan.out_dir / 'configs' / 'moe.yaml'}" + (f" --nproc {nproc}" if nproc > 1 else ""),
    ]

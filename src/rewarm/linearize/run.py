"""`rewarm linearize CONFIG.yaml`: convert → stage 1 (attention transfer) → stage 2 (LoRA) → merge
→ compare with the teacher. Each stage is an ordinary rewarm run directory (metrics, checkpoints,
resume, report) under `out_dir`; running the command again skips finished stages and resumes an
interrupted one.

The config is an ordinary run config (data, train, eval, …; `model.path` is the teacher) plus a
`linearize:` section (see `Spec`). Stage runs reuse it with their own steps, learning rate and the
model settings of their stage (`model.overrides`), so everything else — data mixtures with replay,
precision, evals, samples, downstream tasks — works as in any run.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rewarm import atomic
from rewarm.config import config_from_dict, read_mapping
from rewarm.errors import UserError, did_you_mean
from rewarm.linearize.recipes import RECIPES

log = logging.getLogger(__name__)


@dataclass
class Spec:
    recipe: str = "lolcats"
    window: int = 64               # the sliding window of hybrid recipes (lolcats_hybrid, liger)
    feature_dim: int | None = None  # d′ of the Hedgehog map per head (recipe default 64)
    stage1_steps: int = 50
    stage1_lr: float | None = None  # recipe default
    stage2_steps: int = 50
    stage2_lr: float | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list | None = None
    compare_contexts: list = field(default_factory=lambda: [1024, 4096])
    compare_new_tokens: int = 16
    compare_teacher_cache: str | None = None  # a JSON file: the teacher's scores, shared by runs that compare recipes


def parse_spec(raw) -> Spec:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError(f"`linearize` must be a mapping of its keys, got {raw!r}.")
    names = [f.name for f in fields(Spec)]
    for key in raw:
        if key not in names:
            raise UserError(f"unknown key `linearize.{key}`{did_you_mean(str(key), names)}. Valid: {', '.join(names)}.")
    spec = Spec(**raw)
    if not isinstance(spec.recipe, str) or spec.recipe not in RECIPES:
        raise UserError(f"unknown recipe `{spec.recipe}`{did_you_mean(str(spec.recipe), RECIPES)}; "
                        f"choose one of {', '.join(RECIPES)}.")
    for key in ("window", "stage1_steps", "stage2_steps", "lora_rank", "compare_new_tokens"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key.endswith("steps") else 1):
            raise UserError(f"`linearize.{key}` must be a {'non-negative' if key.endswith('steps') else 'positive'} "
                            f"integer, got {value!r}.")
    def positive_number(key: str, optional: bool) -> None:
        value = getattr(spec, key)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UserError(f"`linearize.{key}` must be a positive number{' (or unset: the recipe default)' if optional else ''}, "
                            f"got {value!r}.")

    for key in ("stage1_lr", "stage2_lr"):
        positive_number(key, optional=True)
    positive_number("lora_alpha", optional=False)
    if spec.feature_dim is not None and (not isinstance(spec.feature_dim, int) or isinstance(spec.feature_dim, bool)
                                         or spec.feature_dim < 1):
        raise UserError(f"`linearize.feature_dim` must be a positive integer (or unset), got {spec.feature_dim!r}.")
    if spec.lora_targets is not None and (not isinstance(spec.lora_targets, list) or not spec.lora_targets
                                          or not all(isinstance(t, str) for t in spec.lora_targets)):
        raise UserError(f"`linearize.lora_targets` must be a non-empty list of layer names (e.g. [q_proj, v_proj]), "
                        f"got {spec.lora_targets!r}.")
    if not isinstance(spec.compare_contexts, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in spec.compare_contexts):
        raise UserError(f"`linearize.compare_contexts` must be a list of positive integers (context lengths), "
                        f"got {spec.compare_contexts!r}.")
    if spec.compare_teacher_cache is not None and (not isinstance(spec.compare_teacher_cache, str)
                                                   or not spec.compare_teacher_cache.endswith(".json")):
        raise UserError(f"`linearize.compare_teacher_cache` must be the path of a .json file, "
                        f"got {spec.compare_teacher_cache!r}.")
    if spec.stage1_steps + spec.stage2_steps == 0:
        raise UserError("`linearize.stage1_steps` and `stage2_steps` are both 0: nothing would train.")
    from rewarm.mixers.lora import TARGETS

    bad = [t for t in (spec.lora_targets or []) if t not in TARGETS]
    if bad:
        raise UserError(f"LoRA target `{bad[0]}` is not a linear layer of the model{did_you_mean(str(bad[0]), TARGETS)}; "
                        f"choose from {', '.join(TARGETS)}.")
    return spec


def _stage_config(base: dict, out: Path, name: str, model_path: str, steps: int, lr: float, overrides: dict,
                  schedule: dict) -> dict:
    cfg = copy.deepcopy(base)
    cfg["out_dir"] = str(out / name)
    cfg["init"] = "weights"
    model = dict(cfg.get("model") or {})
    model.update(path=model_path, overrides={**(model.get("overrides") or {}), **overrides})
    model.pop("revision", None)
    cfg["model"] = model
    cfg.setdefault("train", {})["max_steps"] = steps
    evals = cfg.setdefault("eval", {})
    if isinstance(evals, dict) and isinstance(evals.get("downstream"), dict):
        # tasks are scored once, on the final student beside the teacher (the comparison), not per stage
        evals["downstream"] = {**evals["downstream"], "tasks": []}
    cfg["schedule"] = {**(cfg.get("schedule") or {}), **schedule, "max_lr": lr}
    if cfg["schedule"].get("name", "cosine") != "constant":
        cfg["schedule"].setdefault("min_lr", lr / 10)
        cfg["schedule"]["min_lr"] = min(cfg["schedule"]["min_lr"], lr)
    return cfg


def _claim(out: Path, what: dict, write: bool) -> None:
    """out_dir belongs to one linearize run (teacher + spec): re-running it resumes; a different
    one must not silently reuse its converted model and finished stages. Checked first, written
    only once the teacher has loaded and converted (a refused teacher leaves nothing behind)."""
    marker = out / "linearize.json"
    if marker.is_file():
        try:
            before = json.loads(marker.read_text())
        except ValueError:
            before = None
        if before != what:
            changed = sorted(k for k in {**(before or {}).get("spec", {}), **what["spec"]}
                             if (before or {}).get("spec", {}).get(k) != what["spec"].get(k))
            if before and before.get("teacher") != what["teacher"]:
                changed.insert(0, "teacher")
            raise UserError(f"{out} holds a different linearize run (changed: {', '.join(changed) or 'its record'}); "
                            "its converted model and stages would not match. Use another out_dir, or delete this one.")
        return
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(marker, what)


def _run_stage(raw: dict, progress: bool, config_path: Path):
    """Train one stage; a finished stage is kept, an interrupted one resumes from its checkpoint,
    one stopped before its first checkpoint starts again (with the config as it is now)."""
    from rewarm import checkpoint
    from rewarm.errors import Preempted
    from rewarm.rundir import RunDir
    from rewarm.train import train

    run = RunDir(raw["out_dir"])
    if run.is_finished():
        log.info("stage %s already finished: kept", run.path.name)
        return run
    overwrite = False
    if run.has_started():
        if checkpoint.load_latest(run.checkpoints) is not None:
            raw = dict(raw, init="resume")
        else:
            overwrite = True  # nothing to resume: a config fixed since (precision, data, …) simply applies
    try:
        return train(config_from_dict(raw), progress=progress, overwrite=overwrite)
    except Preempted as exc:  # the way on is the same command, not the stage's own
        first = str(exc).split("; checkpoint saved")[0]
        raise Preempted(f"linearize stage {run.path.name}: {first}; checkpoint saved. Resume with: "
                        f"rewarm linearize {config_path}") from None
    except UserError as exc:
        if "changes the run" not in str(exc):
            raise
        raise UserError(f"linearize stage {run.path.name} has a checkpoint from a different config. {exc}\n"
                        f"For `rewarm linearize`: put the setting back in {config_path} to resume the stage, or "
                        f"delete {run.path} to train it again with the new setting.") from None


def linearize(config_path: str | Path, progress: bool = True) -> dict:
    from rewarm.linearize.compare import compare
    from rewarm.linearize.convert import convert, new_parameter_fragments
    from rewarm.model import load_pretrained, save_model
    from rewarm.tokenizer import load_tokenizer

    path = Path(config_path)
    base = read_mapping(path, "linearize config")
    spec = parse_spec(base.pop("linearize", None))
    recipe = RECIPES[spec.recipe]
    checked = config_from_dict(dict(base, init="weights"))  # the base must be a valid run (teacher, data, …)
    teacher_path = checked.model.path
    seq_len = checked.train.seq_len
    if (spec.stage1_steps if recipe.transfer_loss else 0) + spec.stage2_steps == 0:
        raise UserError(f"recipe `{spec.recipe}` has no stage 1 (no attention transfer) and `linearize.stage2_steps` "
                        "is 0: nothing would train. Set stage2_steps.")
    if spec.window >= seq_len and spec.recipe in ("lolcats_hybrid", "liger"):
        raise UserError(f"`linearize.window` ({spec.window}) is not below `train.seq_len` ({seq_len}): no token "
                        "would reach the linear part during training. Use a window below seq_len.")
    lora_targets = list(recipe.lora_targets) if spec.lora_targets is None else spec.lora_targets
    out = Path(checked.out_dir)
    started = time.time()
    if ("/" in str(teacher_path) or str(teacher_path).startswith(".")) and not Path(teacher_path).exists():
        raise UserError(f"the teacher `model.path: {teacher_path}` does not exist. Point it at an HF model directory "
                        "or an installed model's name (`rewarm models list`).")
    claim = {"teacher": str(teacher_path), "spec": {k: v for k, v in asdict(spec).items() if not k.startswith("compare_")}}
    _claim(out, claim, write=False)

    # 1. convert (once: the converted weights are the start of every stage)
    tokenizer = load_tokenizer(checked.tokenizer or teacher_path)
    teacher = load_pretrained(teacher_path)
    options = {**recipe.mixer_options, "window": spec.window}
    if spec.feature_dim is not None:
        options["feature_dim"] = spec.feature_dim
    converted = out / "converted"
    new_names: list[str]
    student, new_names = convert(teacher, recipe.mixer, **options)
    _claim(out, claim, write=True)
    if not (converted / "config.json").is_file():
        save_model(student, converted, tokenizer)
    del student
    trainable = new_parameter_fragments(new_names)
    log.info("linearize %s: %s attention → %s; new parameters: %s", spec.recipe, teacher.config.model_type,
             recipe.mixer, ", ".join(trainable) or "none")

    # 2. stage 1: attention transfer (teacher frozen; only the new parameters train)
    start_of_stage2 = str(converted)
    stages = {}
    if recipe.transfer_loss and spec.stage1_steps:
        if not trainable:
            raise UserError(f"recipe `{spec.recipe}` has no new parameters for attention transfer to train.")
        s1 = _stage_config(base, out, "stage1_transfer", str(converted), spec.stage1_steps,
                           recipe.stage1_lr if spec.stage1_lr is None else spec.stage1_lr,
                           {"attention_transfer": True, "transfer_loss": recipe.transfer_loss, "trainable": trainable},
                           {"name": "constant", "warmup": 0})
        stages["stage1"] = _run_stage(s1, progress, path)
        start_of_stage2 = str(stages["stage1"].final)
    # 3. stage 2: LoRA on the next-token loss, the adapters merged at the end
    if spec.stage2_steps:
        s2 = _stage_config(base, out, "stage2_lora", start_of_stage2, spec.stage2_steps,
                           recipe.stage2_lr if spec.stage2_lr is None else spec.stage2_lr,
                           {"attention_transfer": False, "lora_rank": spec.lora_rank, "lora_alpha": spec.lora_alpha,
                            "lora_targets": lora_targets, "trainable": ["lora_"]}, {})
        stages["stage2"] = _run_stage(s2, progress, path)
        final_source = stages["stage2"].final
    else:
        final_source = Path(start_of_stage2)
    student = load_pretrained(str(final_source))
    merged = student.merge_adapters() if hasattr(student, "merge_adapters") else 0
    final = save_model(student, out / "final", tokenizer)
    log.info("merged %d LoRA adapters into %s", merged, final)

    # 4. the comparison with the teacher
    result = {
        "recipe": spec.recipe, "mixer": recipe.mixer, "teacher": teacher_path, "final": str(final),
        "spec": asdict(spec), "new_parameters": trainable, "lora_merged": merged,
        "stages": {k: str(v.path) for k, v in stages.items()},
        "tokens": {k: spec_steps * checked.train.global_batch * seq_len
                   for k, spec_steps in (("stage1", spec.stage1_steps if "stage1" in stages else 0),
                                         ("stage2", spec.stage2_steps))},
    }
    cache = Path(spec.compare_teacher_cache) if spec.compare_teacher_cache else None
    result.update(compare(teacher, student, checked, spec, hybrid=recipe.hybrid, teacher_cache=cache))
    result["seconds"] = round(time.time() - started, 1)
    atomic.write_json(out / "summary.json", result)
    return result

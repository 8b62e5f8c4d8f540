"""Typed run configuration: YAML + dotted overrides -> validated dataclasses.

Every key has a default and a one-line meaning (the README's config reference is
generated from the same dataclasses, see `config_reference()`). Unknown keys and
wrong types fail up front with a message naming the key and the closest valid one,
so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from rewarm.errors import UserError, did_you_mean

log = logging.getLogger(__name__)


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (for errors and the README)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


@dataclass
class ModelConfig:
    preset: Optional[str] = _f(None, "architecture preset for `init: scratch`: tiny, pythia-14m, pythia-70m, pythia-160m, "
                                     "pythia-410m (GPT-NeoX); llama-tiny, smollm2-135m (Llama)")
    path: Optional[str] = _f(None, "HF model directory, rewarm checkpoint dir, an installed model's name (`rewarm models list`), "
                                   "or hub id to load weights from (`init: weights`)")
    revision: Optional[str] = _f(None, "hub revision, e.g. Pythia's `step143000` (hub ids only)")
    overrides: dict = _f({}, "HF config fields to override on the preset/loaded config, e.g. {num_hidden_layers: 2}")
    vocab_size: Optional[int] = _f(None, "model vocab size for scratch models; default: tokenizer size rounded up to a multiple of 64")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the hub (off by default)")
    mixer: Any = _f(None, "sequence mixer for `init: scratch` on a Llama-family preset: softmax (the preset's own "
                          "attention, default), hedgehog, linear, gla, liger, lolcats, deltanet, norm_attention, diag_attention, mom, "
                          "transnormer, a hybrid like deltanet/softmax@4 (every 4th layer softmax), or a list per layer")
    mixer_backend: str = _f("auto", "kernels of the linear mixers: torch (pure PyTorch, any device), fla "
                                    "(flash-linear-attention on CUDA), auto (fla when installed and on CUDA)")


@dataclass
class SourceConfig:
    name: str = _f("train", "label used in logs and metrics")
    path: str = _f("", "a directory written by `rewarm prepare`")
    weight: float = _f(1.0, "share of every global batch drawn from this source (replay = a small weight)")


@dataclass
class EvalSetConfig:
    name: str = _f("", "label of the eval set (e.g. upstream, downstream)")
    path: str = _f("", "a directory written by `rewarm prepare`; its val.bin is used")


@dataclass
class DataConfig:
    train: list = _f([], "training sources: list of {name, path, weight}", )
    eval: list = _f([], "held-out sets: list of {name, path}; the same windows are scored at every eval")


@dataclass
class ReplayConfig:
    kl_coef: float = _f(0.0, "self-distillation on replay rows: add kl_coef x KL(initial model || current model) "
                             "over their next-token distributions (0 = off; needs init: weights)")
    sources: list = _f([], "the data.train sources whose rows get the KL term (default: those written by "
                           "`rewarm replay generate`)")


@dataclass
class MoEConfig:
    lbl_coef: float = _f(0.01, "mixture-of-experts models (`rewarm upcycle`): weight of the load-balancing loss "
                               "N_E x sum_i f_i p_i, averaged over layers (0 = off)")
    lbl_scope: str = _f("micro_batch", "micro_batch | global_batch: count the expert load f_i over each forward's "
                                       "tokens, or over the whole optimizer step on every data-parallel rank")
    z_loss_coef: float = _f(0.0, "weight of the router z-loss (mean squared log-sum-exp of router logits; 0 = off)")
    capacity_factor: float = _f(0.0, "tokens an expert takes per forward, as a multiple of an even share of the "
                                     "assignments; the rest skip it and are logged as dropped (0 = no limit)")


@dataclass
class RetrievalConfig:
    db: Optional[str] = _f(None, "RETRO models (`rewarm retrofit`): the retrieval database (`rewarm retrieval build`); "
                                 "default: the one the model was retro-fitted with")
    k: Optional[int] = _f(None, "neighbours per chunk (default: the model's, set by `rewarm retrofit --k`)")
    exclude_same_doc: bool = _f(True, "skip neighbours from the documents of the window being predicted (no leakage)")
    compare: bool = _f(True, "at each eval, also score the held-out windows without retrieval (event `retrieval`)")
    repetition_prompts: int = _f(4, "at the last eval, greedy continuations of N held-out prompts with and without "
                                    "retrieval: the repeated 4-gram share (0 = off)")
    repetition_tokens: int = _f(64, "new tokens per continuation for the repetition rate")


@dataclass
class RetrofitConfig:
    freeze_base: bool = _f(True, "RETRO-fitting: train only the neighbour encoder and chunked cross-attention (RETRO's "
                                 "recipe); false trains everything (InstructRetro's)")


@dataclass
class ScheduleConfig:
    name: str = _f("cosine", "constant | cosine | cosine_neox_clipped | linear | inverse_sqrt | wsd | infinite | repeated_cosine")
    max_lr: float = _f(3e-4, "peak learning rate, reached at the end of warmup")
    min_lr: float = _f(3e-5, "final / floor learning rate")
    warmup: float = _f(0.01, "warmup length: a fraction of total steps if < 1, else a step count")
    warmup_start_lr: float = _f(0.0, "learning rate at step 0 (linear warmup starts here)")
    decay_fraction: float = _f(0.2, "wsd: share of steps spent in the final cooldown")
    decay_shape: str = _f("1-sqrt", "wsd cooldown shape: linear | 1-sqrt | cosine")
    const_lr: float = _f(1.65e-4, "infinite: the constant-phase learning rate")
    cooldown_fraction: float = _f(0.6, "infinite: end of the cooldown to const_lr, as a fraction of total steps")
    constant_fraction: float = _f(0.85, "infinite: end of the constant phase, as a fraction of total steps")
    cooldown_shape: str = _f("cosine", "infinite: cooldown shape, cosine | inv_sqrt")
    timescale: float = _f(10.0, "infinite inv_sqrt cooldown: timescale alpha")
    num_cycles: int = _f(2, "repeated_cosine: number of warmup+cosine cycles")


@dataclass
class OptimizerConfig:
    name: str = _f("adamw", "adamw | onebit_adam (1-bit Adam: compressed momentum exchange across data-parallel ranks)")
    options: dict = _f({}, "settings of a non-AdamW optimizer, e.g. onebit_adam: {freeze_step: 500} or "
                           "{freeze_after_warmup: 0.15}")
    betas: list = _f([0.9, 0.95], "AdamW betas")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.1, "decoupled weight decay (not applied to biases and norm weights)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    state: str = _f("fresh", "init: weights from a rewarm checkpoint: fresh | from_checkpoint optimizer moments")


@dataclass
class TrainConfig:
    seq_len: int = _f(128, "tokens per training sequence")
    global_batch: int = _f(16, "sequences per optimizer step (micro_batch x grad_accum x world_size)")
    micro_batch: int = _f(8, "sequences per forward/backward on one process")
    max_steps: int = _f(100, "optimizer steps; tokens = max_steps x global_batch x seq_len")
    stop_at_tokens: int = _f(0, "end the run once this many tokens are trained while the LR schedule still spans "
                                "max_steps (Gupta et al.'s 50B-token studies); 0 = run to max_steps")
    precision: str = _f("auto", "auto | fp32 | bf16 (autocast) | fp16 (CUDA); auto = bf16 on GPUs and CPUs with bf16 matrix units, else fp32")
    device: str = _f("auto", "auto | cpu | cuda")
    log_interval: int = _f(1, "write a train line to metrics.jsonl every N steps")
    num_threads: int = _f(0, "torch CPU threads (0 = torch's default)")
    compile: bool = _f(False, "wrap the model with torch.compile")
    activation_checkpointing: bool = _f(False, "recompute each decoder layer's activations in backward instead of "
                                               "keeping them: long sequences fit in memory for ~30% more compute")
    keep_sparsity: bool = _f(False, "a pruned model stays pruned: the weight matrices' zeros at the start are written "
                                    "back after every optimizer step (`rewarm compress`; not with FSDP)")
    max_bad_steps: int = _f(5, "non-finite loss / grad-norm steps in a row (each skipped) before on_divergence acts")
    on_divergence: str = _f("stop", "stop | rollback (reload the last checkpoint and scale the LR by rollback_lr_factor)")
    rollback_lr_factor: float = _f(0.5, "LR multiplier applied at each rollback")


@dataclass
class DownstreamConfig:
    tasks: list = _f([], "lm-eval task names scored on the live model, e.g. [hellaswag, arc_easy] (empty = off)")
    every: int = _f(0, "run them every N steps, plus step 0 and the end (0 = step 0 and the end only)")
    limit: int = _f(0, "samples per task (0 = all of them)")
    num_fewshot: int = _f(0, "few-shot examples per prompt")
    batch: int = _f(8, "lm-eval batch size")
    at_start: bool = _f(True, "score the tasks at step 0 too (false when another run already scored the same starting weights)")


@dataclass
class SamplesConfig:
    prompts: list = _f([], "prompts continued at step 0 and each eval, written to metrics.jsonl (empty = off)")
    max_new_tokens: int = _f(32, "tokens generated per prompt")
    temperature: float = _f(0.0, "0 = greedy (the same weights give the same text); > 0 samples, seeded by `seed`")


@dataclass
class FlatnessConfig:
    every: int = _f(0, "estimate tr(H) of the held-out loss (Hutchinson) at step 0, every N steps and the end (0 = off)")
    samples: int = _f(8, "Rademacher probes per estimate (the standard error falls as 1/sqrt(samples))")
    tokens: int = _f(1024, "held-out tokens the loss is taken over (windows of train.seq_len from the first eval set)")


@dataclass
class CollapseConfig:
    sentences: str = _f("", "the collapse alarm: builtin (100 neutral English sentences) or a file, one per line "
                            "(empty = off); their mean perplexity (ME-PPL) is checked at every eval")
    factor: float = _f(3.0, "alarm when ME-PPL exceeds this multiple of its step-0 value")
    action: str = _f("warn", "warn | stop | rollback (the divergence rollback: last checkpoint, LR x rollback_lr_factor)")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(False, "also write TensorBoard event files to RUN/tensorboard (metrics.jsonl stays the record)")
    wandb: bool = _f(False, "also log to Weights & Biases in offline mode (RUN/wandb; `wandb sync` uploads it)")


@dataclass
class EvalConfig:
    interval: int = _f(50, "evaluate every N steps (and at step 0 and the end)")
    interval_warmup: int = _f(0, "denser eval interval early in the run (0 = same as interval)")
    dense_until: float = _f(0.0, "use interval_warmup up to this step (fraction of steps if < 1); 0 = end of warmup")
    tokens: int = _f(16384, "held-out tokens scored per eval set (windows spread evenly over its whole val split)")
    batch: int = _f(8, "sequences per eval forward")
    downstream: DownstreamConfig = _f(DownstreamConfig(), "downstream tasks (lm-evaluation-harness) during training")
    samples: SamplesConfig = _f(SamplesConfig(), "text samples: the model's continuation of fixed prompts")
    flatness: FlatnessConfig = _f(FlatnessConfig(), "flatness: the Hessian trace of the held-out loss (Liu et al. 2022)")
    collapse: CollapseConfig = _f(CollapseConfig(), "a collapse alarm on the perplexity of ordinary sentences (Yang et al. 2024)")


@dataclass
class CheckpointConfig:
    interval: int = _f(0, "save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, "keep the newest K periodic checkpoints (older ones are deleted)")
    keep_steps: list = _f([], "steps whose checkpoints are always kept (e.g. a suite of starting points)")


@dataclass
class DistributedConfig:
    strategy: str = _f("ddp", "ddp | fsdp (FSDP2 fully_shard per transformer block); used when launched with torchrun")
    cpu_offload: bool = _f(False, "fsdp: keep parameters and optimizer state on the CPU")


@dataclass
class RunConfig:
    out_dir: str = _f("runs/run", "run directory (created; holds config, metrics, checkpoints, final/)")
    seed: int = _f(0, "seed for weights init and the data stream")
    init: str = _f("scratch", "scratch | weights | resume (see README: start modes)")
    tokenizer: Optional[str] = _f(None, "tokenizer dir or hub id; default: model.path, else the one recorded by `rewarm prepare`")
    model: ModelConfig = _f(ModelConfig(), "model architecture / weights")
    data: DataConfig = _f(DataConfig(), "training sources and eval sets")
    replay: ReplayConfig = _f(ReplayConfig(), "replay without the old data: KL to the initial model on replay rows")
    train: TrainConfig = _f(TrainConfig(), "batch, length, steps")
    moe: MoEConfig = _f(MoEConfig(), "routing losses of mixture-of-experts models (ignored by dense models)")
    retrieval: RetrievalConfig = _f(RetrievalConfig(), "retrieval for RETRO models (ignored by others unless `db` is set)")
    retrofit: RetrofitConfig = _f(RetrofitConfig(), "what a RETRO-fitting run trains")
    schedule: ScheduleConfig = _f(ScheduleConfig(), "learning-rate schedule")
    optimizer: OptimizerConfig = _f(OptimizerConfig(), "AdamW settings")
    eval: EvalConfig = _f(EvalConfig(), "held-out evaluation")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "checkpointing")
    distributed: DistributedConfig = _f(DistributedConfig(), "multi-process training")
    logging: LoggingConfig = _f(LoggingConfig(), "live views of a run beside metrics.jsonl")


SCHEDULE_NAMES = ("constant", "cosine", "cosine_neox_clipped", "linear", "inverse_sqrt", "wsd", "infinite", "repeated_cosine")

CHOICES = {
    "schedule.name": SCHEDULE_NAMES,
    "init": ("scratch", "weights", "resume"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_divergence": ("stop", "rollback"),
    "distributed.strategy": ("ddp", "fsdp"),
    "optimizer.state": ("fresh", "from_checkpoint"),
    "schedule.decay_shape": ("linear", "1-sqrt", "cosine"),
    "schedule.cooldown_shape": ("cosine", "inv_sqrt"),
    "model.mixer_backend": ("auto", "torch", "fla"),
    "eval.collapse.action": ("warn", "stop", "rollback"),
    "moe.lbl_scope": ("micro_batch", "global_batch"),
}
@dataclass(frozen=True)
class Range:
    """The valid values of one numeric key: lo <= x <= hi (or < where open); None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


AT_LEAST_0, AT_LEAST_1, FRACTION = Range(0), Range(1), Range(0, 1)

# Every numeric key's valid values, in one place (a test checks that no numeric key is missing).
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1),
    "model.vocab_size": Range(1, 1 << 24),
    "data.train.weight": Range(0, 1e6),
    "schedule.max_lr": AT_LEAST_0, "schedule.min_lr": AT_LEAST_0, "schedule.warmup": AT_LEAST_0,
    "schedule.warmup_start_lr": AT_LEAST_0, "schedule.decay_fraction": FRACTION, "schedule.const_lr": AT_LEAST_0,
    "schedule.cooldown_fraction": FRACTION, "schedule.constant_fraction": FRACTION,
    "schedule.timescale": Range(0, lo_open=True), "schedule.num_cycles": AT_LEAST_1,
    "optimizer.eps": Range(0, lo_open=True), "optimizer.weight_decay": AT_LEAST_0, "optimizer.grad_clip": AT_LEAST_0,
    "train.seq_len": Range(1, 1 << 20), "train.global_batch": Range(1, 1 << 20), "train.micro_batch": Range(1, 1 << 20),
    "train.max_steps": Range(1, 1e12), "train.stop_at_tokens": Range(0, 1e18), "train.log_interval": AT_LEAST_1, "train.num_threads": Range(0, 4096),
    "train.max_bad_steps": AT_LEAST_0, "train.rollback_lr_factor": Range(0, 1, lo_open=True),
    "eval.interval": AT_LEAST_1, "eval.interval_warmup": AT_LEAST_0, "eval.dense_until": AT_LEAST_0,
    "eval.tokens": AT_LEAST_1, "eval.batch": AT_LEAST_1,
    "eval.flatness.every": AT_LEAST_0, "eval.flatness.samples": Range(2, 1e6), "eval.flatness.tokens": AT_LEAST_1,
    "eval.collapse.factor": Range(1, lo_open=True), "replay.kl_coef": AT_LEAST_0,
    "moe.lbl_coef": AT_LEAST_0, "moe.z_loss_coef": AT_LEAST_0, "moe.capacity_factor": AT_LEAST_0,
    "retrieval.k": Range(1, 1024), "retrieval.repetition_prompts": Range(0, 10_000),
    "retrieval.repetition_tokens": Range(4, 1 << 16),
    "eval.downstream.every": AT_LEAST_0, "eval.downstream.limit": AT_LEAST_0,
    "eval.downstream.num_fewshot": AT_LEAST_0, "eval.downstream.batch": AT_LEAST_1,
    "eval.samples.max_new_tokens": Range(1, 1 << 16), "eval.samples.temperature": Range(0, 100),
    "checkpoint.interval": AT_LEAST_0, "checkpoint.keep_last": AT_LEAST_1,
}


def _check_ranges(cfg: RunConfig) -> None:
    for key, valid in RANGES.items():
        head, _, leaf = key.rpartition(".")
        if head in LIST_ITEM_TYPES:
            items = [(f"{head}[{i}].{leaf}", getattr(item, leaf)) for i, item in enumerate(_get(cfg, head))]
        else:
            items = [(key, _get(cfg, key))]
        for name, value in items:
            if value is not None and value not in valid:
                raise UserError(f"`{name}` must be {valid}, got {value!r}. Fix the value in the YAML file or the --set override.")


LIST_ITEM_TYPES = {"data.train": SourceConfig, "data.eval": EvalSetConfig}


# --------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to `tp`, or raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key `{key}` must be a mapping of its sub-keys, got {value!r}.")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads `3e-4` as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, list):
            item_tp = LIST_ITEM_TYPES.get(key)
            if item_tp is not None:
                return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise UserError(
        f"config key `{key}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
        f"Fix the value in the YAML file or the --set override."
    )


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(
                f"unknown config key `{dotted}`{did_you_mean(str(key), names)}. "
                f"Valid keys here: {', '.join(names)}."
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    obj = cls(**kwargs)
    for dotted, allowed in CHOICES.items():
        head, _, leaf = dotted.rpartition(".")
        if head == prefix and leaf in names:
            got = getattr(obj, leaf)
            if got not in allowed:
                raise UserError(
                    f"config key `{dotted}` must be one of {', '.join(allowed)}; got {got!r}"
                    f"{did_you_mean(str(got), allowed)}."
                )
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=200` -> (['train', 'max_steps'], 200); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override `{text}` must look like key.sub=value, e.g. train.max_steps=200.")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise UserError(f"override `{text}`: value is not valid YAML ({exc}).") from None
    return key.strip().split("."), value


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """raw['a']['b'] = value for key 'a.b', creating mappings on the way."""
    node = raw
    path = key.split(".")
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set `{key}`: `{part}` is not a mapping.")
        node = child
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(raw, ".".join(path), value)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:  # the keys written here; a merge (`<<: *base`) may be overridden on purpose
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise UserError(f"line {key_node.start_mark.line + 1}: a key must be a name, got {key!r}.")
        if key in seen:
            raise UserError(f"`{key}` is given twice in the same mapping (lines {seen[key] + 1} and "
                            f"{key_node.start_mark.line + 1}); YAML would silently keep only the second. Merge them.")
        seen[key] = key_node.start_mark.line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> Any:
    """A YAML file as Python values (safe: no arbitrary objects), refusing duplicate keys."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): is it a YAML file?") from None
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def read_mapping(path: str | Path, what: str, shape: str = "keys") -> dict:
    """A YAML file that must exist and hold a mapping at the top level (configs, sweep files)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist. Pass the path to a YAML {what}.")
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict):
        raise UserError(f"{what} {p} must hold a mapping of {shape} at the top level.")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start empty), apply `--set` overrides, validate, return a RunConfig."""
    raw: dict = read_mapping(path, "run config") if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(RunConfig, raw, "")
    _resolve_installed_names(cfg)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, _copy(raw), "")
    _resolve_installed_names(cfg)
    validate(cfg)
    return cfg


def _resolve_installed_names(cfg: RunConfig) -> None:
    """An installed model's bare name (`model.path: smollm2-135m`) becomes its directory, on record in config.yaml."""
    from rewarm.model_store import resolve

    cfg.model.path = resolve(cfg.model.path, "model.path")
    cfg.tokenizer = resolve(cfg.tokenizer, "tokenizer")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ------------------------------------------------------------------------- validation

def last_step(t: "TrainConfig") -> int:
    """The step the run ends at: max_steps, or the first step reaching `stop_at_tokens`."""
    if not t.stop_at_tokens:
        return t.max_steps
    per_step = t.global_batch * t.seq_len
    return min(t.max_steps, -(-t.stop_at_tokens // per_step))


def warmup_steps(warmup: float, total_steps: int) -> int:
    """warmup < 1 is a fraction of total steps (rounded), otherwise a step count."""
    if warmup < 1:
        return int(round(warmup * total_steps))
    return int(warmup)


def check_batch(t: TrainConfig, world: int) -> None:
    """global_batch = micro_batch x grad_accum x world_size must come out whole."""
    if t.global_batch % (t.micro_batch * world):
        raise UserError(
            f"`train.global_batch` ({t.global_batch}) is not divisible by `train.micro_batch` "
            f"({t.micro_batch}) x world size ({world}). Pick a micro_batch that divides global_batch / world size."
        )


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need more than one key; each message says how to fix it."""
    t, s = cfg.train, cfg.schedule
    _check_ranges(cfg)
    if t.keep_sparsity and cfg.distributed.strategy == "fsdp":
        raise UserError("`train.keep_sparsity` re-applies masks to whole weight matrices; under FSDP each rank holds "
                        "shards. Use distributed.strategy: ddp.")
    bad = [p for p in cfg.eval.samples.prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"`eval.samples.prompts` must be a list of strings; got {bad[0]!r}. Quote prompts in YAML.")
    if not cfg.out_dir.strip():
        raise UserError("`out_dir` is empty (an unset shell variable?): name the run directory, e.g. runs/my-run. "
                        "rewarm never writes a run into the current directory by accident.")
    check_batch(t, world=1)
    if s.min_lr > s.max_lr and s.name != "constant":  # a constant schedule never reads min_lr
        raise UserError(
            f"`schedule.min_lr` ({s.min_lr}) is larger than `schedule.max_lr` ({s.max_lr}). "
            f"Set min_lr <= max_lr (the papers use min_lr = 0.1 x max_lr)."
        )
    if 0 < s.warmup < 1 and warmup_steps(s.warmup, t.max_steps) == 0:
        log.warning("`schedule.warmup` %g of %d steps rounds to 0 warmup steps: the run has no warmup. Give the "
                    "warmup in steps (a number >= 1) or train longer.", s.warmup, t.max_steps)
    if warmup_steps(s.warmup, t.max_steps) >= t.max_steps:
        raise UserError(
            f"`schedule.warmup` ({s.warmup}) covers all {t.max_steps} steps, leaving none at the schedule's own LR. "
            f"Use a fraction < 1 of the steps or a smaller step count."
        )
    if t.stop_at_tokens > t.max_steps * t.global_batch * t.seq_len:
        raise UserError(
            f"`train.stop_at_tokens` ({t.stop_at_tokens:,}) is more than the run's {t.max_steps * t.global_batch * t.seq_len:,} "
            f"tokens (max_steps x global_batch x seq_len), so it would never stop early. Lower it, or set 0.")
    if not cfg.data.train and cfg.init != "resume":
        raise UserError("`data.train` is empty: add at least one source, e.g. [{name: train, path: data/shards}].")
    names = [src.name for src in cfg.data.train]
    if len(set(names)) != len(names):
        raise UserError(f"`data.train` source names must be unique, got {names}.")
    for kind, items in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        for i, item in enumerate(items):
            if not item.path.strip():
                raise UserError(f"`data.{kind}[{i}].path` is empty: give the directory `rewarm prepare` wrote.")
    weights = [src.weight for src in cfg.data.train]
    if weights and sum(weights) <= 0:
        raise UserError(f"`data.train` weights must sum to > 0, got {weights}.")
    eval_names = [e.name for e in cfg.data.eval]
    if len(set(eval_names)) != len(eval_names) or any(not n for n in eval_names):
        raise UserError(f"`data.eval` sets need unique, non-empty names, got {eval_names}.")
    mixer = cfg.model.mixer
    if mixer is not None and not (isinstance(mixer, str) or (isinstance(mixer, list) and all(isinstance(m, str) for m in mixer))):
        raise UserError(f"`model.mixer` must be a mixer name, a pattern like deltanet/softmax@4, or a list of names "
                        f"(one per layer); got {mixer!r}.")
    if mixer is not None and cfg.init == "weights":
        raise UserError("`model.mixer` builds a new architecture for `init: scratch`; pretrained weights keep their "
                        "own attention. To turn a pretrained model's attention into a linear mixer, use `rewarm linearize`.")
    if cfg.init == "scratch" and not cfg.model.preset and not cfg.model.path:
        raise UserError("`init: scratch` needs `model.preset` (e.g. tiny) or `model.path` (an HF config to copy).")
    if cfg.init == "weights" and not cfg.model.path:
        raise UserError("`init: weights` needs `model.path`: an HF model dir, a rewarm checkpoint, or a hub id.")
    o = cfg.optimizer
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and b in Range(0, 1, hi_open=True)
                                    for b in o.betas):
        raise UserError(f"`optimizer.betas` must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {o.betas!r}.")
    bad_steps = [k for k in cfg.checkpoint.keep_steps if not isinstance(k, int) or isinstance(k, bool) or k < 0]
    if bad_steps:
        raise UserError(f"`checkpoint.keep_steps` must be a list of step numbers >= 0, got {cfg.checkpoint.keep_steps}.")
    if s.cooldown_fraction > s.constant_fraction:
        raise UserError(f"`schedule.cooldown_fraction` ({s.cooldown_fraction}) must not exceed `schedule.constant_fraction` "
                        f"({s.constant_fraction}): the infinite schedule cools down first, then holds, then anneals.")
    from rewarm import eval_hooks, loss_terms, optimizers

    optimizers.check(cfg)
    eval_hooks.check(cfg)
    loss_terms.check(cfg)
    ds = cfg.eval.downstream
    if any(not isinstance(t, str) or not t for t in ds.tasks):
        raise UserError(f"`eval.downstream.tasks` must be a list of task names, e.g. [hellaswag, arc_easy]; got {ds.tasks}.")


def config_reference() -> str:
    """Markdown table of every key, its default and meaning (kept in the README)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(type(default), key + ".")
                continue
            doc = f.metadata.get("doc", "").replace("|", "\\|")  # a bare | would split the Markdown cell
            rows.append(f"| `{key}` | `{default!r}` | {doc} |")

    walk(RunConfig, "")
    return "\n".join(rows)

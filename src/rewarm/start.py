"""Everything before the first step: start modes, data checks, model, optimizer, run dir.

The three start modes (README, "Start modes") differ only here:
- scratch: random weights from a preset/config;
- weights: load weights only; optimizer, schedule step and data position start at 0;
- resume:  weights, optimizer, step, RNG from this run's newest intact checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from rewarm import atomic, checkpoint, distributed, optimizers, sparsity
from rewarm.config import RunConfig, check_batch, config_from_dict, dump_yaml, read_yaml, to_dict
from rewarm.data.mixture import Mixture, Source
from rewarm.data.shards import TokenShards
from rewarm.distributed import Dist
from rewarm.errors import UserError
from rewarm.evaluate import EvalSet
from rewarm.model import build_config, check_vocab, count_params, init_scratch, load_pretrained
from rewarm.rundir import RunDir
from rewarm.schedules import build_schedule
from rewarm.state import TrainerState, capture_rng
from rewarm.tokenizer import fingerprint, load_tokenizer

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without changing its numbers.
RESUME_SAFE_KEYS = {"init", "train.log_interval", "train.stop_at_tokens", "train.device", "train.num_threads", "train.compile",
                    "checkpoint.interval", "checkpoint.keep_last", "distributed.strategy", "distributed.cpu_offload",
                    "eval.downstream.tasks", "eval.downstream.every", "eval.downstream.limit",
                    "eval.downstream.num_fewshot", "eval.downstream.batch", "eval.downstream.at_start",
                    "eval.samples.prompts", "eval.samples.max_new_tokens", "eval.samples.temperature",
                    "logging.tensorboard", "logging.wandb", "train.activation_checkpointing"}


@dataclass
class RunState:
    """What the loop works with; `state` holds the counters that checkpoints save."""

    cfg: RunConfig
    start_mode: str  # scratch | weights: how the run began (a resumed run keeps it)
    model: torch.nn.Module  # what the loop calls: wrapped for DDP/FSDP
    raw_model: torch.nn.Module  # the HF module (for save_pretrained, config)
    dist: Dist
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    mixture: Mixture
    eval_sets: list[EvalSet]
    schedule: Callable[[int], float]
    device: torch.device
    start_info: dict
    precision: str = "fp32"  # train.precision resolved (auto -> fp32 / bf16)
    state: TrainerState = field(default_factory=TrainerState)
    last_rollback_to: int | None = None  # each rollback must go further back than this
    peak_rss_train_mb: float | None = None  # the memory high-water mark of the steps alone (Linux)
    hook_state: dict = field(default_factory=dict)  # what eval hooks keep between evals (rewarm.eval_hooks)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch * self.cfg.train.seq_len

    def start_event(self) -> dict:
        from rewarm.memory import peak_memory_mb

        return {"event": "start", "step": self.state.step, **self.start_info, **peak_memory_mb(self.device)}

    def snapshot(self, optimizer_state: dict) -> TrainerState:
        """The live counters plus the optimizer and RNG states, as a checkpoint stores them."""
        return dataclasses.replace(self.state, tokens=self.state.step * self.tokens_per_step, world_size=self.dist.world,
                                   optimizer=optimizer_state, rng=capture_rng())


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: the CPUs where bf16 GEMMs beat fp32 (elsewhere they are ~100x slower)."""
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", read_cpuinfo()))


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (HF's per-layer checkpointing, non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"`train.activation_checkpointing`: {type(model).__name__} does not support per-layer "
                        "activation checkpointing in transformers; set it to false.")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless in training and HF warns about it with checkpointing


def resolve_precision(setting: str, device: torch.device) -> str:
    """`auto` -> bf16 where it is faster (CUDA with bf16, CPUs with bf16 units), else fp32."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("`train.device: cuda` but no CUDA device is visible. Use `auto` or `cpu`.")
    return torch.device(name)


def _check_downstream(cfg: RunConfig, d: Dist) -> None:
    """Unknown task names or missing task data fail now, not at the first evaluation hours in."""
    if d.active and cfg.distributed.strategy == "fsdp":
        raise UserError("`eval.downstream` runs on rank 0's full model, which FSDP shards: use distributed.strategy=ddp, "
                        "or run `rewarm downstream` on the saved checkpoints.")
    from rewarm.downstream.harness import require_lm_eval
    from rewarm.downstream.tasks import check_names

    require_lm_eval()
    check_names(cfg.eval.downstream.tasks)


def _check_drift(saved: dict, current: dict, allow: bool, device: torch.device) -> None:
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) and k != "overrides" else {key: v})
        return out

    a, b = flat(saved), flat(current)
    for k, v in flat(to_dict(RunConfig())).items():  # keys newer than the saved run: it had their defaults
        a.setdefault(k, v)
    for cfg in (a, b):  # `auto` and what it resolves to on this machine are the same run
        if cfg.get("train.precision") == "auto":
            cfg["train.precision"] = resolve_precision("auto", device)
    diff = [f"  {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUME_SAFE_KEYS]
    why = ""
    if a.get("optimizer.name") != b.get("optimizer.name"):
        why = ("\nChanging optimizer.name: the saved moments (exp_avg, exp_avg_sq) and per-parameter step count carry "
               "over as the new optimizer's; 1-bit Adam's error buffers start at zero and its variance freezes at "
               "its own freeze step.")
    if diff and not allow:
        raise UserError("resuming with a config that changes the run:\n" + "\n".join(diff) + why +
                        "\nResume with the run's own config.yaml, or pass --allow-config-change if this is intended.")
    if diff:
        log.warning("resuming with a changed config (allowed):\n%s", "\n".join(diff))


def check_unchanged(cfg: RunConfig, run: RunDir) -> None:
    """`--resume` of a finished run with a config that would change it: say that it cannot."""
    saved = read_yaml(run.config) if run.config.is_file() else None
    if isinstance(saved, dict):
        try:
            _check_drift(saved, to_dict(cfg), False, _resolve_device(cfg.train.device))
        except UserError as exc:
            raise UserError(f"{run.path} already finished; a finished run cannot be extended or changed by --resume. "
                            f"Start a new run from its weights instead (init: weights, model.path: {run.final}).\n"
                            f"{exc}") from None


def _smoke_forward(model: torch.nn.Module, device: torch.device) -> None:
    """Two tokens through the model, without touching the RNG or the train/eval mode: shapes that
    do not fit (e.g. heads that do not divide the width) fail now, not after files are written."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    model.train(was_training)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); never biases or norm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def start_run(cfg: RunConfig, run: RunDir, d: Dist, *, overwrite: bool = False, allow_config_change: bool = False) -> RunState:
    torch.manual_seed(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    device = _resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    check_batch(cfg.train, d.world)
    precision = resolve_precision(cfg.train.precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise UserError("`train.precision: fp16` needs a CUDA device (it uses a grad scaler); use bf16 or fp32 on CPU.")

    resume_from: Path | None = None
    resume_state = TrainerState()
    start_mode = cfg.init
    if cfg.init == "resume":
        saved = read_yaml(run.config) if run.config.is_file() else None
        if saved is not None and not isinstance(saved, dict):
            raise UserError(f"{run.config} is not a run config (not a mapping): this is not a run to resume.")
        if saved is not None:
            _check_drift(saved, to_dict(cfg), allow_config_change, device)
            start_mode = saved.get("init", start_mode)
        found = checkpoint.load_latest(run.checkpoints)
        if found is None and saved is None:
            raise UserError(
                f"`init: resume` but {run.path} holds no run to resume (no config.yaml, no intact checkpoint). "
                f"Start the run with `init: scratch` or `init: weights` instead."
            )
        if found is None:  # killed before its first checkpoint: the one way forward is to start it again
            log.warning("%s stopped before its first checkpoint: nothing to resume, starting it again from step 0 "
                        "(init: %s)", run.path, start_mode)
            cfg = dataclasses.replace(cfg, init=start_mode)
            overwrite = True
        else:
            resume_from, resume_state = found
            from rewarm.config import last_step

            if last_step(cfg.train) < resume_state.step:
                raise UserError(f"`train.stop_at_tokens` ({cfg.train.stop_at_tokens:,}) ends the run at step "
                                f"{last_step(cfg.train)}, but its newest checkpoint is already at step {resume_state.step}. "
                                "Raise it (or set 0 to run to max_steps).")
    if d.is_main:  # interrupted writes of dead processes (a live writer's temp names carry its pid)
        atomic.remove_stale_temps(run.path)
        atomic.remove_stale_temps(run.checkpoints, ".step_*.tmp-*")
    if not resume_from and run.has_started() and d.is_main:
        if not overwrite:
            raise UserError(
                f"run directory {run.path} already holds a run. Resume it with `--resume` (init: resume), "
                f"pick another `out_dir`, or pass --overwrite to start again from nothing."
            )
        if not run.is_run():
            raise UserError(f"--overwrite would delete checkpoints/, final/ and metrics in {run.path}, which is not a "
                            f"run directory rewarm made (no {run.marker.name}). Choose another `out_dir`.")
        for p in (run.metrics, run.summary):
            p.unlink(missing_ok=True)
        for p in (run.checkpoints, run.final):
            shutil.rmtree(p, ignore_errors=True)

    if cfg.init == "weights" and (Path(cfg.model.path) / checkpoint.MANIFEST).is_file():
        problem = checkpoint.verify(Path(cfg.model.path))  # a rewarm checkpoint: trust it only whole
        if problem:
            raise UserError(f"`model.path` {cfg.model.path} is a rewarm checkpoint that does not verify: {problem}. "
                            f"Start from another checkpoint of that run (or its final/).")
    if cfg.eval.downstream.tasks:
        _check_downstream(cfg, d)

    # ---- data first: cheap checks before any model is built
    sources = [Source(s.name, TokenShards(s.path), s.weight) for s in cfg.data.train]
    eval_shards = [(e.name, TokenShards(e.path)) for e in cfg.data.eval]

    # ---- tokenizer: explicit > model dir > the one the data was prepared with
    model_dir = str(resume_from) if resume_from else (cfg.model.path if cfg.init == "weights" else None)
    tok_src = cfg.tokenizer or model_dir or sources[0].shards.tokenizer_path
    tokenizer = load_tokenizer(tok_src, revision=cfg.model.revision if tok_src == cfg.model.path else None)
    tok_fp = fingerprint(tokenizer)

    # ---- model (a config that cannot build or run a forward fails here, before anything is written)
    try:
        if cfg.init == "scratch":
            hf_config = build_config(cfg.model.preset, cfg.model.path, cfg.model.overrides, len(tokenizer),
                                     cfg.model.vocab_size, tokenizer.eos_token_id, cfg.model.mixer, cfg.model.mixer_backend)
            model = init_scratch(hf_config, cfg.seed)
            origin = f"preset {cfg.model.preset}" if cfg.model.preset else f"config of {cfg.model.path}"
        else:
            path = str(resume_from) if resume_from else cfg.model.path
            revision = None if resume_from else cfg.model.revision
            model = load_pretrained(path, revision, cfg.model.overrides, cfg.model.trust_remote_code)
            check_vocab(model.config.vocab_size, len(tokenizer))
            origin = path + (f"@{revision}" if revision else "")
        model.to(device)
        _smoke_forward(model, device)
        if hasattr(model, "apply_run_settings"):  # seam: an MoE reads `moe:`, a RETRO model `retrieval:`/`retrofit:`
            model.apply_run_settings(cfg)
        if cfg.retrieval.db and not getattr(model, "accepts_retrieval", False):
            raise UserError(f"`retrieval.db` is set but {type(model).__name__} cannot read neighbours. Turn the model "
                            f"into a RETRO model first: `rewarm retrofit {cfg.model.path or 'BASE'} -o DIR`, then "
                            f"`model.path: DIR`.")
        if cfg.train.activation_checkpointing:
            _enable_activation_checkpointing(model)
    except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
        raise UserError(f"the model does not build or run with this config ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}). Check `model.overrides` "
                        f"({cfg.model.overrides or 'none'}) and `model.vocab_size`.") from None
    raw_model = model
    vocab = model.config.vocab_size
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.train.seq_len > max_pos:
        raise UserError(f"`train.seq_len` ({cfg.train.seq_len}) exceeds the model's max positions ({max_pos}). Lower seq_len.")
    for s in sources:
        s.shards.check_compatible(tok_fp, vocab, s.name)
    for name, shards in eval_shards:
        shards.check_compatible(tok_fp, vocab, name)

    mixture = Mixture(sources, cfg.train.seq_len, cfg.train.global_batch, cfg.seed)
    eval_sets = [EvalSet.from_shards(name, sh, cfg.train.seq_len, cfg.eval.tokens) for name, sh in eval_shards]
    d.barrier()  # rank 0 has cleaned an --overwrite'd run directory
    model = distributed.wrap(model, d, cfg.distributed.strategy, device, cfg.distributed.cpu_offload)
    opt = optimizers.build(model, _param_groups(model, cfg.optimizer.weight_decay), cfg, d)
    kept = sparsity.keep(raw_model, opt) if cfg.train.keep_sparsity else None  # refused here when nothing is pruned

    state = TrainerState()
    optimizer_from = "fresh"
    if resume_from:
        checkpoint.restore(resume_from, resume_state, model, opt, d, weights=False)  # the model was built from it
        state = dataclasses.replace(resume_state, optimizer={}, rng={})  # live counters; snapshots are taken at save
        if d.is_main:
            run.truncate_metrics_after(state.step)
        optimizer_from = str(resume_from)
        log.info("resuming %s from step %d (%s)", run.path, state.step, resume_from)
    elif cfg.init == "weights" and cfg.optimizer.state == "from_checkpoint":
        state_file = Path(cfg.model.path) / checkpoint.TRAINER_STATE
        if not state_file.is_file():
            raise UserError(f"`optimizer.state: from_checkpoint` but {state_file} does not exist: only rewarm "
                            f"checkpoints (checkpoints/step_N) carry optimizer state. Use `optimizer.state: fresh`.")
        distributed.load_optimizer_state(model, opt, checkpoint.load_trainer_state(Path(cfg.model.path)).optimizer, d)
        optimizer_from = cfg.model.path
    if cfg.init == "weights":
        log.warning(
            "continual pre-training from %s: weights only; optimizer %s, LR schedule from step 0, data from position 0",
            origin, "moments from the checkpoint" if optimizer_from != "fresh" else "fresh",
        )

    if not resume_from and d.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        config_text = dump_yaml(cfg)
        config_from_dict(yaml.safe_load(config_text))  # the saved file must load back as it is
        atomic.write_text(run.config, config_text)
        atomic.write_text(run.marker, "a rewarm run directory: --overwrite may delete what rewarm wrote here\n")

    n_params = count_params(raw_model)
    start_info = {
        "init": cfg.init, "model_from": origin, "optimizer_from": optimizer_from,
        "params": n_params, "params_non_embedding": count_params(raw_model, exclude_embeddings=True),
        "vocab_size": vocab, "tokenizer_fingerprint": tok_fp, "device": str(device),
        "tokens_per_step": cfg.train.global_batch * cfg.train.seq_len,
        "total_tokens": cfg.train.max_steps * cfg.train.global_batch * cfg.train.seq_len,
        "source_shares": {s.name: float(w) for s, w in zip(sources, mixture.shares)},
        "eval_tokens": {e.name: e.tokens for e in eval_sets},
        "eval_windows": {e.name: e.coverage for e in eval_sets},
        "world_size": d.world, "strategy": cfg.distributed.strategy if d.active else "single",
        "precision": precision,
        **({"keep_sparsity": kept} if kept else {}),
    }
    log.info("%s: %s params, %d steps x %d tokens, lr %s from step %d", run.path, f"{n_params:,}",
             cfg.train.max_steps, start_info["tokens_per_step"], cfg.schedule.name, state.step)
    d.barrier()
    return RunState(cfg=cfg, start_mode=start_mode, model=model, raw_model=raw_model, dist=d, optimizer=opt, tokenizer=tokenizer, mixture=mixture,
                    eval_sets=eval_sets, schedule=build_schedule(cfg.schedule, cfg.train.max_steps),
                    device=device, start_info=start_info, precision=precision, state=state)

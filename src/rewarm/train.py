"""The training loop: one screen, top to bottom, like nanoGPT's train.py.

Everything it calls is its own component: `setup` (start modes, data, model),
`schedules` (lr as a function of the step), `data.mixture` (which windows), `evaluate`
(held-out loss) and `checkpoint` (atomic save / verified load).
"""
from __future__ import annotations

import logging
import math
import signal
import time

import torch
from tqdm import tqdm

from rewarm import checkpoint, distributed
from rewarm.config import RunConfig
from rewarm.evaluate import autocast, evaluate, lm_loss
from rewarm.fused_loss import head_and_backbone
from rewarm.rundir import MetricsWriter, RunDir
from rewarm.schedules import warmup_steps
from rewarm.setup import RunState, prepare_run

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 143  # 128 + SIGTERM: "stopped on request; resume with init: resume"


DIVERGED_EXIT = 3


class Diverged(Exception):
    """Too many non-finite steps in a row (and no rollback left to try)."""

    exit_code = DIVERGED_EXIT


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint was written; resume continues from it."""

    exit_code = PREEMPTED_EXIT


def train(cfg: RunConfig, *, overwrite: bool = False, allow_config_change: bool = False, progress: bool = True) -> RunDir:
    """Run (or resume) the job described by `cfg`; returns its run directory.
    Under torchrun every rank calls this; only rank 0 writes to the run directory."""
    run = RunDir(cfg.out_dir)
    d = distributed.setup(_device_kind(cfg.train.device))
    if d.is_main:
        run.acquire_lock()
    try:
        with _StopOnSignal() as stop:
            state = prepare_run(cfg, run, d, overwrite=overwrite, allow_config_change=allow_config_change)
            _loop(cfg, run, state, stop, progress and d.is_main)
    finally:
        if d.is_main:
            run.release_lock()
        distributed.teardown()
    return run


def _device_kind(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def _loop(cfg: RunConfig, run: RunDir, st: RunState, stop: "_StopOnSignal", progress: bool) -> None:
    t, model, opt, d = cfg.train, st.model, st.optimizer, st.dist
    accum = t.global_batch // (t.micro_batch * d.world)
    tokens_per_step = t.global_batch * t.seq_len
    dense_end = warmup_steps(cfg.eval.dense_until or cfg.schedule.warmup, t.max_steps)
    metrics = MetricsWriter(run.metrics, enabled=d.is_main)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda") if st.precision == "fp16" else None
    forward, backbone = model, None
    if t.compile:
        parts = head_and_backbone(model)
        if parts is not None:  # compile the body; the fused head + loss stays outside the graph
            backbone = torch.compile(parts[0])
        else:
            forward = torch.compile(model)
    step = st.step
    bad_in_row = 0

    def due(every: int) -> bool:
        return every > 0 and step % every == 0

    def run_eval() -> None:
        # DDP: each rank scores its share of windows on the plain module; FSDP: all ranks score all
        sharded = d.active and d.strategy == "ddp"
        results = evaluate(distributed.unwrap(model) if sharded else model, st.eval_sets, cfg.eval.batch, st.device,
                           st.precision, rank=d.rank if sharded else 0, world=d.world if sharded else 1,
                           reduce=(lambda xs: d.sum(xs, st.device)) if sharded else None)
        metrics.write({"event": "eval", "step": step, "tokens": step * tokens_per_step, "sets": results})
        if d.is_main:
            line = "  ".join(f"{name} {r['loss']:.4f} (ppl {r['ppl']:.1f})" for name, r in results.items())
            tqdm.write(f"eval @ step {step:>6} | {line}")

    def run_downstream() -> None:
        ds = cfg.eval.downstream
        if d.is_main:  # rank 0 scores the plain (unwrapped, uncompiled) module; the others wait
            from rewarm.downstream.harness import run_tasks
            from rewarm.downstream.record import event

            settings = {"limit": ds.limit or None, "num_fewshot": ds.num_fewshot, "batch": ds.batch, "max_length": None}
            results = run_tasks(st.raw_model, st.tokenizer, ds.tasks, limit=ds.limit or None,
                                num_fewshot=ds.num_fewshot, batch_size=ds.batch)
            metrics.write(event(step, step * tokens_per_step, results, settings, "training"))
            line = "  ".join(f"{name} acc {r['acc']:.3f} p_choices(gold) {r['p_choices_gold']:.3f}"
                             for name, r in results.items() if r.get("p_choices_gold") is not None and "acc" in r)
            tqdm.write(f"downstream @ step {step:>6} | {line}")
        d.barrier()

    def save_checkpoint() -> None:
        model_sd, optim_sd = distributed.full_state(model, opt, d)  # a collective under FSDP
        if d.is_main:
            trainer_state = {
                "step": step,
                "tokens": step * tokens_per_step,
                "optimizer": optim_sd,
                "torch_rng": torch.get_rng_state(),
                "bad_steps": st.bad_steps,
                "lr_scale": st.lr_scale,
                "world_size": d.world,
            }
            checkpoint.save(run.checkpoints, step, st.raw_model, st.tokenizer, trainer_state, state_dict=model_sd)
            checkpoint.prune(run.checkpoints, cfg.checkpoint.keep_last, set(cfg.checkpoint.keep_steps))
        d.barrier()

    metrics.write(st.start_event())
    if step == 0 and st.eval_sets:
        run_eval()  # the baseline that forgetting and adaptation are measured from
    if step == 0 and cfg.eval.downstream.tasks:
        run_downstream()
    bar = tqdm(total=t.max_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    model.train()
    clock = time.perf_counter()
    while step < t.max_steps:
        lr = st.schedule(step) * st.lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        windows, _ = st.mixture.batch(step, d.rank, d.world)
        micro_batches = torch.from_numpy(windows).split(t.micro_batch)
        loss_sum = 0.0
        for i, micro in enumerate(micro_batches):
            with distributed.set_grad_sync(model, d, sync=i == len(micro_batches) - 1):
                with autocast(st.device, st.precision):
                    loss = lm_loss(forward, micro.to(st.device, non_blocking=True), backbone=backbone) / accum
                (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.item()
        loss_sum = d.mean(loss_sum, st.device)  # every rank sees (and agrees on) the global loss
        if scaler:
            scaler.unscale_(opt)
        clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            bad_in_row = 0
        else:
            st.bad_steps += 1
            bad_in_row += 1
            log.warning("step %d: non-finite loss/grad norm (%s / %s); update skipped", step + 1, loss_sum, grad_norm)
        opt.zero_grad(set_to_none=True)
        step += 1
        if bad_in_row > t.max_bad_steps:
            step = _on_divergence(cfg, run, st, metrics, step, bad_in_row)
            bad_in_row = 0
            clock = time.perf_counter()
            continue

        if due(t.log_interval) or step == t.max_steps:
            now = time.perf_counter()
            tok_s = tokens_per_step * (step - st.last_logged_step) / max(now - clock, 1e-9)
            clock, st.last_logged_step = now, step
            metrics.write({
                "event": "train", "step": step, "tokens": step * tokens_per_step, "lr": lr,
                "loss": loss_sum, "grad_norm": grad_norm, "tokens_per_s": round(tok_s, 1),
                "source_tokens": st.mixture.tokens_per_source(step * t.global_batch),
            })
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        eval_every = cfg.eval.interval_warmup if (cfg.eval.interval_warmup and step <= dense_end) else cfg.eval.interval
        if st.eval_sets and (due(eval_every) or step == t.max_steps):
            run_eval()
        if cfg.eval.downstream.tasks and (due(cfg.eval.downstream.every) or step == t.max_steps):
            run_downstream()
        saved = bad_in_row == 0 and (due(cfg.checkpoint.interval) or step in cfg.checkpoint.keep_steps or step == t.max_steps)
        if saved:
            save_checkpoint()  # never during a run of non-finite steps: rollback must find good weights
        if step % t.log_interval == 0:
            clock = time.perf_counter()  # throughput counts training steps only, not eval or saving
        requested = d.any(stop.requested is not None, st.device)  # all ranks stop together
        if requested and step < t.max_steps:
            if not saved:
                save_checkpoint()
            bar.close()
            signame = stop.requested or "a signal on another rank"
            metrics.write({"event": "preempted", "step": step, "signal": signame})
            metrics.close()
            raise Preempted(
                f"stopped by {signame} after step {step}; checkpoint saved. "
                f"Resume with: rewarm train {run.config} --resume"
            )
    bar.close()
    st.finish(run, metrics)
    metrics.close()


def _on_divergence(cfg: RunConfig, run: RunDir, st: RunState, metrics: MetricsWriter, step: int, bad: int) -> int:
    """Stop with a clear message, or roll back to the newest checkpoint with a lower LR."""
    # each rollback goes strictly further back than the previous one
    before = min(step, st.last_rollback_to) if st.last_rollback_to is not None else step
    found = checkpoint.load_latest(run.checkpoints, before=before) if cfg.train.on_divergence == "rollback" else None
    if found is None:
        metrics.write({"event": "diverged", "step": step, "bad_in_row": bad})
        metrics.close()
        how = ("no checkpoint to roll back to" if cfg.train.on_divergence == "rollback"
               else "set train.on_divergence=rollback to retry from the last checkpoint with a lower LR")
        raise Diverged(
            f"training diverged: {bad} non-finite steps in a row at step {step} ({st.bad_steps} in total); {how}. "
            f"Lower schedule.max_lr or lengthen the warmup, then start again (or --resume from an earlier checkpoint)."
        )
    from rewarm.model import load_pretrained

    path, state = found
    if st.dist.active and st.dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(st.model, load_pretrained(str(path)).state_dict(), options=StateDictOptions(full_state_dict=True))
    else:
        st.raw_model.load_state_dict(load_pretrained(str(path)).state_dict())
    distributed.load_optimizer_state(st.model, st.optimizer, state["optimizer"], st.dist)
    st.lr_scale *= cfg.train.rollback_lr_factor
    back_to = int(state["step"])
    st.last_rollback_to = back_to
    if st.dist.is_main:
        run.truncate_metrics_after(back_to)
        metrics.reopen()
    metrics.write({"event": "rollback", "step": back_to, "from_step": step, "lr_scale": st.lr_scale})
    log.warning("diverged at step %d: rolled back to %s, LR scaled by %g", step, path, st.lr_scale)
    return back_to


class _StopOnSignal:
    """SIGTERM / SIGINT ask the loop to stop after the current step; a second SIGINT exits at once."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        log.warning("%s received: finishing this step, writing a checkpoint, then exiting (Ctrl-C again to abort)", name)

    def __enter__(self) -> "_StopOnSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

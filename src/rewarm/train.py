"""The training loop: one screen, top to bottom, like nanoGPT's train.py.

`_loop` decides *when* (log, eval, checkpoint, stop); `train_step` is one optimizer step.
Everything else is its own component: `start` (start modes, data, model, optimizer),
`schedules` (LR as a function of the step), `data.mixture` (which windows), `evaluate`
(held-out loss), `checkpoint` (atomic save, verified load, restore) and `state` (what a
checkpoint carries besides the weights).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from rewarm import atomic, checkpoint, distributed, eval_hooks, loss_terms, memory
from rewarm.config import RunConfig, last_step, warmup_steps
from rewarm.errors import DiskFull, Diverged, Preempted
from rewarm.evaluate import evaluate
from rewarm.fused_loss import autocast, head_and_backbone, lm_loss
from rewarm.model import save_model
from rewarm.rundir import MetricsWriter, RunDir
from rewarm.start import RunState, check_unchanged, start_run

log = logging.getLogger(__name__)


def train(cfg: RunConfig, *, overwrite: bool = False, allow_config_change: bool = False, progress: bool = True) -> RunDir:
    """Run (or resume) the job described by `cfg`; returns its run directory.
    Under torchrun every rank calls this; only rank 0 writes to the run directory."""
    run = RunDir(cfg.out_dir)
    if cfg.init == "resume" and run.is_finished():
        check_unchanged(cfg, run)  # a finished run is not extended by --resume --set train.max_steps=...
        log.warning("%s already finished (summary.json is there): nothing to resume, nothing changed", run.path)
        return run
    d = distributed.setup(_device_kind(cfg.train.device))
    created = not run.path.exists()
    if d.is_main:
        run.acquire_lock()
    threads = torch.get_num_threads()
    st = None
    try:
        with _StopOnSignal() as stop:
            st = start_run(cfg, run, d, overwrite=overwrite, allow_config_change=allow_config_change)
            from rewarm.live_view import sinks_for

            metrics = MetricsWriter(run.metrics, enabled=d.is_main, sinks=sinks_for(st.cfg, run.path) if d.is_main else [])
            try:
                _loop(st.cfg, run, st, metrics, stop, progress and d.is_main)
                _finish(run, st, metrics)
            except DiskFull as exc:  # the way on is a resume, whichever file was being written
                raise DiskFull(f"{exc} Resume with: rewarm train {run.config} --resume") from None
            finally:
                metrics.close()
    finally:
        torch.set_num_threads(threads)  # train.num_threads holds for this run only
        if d.is_main:
            run.release_lock()
            if created and run.path.is_dir() and not any(run.path.iterdir()):
                run.path.rmdir()  # refused before anything was written: leave no empty run directory behind
        # the DDP wrapper's gloo Reducer must die before its process group: destroying the group
        # first has hung a rank at exit (seen with the mixer models)
        st = None
        gc.collect()
        distributed.teardown()
    return run


def _device_kind(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu"


def _loop(cfg: RunConfig, run: RunDir, st: RunState, metrics: MetricsWriter, stop: "_StopOnSignal", progress: bool) -> None:
    t, d, ts = cfg.train, st.dist, st.state
    step_fn = _StepFunctions.build(st)
    speed = _Throughput(st.tokens_per_step)
    dense_end = warmup_steps(cfg.eval.dense_until or cfg.schedule.warmup, t.max_steps)
    bad_in_row = 0

    metrics.write(st.start_event())
    measuring_training_memory = memory.reset_rss_peak()  # from here on, the high-water mark is training's
    if ts.step == 0 and st.eval_sets:
        _run_eval(st, metrics)  # the baseline that forgetting and adaptation are measured from
    if ts.step == 0 and cfg.eval.downstream.tasks and cfg.eval.downstream.at_start:
        _run_downstream(st, metrics)
    stop_step = last_step(t)  # max_steps, or earlier with train.stop_at_tokens (the schedule still spans max_steps)
    bar = tqdm(total=stop_step, initial=ts.step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    st.model.train()
    while ts.step < stop_step:
        with speed.measure():
            result = train_step(st, step_fn)
        bad_in_row = 0 if result.finite else bad_in_row + 1
        if bad_in_row > t.max_bad_steps:
            _on_divergence(cfg, run, st, metrics, bad_in_row)
            bad_in_row = 0
            bar.n = ts.step
            continue
        step, end = ts.step, ts.step == stop_step

        if _due(step, t.log_interval) or end:
            tok_s = speed.rate()
            metrics.write({
                "event": "train", "step": step, "tokens": step * st.tokens_per_step, "lr": result.lr,
                "loss": result.loss, "grad_norm": result.grad_norm, "tokens_per_s": round(tok_s, 1),
                "source_tokens": st.mixture.tokens_per_source(step * t.global_batch),
                **({"aux_loss": result.aux_loss} if result.aux_loss is not None else {}),
                **(st.optimizer.step_metrics() if hasattr(st.optimizer, "step_metrics") else {}),
                **(st.raw_model.step_metrics() if hasattr(st.raw_model, "step_metrics") else {}),
                **result.terms,
            })
            bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", tok_s=f"{tok_s:,.0f}")
        bar.update(1)
        eval_every = cfg.eval.interval_warmup if (cfg.eval.interval_warmup and step <= dense_end) else cfg.eval.interval
        if st.eval_sets and (_due(step, eval_every) or end):
            if _act_on_alarms(cfg, run, st, metrics, _run_eval(st, metrics), bar):
                continue  # rolled back: this step's weights are gone, so nothing below applies
        if cfg.eval.downstream.tasks and (_due(step, cfg.eval.downstream.every) or end):
            _run_downstream(st, metrics)
        # never during a run of non-finite steps: rollback must find good weights
        saved = bad_in_row == 0 and (_due(step, cfg.checkpoint.interval) or step in cfg.checkpoint.keep_steps or end)
        if saved:
            _save_checkpoint(run, st)
        if d.any(stop.requested is not None, st.device) and not end:  # all ranks stop together
            if not saved and bad_in_row == 0:  # inside a non-finite streak the last good checkpoint stands
                _save_checkpoint(run, st)
            bar.close()
            signame = stop.requested or "a signal on another rank"
            metrics.write({"event": "preempted", "step": step, "signal": signame})
            raise Preempted(f"stopped by {signame} after step {step}; checkpoint saved. "
                            f"Resume with: rewarm train {run.config} --resume")
    bar.close()
    if measuring_training_memory:  # steps, evals and checkpoints; not loading the model, not final/
        st.peak_rss_train_mb = memory.rss_peak_since_reset_mb()


@dataclass
class StepResult:
    loss: float  # mean over the global batch (all ranks)
    grad_norm: float  # before clipping
    lr: float
    finite: bool  # False: the update was skipped
    aux_loss: float | None = None  # auxiliary losses the model returned (e.g. load balancing), already weighted
    terms: dict = field(default_factory=dict)  # what the loss terms reported (rewarm.loss_terms), this rank's


@dataclass
class _StepFunctions:
    """What a step calls, decided once: the forward (maybe compiled), the grad scaler, the parameters."""

    forward: torch.nn.Module
    backbone: torch.nn.Module | None  # a compiled body for the fused head + loss, or None
    scaler: Any
    params: list[torch.nn.Parameter]
    accum: int  # micro-steps per optimizer step on this rank

    @classmethod
    def build(cls, st: RunState) -> "_StepFunctions":
        t, model = st.cfg.train, st.model
        forward, backbone = model, None
        if t.compile:
            parts = head_and_backbone(model)
            if parts is not None:  # compile the body; the fused head + loss stays outside the graph
                backbone = torch.compile(parts[0])
            else:
                forward = torch.compile(model)
        scaler = torch.amp.GradScaler("cuda") if st.precision == "fp16" else None
        return cls(forward, backbone, scaler, [p for p in model.parameters() if p.requires_grad],
                   t.global_batch // (t.micro_batch * st.dist.world))


def train_step(st: RunState, fns: _StepFunctions) -> StepResult:
    """One optimizer step at `st.state.step`: set the LR, run the micro-batches (gradients are
    synchronised on the last one only), average the loss over ranks, clip, update — or skip the
    update when the loss or the gradient norm is not finite. Advances the step either way."""
    cfg, d, opt, ts = st.cfg, st.dist, st.optimizer, st.state
    lr = st.schedule(ts.step) * ts.lr_scale
    for group in opt.param_groups:
        group["lr"] = lr
        group["run_step"] = ts.step  # the seam for step-aware optimizers (rewarm.optimizers)
    windows, sources = st.mixture.batch(ts.step, d.rank, d.world)
    extra: dict = {}
    for term in loss_terms.active(cfg):  # their own forward/backward, gradients kept local (rewarm.loss_terms)
        extra.update(term.backward(st, windows, sources) or {})
    micro_batches = torch.from_numpy(windows).split(cfg.train.micro_batch)
    loss_t = torch.zeros((), dtype=torch.float64, device=st.device)  # summed on the device: no sync per micro-batch
    aux_t = None
    for i, micro in enumerate(micro_batches):
        with distributed.set_grad_sync(st.model, d, sync=i == len(micro_batches) - 1):
            with autocast(st.device, st.precision):
                loss, aux = lm_loss(fns.forward, micro.to(st.device, non_blocking=True), backbone=fns.backbone,
                                    with_aux=True)
                loss = loss / fns.accum
                total = loss if aux is None else loss + aux / fns.accum  # the model's own auxiliary losses (seam)
            (fns.scaler.scale(total) if fns.scaler else total).backward()
        loss_t += loss.detach().double()
        if aux is not None:
            aux_t = (aux.detach().double() / fns.accum) + (aux_t if aux_t is not None else 0.0)
    if fns.scaler:
        fns.scaler.unscale_(opt)
    clip = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(fns.params, clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # one device->host copy per step for all numbers (each .item() stalls a GPU until its queue drains)
    host = torch.stack([loss_t, norm.detach().double(), aux_t if aux_t is not None else loss_t]).tolist()
    loss_sum, grad_norm = host[0], host[1]
    aux_mean = d.mean(host[2], st.device) if aux_t is not None else None
    # every rank sees the global loss and agrees on skipping: the gradient norm is each rank's own
    # when an optimizer exchanges gradients itself (1-bit Adam), so its finiteness is voted on too
    loss_sum, bad_norm = d.sum([loss_sum, 0.0 if math.isfinite(grad_norm) else 1.0], st.device)
    loss_sum /= d.world
    finite = math.isfinite(loss_sum) and bad_norm == 0
    if finite and fns.scaler:
        fns.scaler.step(opt)
        fns.scaler.update()
    elif finite:
        opt.step()
    else:
        ts.bad_steps += 1
        log.warning("step %d: non-finite loss/grad norm (%s / %s); update skipped", ts.step + 1, loss_sum, grad_norm)
    opt.zero_grad(set_to_none=True)
    ts.step += 1
    ts.tokens = ts.step * st.tokens_per_step
    return StepResult(loss_sum, grad_norm, lr, finite, aux_mean, extra)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class _Throughput:
    """Training tokens per second over the steps since the last `rate()`: only the time spent
    inside `train_step` counts, not evaluation, checkpoints or logging."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.steps, self.seconds = tokens_per_step, 0, 0.0

    @contextlib.contextmanager
    def measure(self):
        start = time.perf_counter()
        yield
        self.steps += 1
        self.seconds += time.perf_counter() - start

    def rate(self) -> float:
        tok_s = self.tokens_per_step * self.steps / max(self.seconds, 1e-9)
        self.steps, self.seconds = 0, 0.0
        return tok_s


def _run_eval(st: RunState, metrics: MetricsWriter) -> list[tuple[str, str]]:
    """Held-out losses, text samples, then the eval hooks; returns the hooks' alarms (name, action)."""
    # DDP: each rank scores its share of windows on the plain module; FSDP: all ranks score all
    d = st.dist
    sharded = d.active and d.strategy == "ddp"
    results = evaluate(distributed.unwrap(st.model) if sharded else st.model, st.eval_sets, st.cfg.eval.batch, st.device,
                       st.precision, rank=d.rank if sharded else 0, world=d.world if sharded else 1,
                       reduce=(lambda xs: d.sum(xs, st.device)) if sharded else None)
    step = st.state.step
    metrics.write({"event": "eval", "step": step, "tokens": step * st.tokens_per_step, "sets": results})
    if d.is_main:
        line = "  ".join(f"{name} {r['loss']:.4f} (ppl {r['ppl']:.1f})" for name, r in results.items())
        tqdm.write(f"eval @ step {step:>6} | {line}")
    if st.cfg.eval.samples.prompts:
        _write_samples(st, metrics)
    return eval_hooks.run_all(st, metrics)


def _write_samples(st: RunState, metrics: MetricsWriter) -> None:
    """Continuations of the configured prompts (greedy unless a temperature is set), into metrics.jsonl.
    FSDP: every rank runs the same generation (its forwards are collective); otherwise rank 0 alone."""
    from rewarm.fused_loss import autocast
    from rewarm.generate import continue_prompts

    d, sm = st.dist, st.cfg.eval.samples
    sharded = d.active and d.strategy == "fsdp"
    if not (sharded or d.is_main):
        return
    with autocast(st.device, st.precision):
        texts = continue_prompts(st.model if sharded else st.raw_model, st.tokenizer, list(sm.prompts),
                                 sm.max_new_tokens, sm.temperature, seed=st.cfg.seed, device=st.device)
    step = st.state.step
    metrics.write({"event": "samples", "step": step, "tokens": step * st.tokens_per_step,
                   "samples": [{"prompt": p, "text": t} for p, t in zip(sm.prompts, texts)]})


def _run_downstream(st: RunState, metrics: MetricsWriter) -> None:
    ds, step = st.cfg.eval.downstream, st.state.step
    if st.dist.is_main:  # rank 0 scores the plain (unwrapped, uncompiled) module; the others wait
        from rewarm.downstream.harness import run_tasks
        from rewarm.downstream.record import event

        settings = {"limit": ds.limit or None, "num_fewshot": ds.num_fewshot, "batch": ds.batch, "max_length": None}
        results = run_tasks(st.raw_model, st.tokenizer, ds.tasks, limit=ds.limit or None,
                            num_fewshot=ds.num_fewshot, batch_size=ds.batch)
        metrics.write(event(step, step * st.tokens_per_step, results, settings, "training"))
        line = "  ".join(f"{name} acc {r['acc']:.3f} p_choices(gold) {r['p_choices_gold']:.3f}"
                         for name, r in results.items() if r.get("p_choices_gold") is not None and "acc" in r)
        tqdm.write(f"downstream @ step {step:>6} | {line}")
    st.dist.barrier()


def _save_checkpoint(run: RunDir, st: RunState) -> None:
    model_sd, optim_sd = distributed.full_state(st.model, st.optimizer, st.dist)  # a collective under FSDP
    if st.dist.is_main:
        checkpoint.save(run.checkpoints, st.raw_model, st.tokenizer, st.snapshot(optim_sd), state_dict=model_sd)
        checkpoint.prune(run.checkpoints, st.cfg.checkpoint.keep_last, set(st.cfg.checkpoint.keep_steps))
    st.dist.barrier()


def _act_on_alarms(cfg: RunConfig, run: RunDir, st: RunState, metrics: MetricsWriter,
                   alarms: list[tuple[str, str]], bar: tqdm) -> bool:
    """An eval hook's alarm (rewarm.eval_hooks): `stop` ends the run like a divergence (exit 3) without
    saving this step; `rollback` is the divergence rollback. True when the run rolled back."""
    if not alarms:
        return False
    name, action = alarms[0]
    step = st.state.step
    why = f"the {name} alarm (eval.{name}) at step {step}"
    if action == "stop":
        bar.close()
        metrics.write({"event": "diverged", "step": step, "reason": why})
        raise Diverged(f"stopped by {why}: see the `{name}` event in metrics.jsonl. The weights of this "
                       f"step were not saved; --resume restarts from the last checkpoint.")
    _on_divergence(cfg, run, st, metrics, 0, why=why)
    bar.n = st.state.step
    return True


def _on_divergence(cfg: RunConfig, run: RunDir, st: RunState, metrics: MetricsWriter, bad: int,
                   why: str | None = None) -> None:
    """Stop with a clear message, or roll back to an older checkpoint with a lower LR. `why`: an eval
    hook's alarm (which asked for the rollback) instead of a streak of non-finite steps."""
    step = st.state.step
    # each rollback goes strictly further back than the previous one
    before = min(step, st.last_rollback_to) if st.last_rollback_to is not None else step
    rollback = why is not None or cfg.train.on_divergence == "rollback"
    found = checkpoint.load_latest(run.checkpoints, before=before) if rollback else None
    if found is None and why is not None:
        metrics.write({"event": "diverged", "step": step, "reason": why})
        raise Diverged(f"{why} asked for a rollback, but there is no checkpoint before step {before} to roll back to "
                       f"(each rollback goes further back than the last). Save checkpoints more often "
                       f"(checkpoint.interval), raise eval.collapse.factor, or use eval.collapse.action: stop.")
    if found is None:
        metrics.write({"event": "diverged", "step": step, "bad_in_row": bad})
        how = ("no checkpoint to roll back to" if cfg.train.on_divergence == "rollback"
               else "set train.on_divergence=rollback to retry from the last checkpoint with a lower LR")
        raise Diverged(
            f"training diverged: {bad} non-finite steps in a row at step {step} ({st.state.bad_steps} in total); {how}. "
            f"Lower schedule.max_lr or lengthen the warmup, then start again (or --resume from an earlier checkpoint)."
        )
    path, saved = found
    checkpoint.restore(path, saved, st.model, st.optimizer, st.dist)
    st.state.step = st.last_rollback_to = saved.step
    st.state.lr_scale *= cfg.train.rollback_lr_factor
    if st.dist.is_main:
        run.truncate_metrics_after(saved.step)
        metrics.reopen()
    # the alarm's own event lay after the saved step and was truncated with the rest: keep why here
    metrics.write({"event": "rollback", "step": saved.step, "from_step": step, "lr_scale": st.state.lr_scale,
                   "reason": why or f"{bad} non-finite steps in a row"})
    log.warning("%s: rolled back to %s, LR scaled by %g", why or f"diverged at step {step}", path, st.state.lr_scale)


def _finish(run: RunDir, st: RunState, metrics: MetricsWriter) -> None:
    """Write final/ (HF model + tokenizer), then summary.json, both atomically (rank 0)."""
    model_sd, _ = distributed.full_state(st.model, st.optimizer, st.dist)  # a collective under FSDP
    if not st.dist.is_main:
        return
    t = st.cfg.train
    save_model(st.raw_model, run.final, st.tokenizer, state_dict=model_sd)
    evals = [(e["step"], e["sets"]) for e in run.read_metrics() if e.get("event") == "eval"]
    steps = last_step(t)
    summary: dict[str, Any] = {
        "status": "completed", "steps": steps, "schedule_steps": t.max_steps, "tokens": steps * st.tokens_per_step, "init": st.start_mode,
        "final": {}, "initial": {}, "best": {}, "bad_steps": st.state.bad_steps, "final_dir": str(run.final),
    }
    for name in (evals[-1][1] if evals else {}):
        series = [(s, r[name]["loss"]) for s, r in evals if name in r]
        summary["initial"][name] = series[0][1]
        summary["final"][name] = series[-1][1]
        best = min(series, key=lambda x: x[1])
        summary["best"][name] = {"loss": best[1], "step": best[0]}
    summary.update(st.hook_state.get("summary", {}))  # what eval hooks measured (e.g. retrieval's comparison)
    summary.update(memory.peak_memory_mb(st.device))
    if st.peak_rss_train_mb is not None:  # VmHWM can run a page ahead of ru_maxrss: the lifetime peak is the larger
        summary["peak_rss_train_mb"] = st.peak_rss_train_mb
        summary["peak_rss_mb"] = max(summary["peak_rss_mb"], st.peak_rss_train_mb)
    atomic.write_json(run.summary, summary)
    metrics.write({"event": "end", "step": steps, "summary": summary})


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

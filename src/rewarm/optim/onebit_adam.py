"""1-bit Adam on torch.distributed (Tang et al. 2021, "1-bit Adam: Communication Efficient
Large-Scale Training with Adam's Convergence Speed"): `optimizer.name: onebit_adam`.

Adam's variance v stabilises early in training. 1-bit Adam runs plain AdamW (full-precision
gradient all-reduce) for a warmup, then freezes v and uses it as a fixed preconditioner. From then
on each rank updates its momentum from its *local* gradient,

    m ← β₁·m + (1 − β₁)·g_local

and the ranks average m with error-compensated 1-bit compression (rewarm.optim.compression), about
32× fewer bytes than an fp32 all-reduce. The update is AdamW's with v frozen:

    x ← x·(1 − lr·wd) − lr/(1 − β₁ᵗ) · m / (√(v / (1 − β₂^{t_f})) + ε)        t_f = the freeze step

Before the freeze this is exactly AdamW's arithmetic (same order of operations as torch's
single-tensor AdamW). DDP's own gradient all-reduce is replaced by a communication hook that
all-reduces during the warmup and does nothing during the compression phase (the optimizer
communicates instead).

For continual pre-training the freeze goes *after* the re-warm: v from before a data shift describes
the old data, and freezing it during the re-warming spike would precondition the whole run with the
spike's gradients. Default: freeze_step = warmup steps + `freeze_after_warmup` (0.15) × max_steps.

State per parameter: step, exp_avg (m, the same on every rank after each step), exp_avg_sq (v),
and from the freeze on worker_error (this rank's) and server_error (this rank's chunk). Checkpoints
hold every rank's error buffers (gathered to rank 0 as a (world, ...) tensor); a resume at the
same world size continues bit-exactly, at another world size they restart at zero (logged).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist

from rewarm.errors import UserError
from rewarm.optim.compression import compressed_average, layout

log = logging.getLogger(__name__)

OPTIONS = {"freeze_step": "the optimizer step at which v freezes and compression starts (0 = from freeze_after_warmup)",
           "freeze_after_warmup": "with freeze_step 0: freeze this fraction of max_steps after the LR warmup (0.15)"}


def freeze_step(cfg) -> int:
    from rewarm.schedules import warmup_steps

    o = cfg.optimizer.options
    if o.get("freeze_step"):
        return int(o["freeze_step"])
    frac = o.get("freeze_after_warmup", 0.15)
    return warmup_steps(cfg.schedule.warmup, cfg.train.max_steps) + max(1, round(frac * cfg.train.max_steps))


def check(cfg) -> None:
    o = cfg.optimizer.options
    unknown = sorted(set(o) - set(OPTIONS))
    if unknown:
        raise UserError(f"`optimizer.options` has {unknown}, which onebit_adam does not read. It reads: "
                        + "; ".join(f"{k}: {v}" for k, v in OPTIONS.items()))
    fs = o.get("freeze_step", 0)
    if not isinstance(fs, int) or isinstance(fs, bool) or fs < 0:
        raise UserError(f"`optimizer.options.freeze_step` must be a step number >= 0 (0 = automatic), got {fs!r}.")
    frac = o.get("freeze_after_warmup", 0.15)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise UserError(f"`optimizer.options.freeze_after_warmup` must be a fraction of max_steps in [0, 1), got {frac!r}.")
    if freeze_step(cfg) >= cfg.train.max_steps:
        raise UserError(f"onebit_adam would freeze its variance at step {freeze_step(cfg)}, but the run has only "
                        f"{cfg.train.max_steps} steps: it would never compress. Lower optimizer.options.freeze_step "
                        f"(or freeze_after_warmup), or train longer.")
    if cfg.distributed.strategy == "fsdp":
        raise UserError("onebit_adam is a data-parallel optimizer: it averages whole momentum tensors across ranks, "
                        "which FSDP shards. Use distributed.strategy: ddp (or optimizer.name: adamw with FSDP).")


class OneBitAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 1, group=None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, run_step=0))
        self.freeze_step = freeze_step
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._sent = 0  # bytes this rank sent during the current step (DDP hook in backward, then step)
        self._last = {}  # what step_metrics reports: the last step's bytes and phase

    @property
    def compressing(self) -> bool:
        """Whether the step about to be taken is in the compression phase (v frozen, no gradient all-reduce)."""
        return self.world > 1 and self.param_groups[0].get("run_step", 0) >= self.freeze_step

    def step_metrics(self) -> dict:
        """What the loop logs in the train event: the phase and the bytes this rank sent in the step."""
        return dict(self._last)

    @torch.no_grad()
    def step(self, closure=None):
        compressing = self.compressing
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(p.grad, 1 - beta1)
                if compressing:
                    if "worker_error" not in state:
                        chunk, _ = layout(p.numel(), self.world)
                        state["worker_error"] = torch.zeros(self.world * chunk, dtype=p.dtype, device=p.device)
                        state["server_error"] = torch.zeros(chunk, dtype=p.dtype, device=p.device)
                    avg, sent = compressed_average(exp_avg, state["worker_error"], state["server_error"], self.group)
                    exp_avg.copy_(avg)
                    self._sent += sent
                    bias2 = 1 - beta2 ** min(t, self.freeze_step)
                else:
                    exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    bias2 = 1 - beta2 ** t
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
        if self.world > 1:
            self._last = {"comm_bytes": self._sent, "onebit_phase": "compression" if compressing else "warmup"}
        self._sent = 0
        return None

    # -- checkpoints: every rank's error buffers, gathered -------------------------------------

    def state_dict(self) -> dict:
        """The usual state, with each error buffer replaced by all ranks' buffers stacked (world, ...).
        A collective when the compression phase has begun: call it on every rank (full_state does)."""
        sd = super().state_dict()
        packed = {}
        for idx, st in sd["state"].items():
            if "worker_error" in st and self.world > 1:
                st = dict(st)
                for key in ("worker_error", "server_error"):
                    parts = [torch.empty_like(st[key]) for _ in range(self.world)]
                    dist.all_gather(parts, st[key].contiguous(), group=self.group)
                    st[key] = torch.stack(parts)
            packed[idx] = st
        sd["state"] = packed
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state, dropped, saved_world = {}, False, None
        for idx, st in state_dict["state"].items():
            st = dict(st)
            if "worker_error" in st:
                # stacked (world, ...) by state_dict; the row count is the world size that wrote it
                saved_world = st["worker_error"].shape[0] if st["worker_error"].dim() == 2 else None
                if saved_world == self.world and self.world > 1:
                    for key in ("worker_error", "server_error"):
                        st[key] = st[key][self.rank].clone()
                else:
                    del st["worker_error"], st["server_error"]
                    dropped = True
            state[idx] = st
        if dropped:
            log.warning("onebit_adam: the checkpoint's error-feedback buffers were written by %s ranks; this run has "
                        "%d, so they restart at zero (the momentum and the variance carry over).", saved_world, self.world)
        super().load_state_dict(dict(state_dict, state=state))


def build(model, param_groups, cfg, d) -> OneBitAdam:
    o = cfg.optimizer
    fs = freeze_step(cfg)
    opt = OneBitAdam(param_groups, lr=cfg.schedule.max_lr, betas=o.betas, eps=o.eps, freeze_step=fs)
    if not d.active:
        log.warning("onebit_adam with one process: there is nothing to compress, so it runs as plain Adam(W) and "
                    "never freezes its variance. Launch with --nproc N (N >= 2) to compress.")
        return opt
    model.register_comm_hook(opt, _ddp_hook)
    log.info("onebit_adam: AdamW with full all-reduce for %d steps, then v frozen and 1-bit momentum exchange", fs)
    return opt


def _ddp_hook(opt: OneBitAdam, bucket):
    """DDP's gradient exchange: the mean all-reduce during the warmup, nothing during compression
    (each rank keeps its local gradient; the optimizer averages momenta instead)."""
    buf = bucket.buffer()
    if opt.compressing:
        fut = torch.futures.Future()
        fut.set_result(buf)
        return fut
    opt._sent += 2 * (opt.world - 1) * buf.numel() * buf.element_size() // opt.world  # ring all-reduce
    buf.div_(opt.world)
    return dist.all_reduce(buf, group=opt.group, async_op=True).get_future().then(lambda f: f.value()[0])

"""`replay.kl_coef`: self-distillation to the initial model on the replay rows.

Replaying the model's own samples keeps it near its old distribution through the data; the KL term
does so directly: on the rows of a step that come from a replay source, add

    kl_coef · KL(p_initial ‖ p_current)   (mean over the rows' next-token positions)

weighted by the share of the rank's rows that are replay, with the frozen initial model (the run's
`model.path`) computed on the fly. A loss term (rewarm.loss_terms): its forward and backward run
before the step's micro-batches with gradient sync off, so the gradients join the main ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewarm.errors import UserError


def replay_source_names(cfg) -> list[str]:
    """`replay.sources`, or every data.train source written by `rewarm replay generate`."""
    if cfg.replay.sources:
        return list(cfg.replay.sources)
    out = []
    for s in cfg.data.train:
        try:
            meta = json.loads((Path(s.path) / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "generated" in meta:
            out.append(s.name)
    return out


def _enabled(cfg) -> bool:
    return cfg.replay.kl_coef > 0


def _check(cfg) -> None:
    if cfg.init == "scratch":
        raise UserError("`replay.kl_coef` pulls the model towards its initial weights' predictions; a from-scratch "
                        "run has none. Use init: weights (or set replay.kl_coef: 0).")
    if cfg.distributed.strategy == "fsdp":
        raise UserError("`replay.kl_coef` runs an extra forward on each rank's replay rows; under FSDP that forward "
                        "is a collective, and a rank without replay rows in a step would skip it. Use "
                        "distributed.strategy: ddp.")
    if cfg.train.precision == "fp16":
        raise UserError("`replay.kl_coef` does not support train.precision: fp16 (its gradients would miss the grad "
                        "scaler); use bf16 or fp32.")
    teacher = cfg.model.path
    if not teacher:
        raise UserError("`replay.kl_coef` compares the model with its initial weights, loaded from `model.path`, "
                        "which is empty. Set model.path to the model the run started from.")
    if (Path(teacher).is_absolute() or teacher.startswith(".")) and not Path(teacher).exists():
        raise UserError(f"`replay.kl_coef`: the initial model (the KL teacher) at model.path {teacher} does not "
                        f"exist. Point model.path at the model the run started from.")
    names = [s.name for s in cfg.data.train]
    unknown = [n for n in cfg.replay.sources if n not in names]
    if unknown:
        raise UserError(f"`replay.sources` names {unknown}, which are not data.train sources ({names}).")
    replay = replay_source_names(cfg)
    if replay and all(s.weight <= 0 for s in cfg.data.train if s.name in replay):
        raise UserError(f"`replay.kl_coef` is set but every replay source ({replay}) has weight 0 in data.train: "
                        f"no row would ever get the KL term. Give them a weight (e.g. 0.05) or set kl_coef: 0.")
    if not replay:
        raise UserError("`replay.kl_coef` is set but no data.train source is a replay source: name them in "
                        "replay.sources, or mix in a directory written by `rewarm replay generate`.")


def _backward(st, windows: np.ndarray, sources: np.ndarray) -> dict | None:
    from rewarm import distributed
    from rewarm.fused_loss import autocast
    from rewarm.model import load_pretrained

    mine = st.hook_state.setdefault("replay_kl", {})
    if "teacher" not in mine:
        teacher = load_pretrained(st.cfg.model.path).to(st.device).eval()
        teacher.requires_grad_(False)
        wanted = set(replay_source_names(st.cfg))
        mine.update(teacher=teacher, ids=[k for k, s in enumerate(st.mixture.sources) if s.name in wanted])
    rows = windows[np.isin(sources, mine["ids"])]
    if len(rows) == 0:
        return {"replay_kl": None}
    inputs = torch.from_numpy(rows[:, :-1]).to(st.device)
    with torch.no_grad(), autocast(st.device, st.precision):
        t_logp = F.log_softmax(mine["teacher"](input_ids=inputs, use_cache=False).logits.float(), dim=-1)
    with distributed.set_grad_sync(st.model, st.dist, sync=False):
        with autocast(st.device, st.precision):
            s_logp = F.log_softmax(st.model(input_ids=inputs, use_cache=False).logits.float(), dim=-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        (st.cfg.replay.kl_coef * kl * (len(rows) / len(windows))).backward()
    return {"replay_kl": float(kl.detach())}


def register() -> None:
    from rewarm import loss_terms

    loss_terms.register("replay_kl", _enabled, _backward, _check)

"""The trainer's state besides the weights: one type, saved in every checkpoint.

A checkpoint's `trainer_state.pt` is `TrainerState.to_dict()`; resume, rollback,
`optimizer.state: from_checkpoint` and `rewarm downstream` read it back with
`TrainerState.from_dict`. What a resumed run needs to give the numbers of an
uninterrupted one: the step (which fixes the LR and the data position, both pure
functions of it), the optimizer moments, the RNG states, the non-finite step count and
the LR scale left by rollbacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens consumed: step x global_batch x seq_len
    bad_steps: int = 0  # non-finite steps skipped so far
    lr_scale: float = 1.0  # product of the rollback LR factors applied so far
    world_size: int = 1  # processes that wrote it (any world size can resume it)
    optimizer: dict = field(default_factory=dict)  # name-keyed, unsharded (distributed.full_state)
    rng: dict = field(default_factory=dict)  # {"torch": ByteTensor, "cuda": [ByteTensor, ...]}

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps, "lr_scale": self.lr_scale,
                "world_size": self.world_size, "optimizer": self.optimizer, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerState":
        rng = d.get("rng") or ({"torch": d["torch_rng"]} if "torch_rng" in d else {})  # checkpoints before rng{}
        return cls(step=int(d["step"]), tokens=int(d.get("tokens", 0)), bad_steps=int(d.get("bad_steps", 0)),
                   lr_scale=float(d.get("lr_scale", 1.0)), world_size=int(d.get("world_size", 1)),
                   optimizer=d.get("optimizer") or {}, rng=rng)


def capture_rng() -> dict:
    """The RNG states training draws from (dropout, sampling): torch's CPU generator and, on GPUs, CUDA's."""
    out: dict = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])

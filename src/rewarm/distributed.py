"""torch.distributed plumbing: the torchrun environment, DDP / FSDP2 wrapping, reductions.

Launched by `torchrun` (or `rewarm train --nproc N`, which execs it); RANK / WORLD_SIZE /
LOCAL_RANK come from its environment. Backend: NCCL on CUDA, gloo on CPU. One process =
world size 1 and everything here is a no-op.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any (stopping is decided together)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def setup(device_kind: str, timeout_s: int = 120) -> Dist:
    """Join the process group torchrun set up (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        # a short timeout: a dead peer turns into an error on the others, not a hang
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of an HF causal LM (GPT-NeoX `layers`, Llama `layers`, GPT-2 `h`)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} for FSDP sharding")


def wrap(model: torch.nn.Module, d: Dist, strategy: str, device: torch.device, cpu_offload: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` per transformer block, then the root)."""
    d.strategy = strategy
    if not d.active:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    for block in transformer_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def set_grad_sync(model: torch.nn.Module, d: Dist, sync: bool):
    """Context for one micro-step: gradients are all-reduced only on the last one."""
    import contextlib

    if not d.active or sync:
        if d.active and d.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if d.strategy == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts, the optimizer keyed by parameter
    name — the same form whatever the world size, so a run saved at 2 ranks resumes at 1.
    FSDP gathers through torch.distributed.checkpoint (a collective: call on every rank)."""
    if d.active and d.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    raw = optimizer.state_dict()
    names = _names(model, optimizer)
    flat = [n for group in names for n in group]
    state = {flat[i]: v for i, v in raw["state"].items()}
    groups = [dict(g, params=names[i]) for i, g in enumerate(raw["param_groups"])]
    model_sd = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return model_sd, {"state": state, "param_groups": groups}


def load_model_state(model: torch.nn.Module, state_dict: dict, d: Dist) -> None:
    """Full (unsharded) weights into a live model: FSDP scatters them to the shards, otherwise the
    plain module (inside DDP or torch.compile) takes them in place."""
    if d.active and d.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state_dict)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Inverse of `full_state` for the optimizer, at any world size."""
    if d.active and d.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    names = _names(model, optimizer)
    flat = [n for group in names for n in group]
    index = {n: i for i, n in enumerate(flat)}
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(names):
        raise ValueError("optimizer state has a different number of parameter groups")
    groups, offset = [], 0
    for g, group_names in zip(saved_groups, names):
        groups.append(dict(g, params=list(range(offset, offset + len(group_names)))))
        offset += len(group_names)
    optimizer.load_state_dict({"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups})

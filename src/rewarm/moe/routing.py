"""Top-k token routing to FFN experts, and the load-balancing losses that keep experts in use.

For a layer with N_E experts and T tokens routed k times each:

    p_i = mean over tokens of softmax(router(x))_i          (keeps its gradient)
    f_i = (# of assignments to expert i) / (k · T)           (a count: no gradient)
    LBL = N_E · Σ_i f_i · p_i                                (1 when the load is uniform)
    z   = mean over tokens of logsumexp(router logits)²      (ST-MoE's router z-loss)

`scope = micro_batch` takes f_i from the tokens of this forward alone; `global_batch` (Qiu et al.
2025, "Demons in the detail") takes it from every token of the optimizer step on every data-parallel
rank — set from outside with `global_f` before the step's micro-batches (rewarm.moe.balance) —
while p_i stays this forward's own. Since every micro-batch has the same number of tokens, the
mean over micro-batches and ranks of N_E · Σ f_i^global · p_i^micro is exactly the LBL of the
concatenated global batch, gradient included.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TopKMoE(nn.Module):
    """A mixture of FFN experts: each token goes to its k most probable experts; their outputs are
    mixed with the top-k probabilities renormalised to sum to 1 (so N identical experts compute the
    dense FFN exactly, whatever the router says). With a capacity factor c, an expert takes at most
    ceil(c · k · T / N_E) tokens of a training forward (the first ones in order); the rest skip it.
    Evaluation and generation never drop a token: a token's output must not depend on its batch."""

    def __init__(self, experts: list[nn.Module], hidden_size: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k must be between 1 and the number of experts ({len(experts)}), got {top_k}")
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden_size, len(experts), bias=False)
        self.top_k = top_k
        self.capacity_factor = 0.0
        self.scope = "micro_batch"
        self.global_f: torch.Tensor | None = None  # set per step for scope=global_batch (rewarm.moe.balance)
        self.record_routing = False  # eval: count where tokens go (rewarm.moe.specialisation)
        self.lbl: torch.Tensor | None = None  # this forward's losses (training only)
        self.z: torch.Tensor | None = None
        self.reset_stats()

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def reset_stats(self) -> None:
        """Counts since the last reset: assignments per expert, dropped assignments, tokens, LBL sum."""
        # kept as device tensors: turning them into numbers here would stall a GPU every layer
        self.stat_counts: list[torch.Tensor] = []
        self.stat_dropped: list[int] = []
        self.stat_tokens = 0
        self.stat_lbl: list[torch.Tensor] = []

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits fp32, probabilities, chosen experts (T, k), their renormalised weights (T, k))."""
        logits = self.router(flat).float()
        probs = logits.softmax(dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        return logits, probs, chosen, top / top.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, probs, chosen, weights = self.route(flat)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts)
        capacity = math.ceil(self.capacity_factor * self.top_k * flat.shape[0] / self.num_experts) \
            if self.capacity_factor > 0 and self.training else None
        out = torch.zeros_like(flat)
        dropped = 0
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)  # sorted by token: the first ones keep their place
            if capacity is not None and rows.numel() > capacity:
                dropped += rows.numel() - capacity
                rows, slot = rows[:capacity], slot[:capacity]
            # an expert with no tokens still runs (on zero rows): its parameters stay in the graph for DDP
            y = expert(flat[rows]) * weights[rows, slot].unsqueeze(-1).to(flat.dtype)
            out.index_add_(0, rows, y)  # in place: no copy of the layer's output per expert
        if self.training:
            self._losses(logits, probs, counts)
            self._count(counts, dropped, flat.shape[0])
        elif self.record_routing:
            self._count(counts, dropped, flat.shape[0])
        return out.view(shape)

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> None:
        f_local = counts.to(probs.dtype) / counts.sum()
        f = self.global_f if (self.scope == "global_batch" and self.global_f is not None) else f_local
        self.lbl = self.num_experts * (f.to(probs.device, probs.dtype) * probs.mean(dim=0)).sum()
        self.z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.stat_lbl.append(self.lbl.detach())

    def _count(self, counts: torch.Tensor, dropped: int, tokens: int) -> None:
        self.stat_counts.append(counts.detach())
        self.stat_dropped.append(dropped)
        self.stat_tokens += tokens

    def stats(self) -> dict:
        """Since the last reset: load f_i (share of assignments), dropped share, mean LBL (training)."""
        counts = torch.stack(self.stat_counts).sum(0).double().cpu() if self.stat_counts else None
        out: dict = {}
        if counts is not None and counts.sum() > 0:
            out["load"] = (counts / counts.sum()).tolist()
            out["dropped"] = sum(self.stat_dropped) / float(counts.sum())
        if self.stat_lbl:
            out["lbl"] = float(torch.stack(self.stat_lbl).mean())
        return out

    @torch.no_grad()
    def assignment_counts(self, x: torch.Tensor) -> torch.Tensor:
        """How many of x's token assignments each expert gets (the routing alone: no expert runs)."""
        _, _, chosen, _ = self.route(x.reshape(-1, x.shape[-1]))
        return torch.bincount(chosen.flatten(), minlength=self.num_experts)

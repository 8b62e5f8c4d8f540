"""Which experts each domain's tokens go to: the specialisation that global-batch load balancing
is meant to allow (Qiu et al. 2025 show domain-specific routing appears under the global-batch LBL
and is suppressed by the micro-batch one).

For every eval set and layer: the share of its tokens' top-k assignments each FFN expert receives,
and that distribution's entropy in bits (log2 N_E = no preference; 0 = one expert takes all).
"""
from __future__ import annotations

import math

import torch

from rewarm.fused_loss import autocast


@torch.no_grad()
def routing_by_domain(model, eval_sets, device: torch.device, precision: str = "fp32", batch: int = 8) -> dict:
    """{set name: {"share": [[per expert] per layer], "entropy_bits": [per layer], "mean_entropy_bits",
    and for BAM "attention_share": the attention router's mean weight per expert, per layer}}."""
    from rewarm.moe.attention import MixtureOfAttention

    layers = model.moe_layers()
    attention = [m for m in model.modules() if isinstance(m, MixtureOfAttention)]
    was_training = model.training
    model.eval()
    out: dict = {}
    try:
        for es in eval_sets:
            for m in layers:
                m.reset_stats()
                m.record_routing = True
            for a in attention:
                a.routing_sum, a.routing_tokens, a.record_routing = None, 0, True
            with autocast(device, precision):
                for rows in es.windows.split(batch):
                    model.backbone(input_ids=rows[:, :-1].to(device), use_cache=False)
            shares = [m.stats()["load"] for m in layers]
            entropy = [-sum(p * math.log2(p) for p in s if p > 0) for s in shares]
            out[es.name] = {"share": [[round(p, 4) for p in s] for s in shares],
                            "entropy_bits": [round(h, 4) for h in entropy],
                            "mean_entropy_bits": round(sum(entropy) / len(entropy), 4), "tokens": es.tokens}
            if attention:
                out[es.name]["attention_share"] = [[round(float(x), 4) for x in a.routing_sum / a.routing_tokens]
                                                   for a in attention]
    finally:
        for m in layers:
            m.record_routing = False
            m.reset_stats()
        for a in attention:
            a.record_routing, a.routing_sum, a.routing_tokens = False, None, 0
        model.train(was_training)
    return out


def write_routing(run_dir, model, eval_sets, device, precision: str, expert_names: list[str]) -> dict:
    """routing.json in a run directory (atomically): what `rewarm report` draws as a heatmap."""
    from pathlib import Path

    from rewarm import atomic

    result = {"experts": list(expert_names), "max_entropy_bits": round(math.log2(len(model.moe_layers()[0].experts)), 4),
              "sets": routing_by_domain(model, eval_sets, device, precision)}
    atomic.write_json(Path(run_dir) / "routing.json", result)
    return result

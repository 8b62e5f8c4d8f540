"""Branches → one mixture of experts (BAM: Zhang et al. 2024; BTX: Sukhbaatar et al. 2024).

From N branches continued from the same dense seed, one per domain:
- each layer's FFN experts are the branches' FFNs (plus, optionally, the seed's own), top-k routed;
- `bam`: each layer's attention experts are the branches' attention projections, soft-routed
  (rewarm.moe.attention); with `kv_sharing`, keys and values come from the branches' average and
  only queries and outputs are per expert;
- `btx`: attention is the branches' average (FFN experts only: the baseline BAM compares against);
- everything else (embeddings, norms, head) is the branches' average.
Routers start as small random normals (BAM): nothing is learnt about routing before the mix run.
"""
from __future__ import annotations

import copy

import torch

from rewarm.errors import UserError
from rewarm.moe.families import family_of
from rewarm.moe.modeling import UpcycledMoEConfig, UpcycledMoEForCausalLM
from rewarm.wrapping import IGNORED_CONFIG_KEYS, base_config_dict

MODES = ("bam", "btx")


def _body(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def check_same_architecture(branches: list[tuple[str, torch.nn.Module]]) -> None:
    """Refuse branches that cannot be experts of one model: another architecture, another config
    field that changes the computation, or any parameter of another name or shape (named)."""
    ref_name, ref = branches[0]
    family_of(ref.config)
    ref_cfg = {k: v for k, v in ref.config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for name, model in branches[1:]:
        cfg = {k: v for k, v in model.config.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
        for key in sorted(set(ref_cfg) | set(cfg)):
            if ref_cfg.get(key) != cfg.get(key):
                raise UserError(f"branch `{name}` is not the same architecture as `{ref_name}`: config field "
                                f"`{key}` is {cfg.get(key)!r} there and {ref_cfg.get(key)!r} in `{ref_name}`. "
                                f"Every branch must be continued from the same seed model.")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for key in sorted(set(ref_shapes) | set(shapes)):
            if ref_shapes.get(key) != shapes.get(key):
                raise UserError(f"branch `{name}` differs from `{ref_name}` in parameter `{key}`: shape "
                                f"{shapes.get(key)} there, {ref_shapes.get(key)} in `{ref_name}`. Every branch "
                                f"must be continued from the same seed model.")


@torch.no_grad()
def average(models: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of the first model holding the element-wise mean of every model's parameters."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
                         for k, v in states[0].items()})
    return out


@torch.no_grad()
def mix(branches: list[tuple[str, torch.nn.Module]], *, mode: str = "bam", kv_sharing: bool = False,
        seed_model: torch.nn.Module | None = None, top_k: int = 2, router_init_std: float = 0.02,
        init_seed: int = 0) -> UpcycledMoEForCausalLM:
    """The MoE built from `branches` (name, model), all of one architecture. `seed_model`: also make
    the seed's own FFN an expert (the last one, named `seed`)."""
    if mode not in MODES:
        raise UserError(f"upcycle.mode must be one of {', '.join(MODES)}, not {mode!r}")
    if kv_sharing and mode != "bam":
        raise UserError("upcycle.kv_sharing shares keys/values between attention experts; mode btx has none "
                        "(its attention is averaged). Use mode: bam, or kv_sharing: false.")
    everyone = branches + ([("seed", seed_model)] if seed_model is not None else [])
    check_same_architecture(everyone)
    models = [m for _, m in branches]
    ffn_sources = [m for _, m in everyone]
    ref = models[0]
    family = family_of(ref.config)
    if not 1 <= top_k <= len(ffn_sources):
        raise UserError(f"upcycle.top_k must be between 1 and the number of FFN experts ({len(ffn_sources)}), got {top_k}")
    config = UpcycledMoEConfig(base=base_config_dict(ref.config), ffn_experts=len(ffn_sources),
                               attention_experts=len(models) if mode == "bam" else 0, kv_sharing=kv_sharing,
                               num_experts_per_tok=top_k, expert_names=[n for n, _ in everyone], router_init_std=router_init_std)
    torch.manual_seed(init_seed)  # the routers' initialisation is part of the recipe: the same every time
    moe = UpcycledMoEForCausalLM(config).float()
    dense = average(models)
    body, inner = _body(dense), moe.backbone.inner
    replaced = [family.mlp] + ([family.attention] if mode == "bam" else [])
    shared = {k: v for k, v in body.state_dict().items() if not any(f".{r}." in k for r in replaced)}
    result = inner.load_state_dict(shared, strict=False)
    if result.unexpected_keys:
        raise UserError(f"upcycle: the seed has weights the MoE has no place for: {result.unexpected_keys[:3]}")
    moe.lm_head.weight.copy_(dense.get_output_embeddings().weight)
    for i, layer in enumerate(inner.layers):
        ffn = getattr(layer, family.mlp)
        for e, src in enumerate(ffn_sources):
            ffn.experts[e].load_state_dict(getattr(_body(src).layers[i], family.mlp).state_dict())
        if mode == "bam":
            _fill_attention(getattr(layer, family.attention), family,
                            [getattr(_body(m).layers[i], family.attention) for m in models],
                            getattr(body.layers[i], family.attention), ref.config)
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe


def _fill_attention(moa, family, experts: list, averaged, cfg) -> None:
    parts = [family.split(a, cfg) for a in experts]
    moa.q_proj.weight.copy_(torch.cat([p.q for p in parts]))
    kv = [family.split(averaged, cfg)] if moa.kv_shared else parts
    moa.k_proj.weight.copy_(torch.cat([p.k for p in kv]))
    moa.v_proj.weight.copy_(torch.cat([p.v for p in kv]))
    if moa.q_proj.bias is not None:
        moa.q_proj.bias.copy_(torch.cat([p.q_bias for p in parts]))
        moa.k_proj.bias.copy_(torch.cat([p.k_bias for p in kv]))
        moa.v_proj.bias.copy_(torch.cat([p.v_bias for p in kv]))
    moa.o_weight.copy_(torch.stack([p.o for p in parts]))
    if moa.o_bias is not None:
        moa.o_bias.copy_(torch.cat([p.o_bias for p in parts]))


@torch.no_grad()
def identity_gap(dense: torch.nn.Module, n: int = 3, mode: str = "bam", kv_sharing: bool = False,
                 tokens: int = 32, seed: int = 0) -> float:
    """The built-in check: an MoE mixed from n copies of `dense` must compute `dense`'s logits
    whatever its (random) routers say. Returns the largest |Δ logit| on random tokens (float rounding: ~1e-6)."""
    moe = mix([(f"copy{i}", dense) for i in range(n)], mode=mode, kv_sharing=kv_sharing, top_k=min(2, n),
              init_seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dense.config.vocab_size, (2, tokens), generator=g)
    was = dense.training
    dense.eval()
    try:
        gap = (moe(input_ids=ids, use_cache=False).logits - dense(input_ids=ids, use_cache=False).logits).abs().max()
    finally:
        dense.train(was)
    return float(gap)

"""The upcycled mixture-of-experts: the seed's own architecture (GPT-NeoX or Llama, built by
transformers from the seed's config) with each decoder layer's FFN replaced by top-k routed FFN
experts and — in BAM mode — its attention by a soft-routed mixture of attention experts.
Registered with transformers' Auto classes on `import rewarm` (model_type `rewarm_moe`):
`AutoModelForCausalLM.from_pretrained` loads saved ones, no remote code.

In training mode the model returns `aux_loss` = lbl_coef · mean over layers of LBL + z_loss_coef ·
mean over layers of the router z-loss (rewarm.moe.routing); the training loop adds and logs it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rewarm.moe.attention import MixtureOfAttention
from rewarm.moe.families import family_of
from rewarm.moe.routing import TopKMoE
from rewarm.wrapping import InnerEmbeddings, build_base_config, cache_argument, top_level_kwargs

MODEL_TYPE = "rewarm_moe"
SCOPES = ("micro_batch", "global_batch")


class UpcycledMoEConfig(PretrainedConfig):
    """The seed's config (`base`) plus how its layers were turned into experts."""

    model_type = MODEL_TYPE

    def __init__(self, base: dict | None = None, ffn_experts: int = 2, attention_experts: int = 0,
                 kv_sharing: bool = False, num_experts_per_tok: int = 2, expert_names: list | None = None,
                 lbl_coef: float = 0.01, lbl_scope: str = "micro_batch", z_loss_coef: float = 0.0,
                 capacity_factor: float = 0.0, router_init_std: float = 0.02, **kwargs):
        self.base = dict(base or {"model_type": "gpt_neox"})
        self.ffn_experts, self.attention_experts, self.kv_sharing = int(ffn_experts), int(attention_experts), bool(kv_sharing)
        self.num_experts_per_tok = int(num_experts_per_tok)  # k of top-k (`top_k` would be read as a sampling setting)
        self.expert_names = list(expert_names or [])
        self.lbl_coef, self.lbl_scope, self.z_loss_coef = float(lbl_coef), lbl_scope, float(z_loss_coef)
        self.capacity_factor, self.router_init_std = float(capacity_factor), float(router_init_std)
        if self.ffn_experts < 1 or not 1 <= self.num_experts_per_tok <= self.ffn_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and ffn_experts ({self.ffn_experts}), "
                             f"got {self.num_experts_per_tok}")
        if lbl_scope not in SCOPES:
            raise ValueError(f"lbl_scope must be one of {', '.join(SCOPES)}, not {lbl_scope!r}")
        super().__init__(**top_level_kwargs(self.base, kwargs))

    @property
    def mode(self) -> str:
        return "bam" if self.attention_experts else "btx"

    def base_config(self) -> PretrainedConfig:
        return build_base_config(self.base)


@dataclass
class MoEModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None


@dataclass
class MoECausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None


class MoEBackbone(nn.Module):
    """The seed's backbone with the experts swapped in; returns the auxiliary loss beside the
    hidden states (what the fused head + loss path reads)."""

    def __init__(self, inner: nn.Module, config: UpcycledMoEConfig):
        super().__init__()
        self.inner = inner
        self.config = config
        base, family = inner.config, family_of(inner.config)
        heads, kv_heads, head_dim = family.heads(base)
        for i, layer in enumerate(inner.layers):
            dense_mlp = getattr(layer, family.mlp)
            experts = [copy.deepcopy(dense_mlp) for _ in range(config.ffn_experts)]
            setattr(layer, family.mlp, TopKMoE(experts, base.hidden_size, config.num_experts_per_tok))
            if config.attention_experts:
                old = getattr(layer, family.attention)
                parts = family.split(old, base)
                setattr(layer, family.attention, MixtureOfAttention(
                    base, getattr(old, "layer_idx", i), experts=config.attention_experts, heads=heads,
                    kv_heads=kv_heads, head_dim=head_dim, hidden_size=base.hidden_size,
                    qkv_bias=parts.q_bias is not None, o_bias=parts.o_bias is not None, kv_shared=config.kv_sharing))
        self.apply_settings(config)
        self._cache_arg = cache_argument(inner)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder blocks (FSDP shards one per block)."""
        return self.inner.layers

    def moe_layers(self) -> list[TopKMoE]:
        return [m for m in self.inner.modules() if isinstance(m, TopKMoE)]

    def apply_settings(self, config: UpcycledMoEConfig) -> None:
        for m in self.moe_layers():
            m.scope, m.capacity_factor = config.lbl_scope, config.capacity_factor

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, use_cache=None,
                cache=None, past_key_values=None, **kwargs) -> MoEModelOutput:
        kwargs[self._cache_arg] = cache if cache is not None else past_key_values
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        return MoEModelOutput(**out, aux_loss=self.aux_loss() if self.training else None)

    def aux_loss(self) -> torch.Tensor | None:
        layers = [m for m in self.moe_layers() if m.lbl is not None]
        if not layers:
            return None
        c = self.config
        aux = c.lbl_coef * torch.stack([m.lbl for m in layers]).mean()
        if c.z_loss_coef > 0:
            aux = aux + c.z_loss_coef * torch.stack([m.z for m in layers]).mean()
        for m in layers:  # each forward's losses are its own: nothing carries into the next one
            m.lbl = m.z = None
        return aux


class UpcycledMoEForCausalLM(InnerEmbeddings, PreTrainedModel, GenerationMixin):
    config_class = UpcycledMoEConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True
    _no_split_modules: list = []

    def __init__(self, config: UpcycledMoEConfig):
        super().__init__(config)
        base_cfg = config.base_config()
        family = family_of(base_cfg)
        seed = AutoModelForCausalLM.from_config(base_cfg)
        self.backbone = MoEBackbone(getattr(seed, seed.base_model_prefix), config)
        self.lm_head = seed.get_output_embeddings()
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": f"backbone.inner.{family.embeddings}.weight"}
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Only what the seed does not have starts here (routers, stacked attention); `rewarm upcycle`
        then copies every branch weight in. Routers: small normal, as BAM initialises them."""
        std = self.config.router_init_std
        if isinstance(module, (TopKMoE, MixtureOfAttention)):
            nn.init.normal_(module.router.weight, std=std)
        if isinstance(module, MixtureOfAttention):
            nn.init.normal_(module.o_weight, std=0.02)

    def moe_layers(self) -> list[TopKMoE]:
        return self.backbone.moe_layers()

    def apply_run_settings(self, cfg) -> None:
        """A run's `moe:` section (lbl_coef, lbl_scope, z_loss_coef, capacity_factor) replaces the
        saved ones for this run (and is saved with its checkpoints)."""
        moe = cfg.moe
        for key in ("lbl_coef", "lbl_scope", "z_loss_coef", "capacity_factor"):
            setattr(self.config, key, getattr(moe, key))
        self.backbone.apply_settings(self.config)

    def step_metrics(self) -> dict:
        """Per optimizer step (the loop asks once per logged step): mean LBL over layers, each layer's
        expert load f_i, the share of dropped assignments when a capacity factor is set. This rank's."""
        layers = self.moe_layers()
        stats = [m.stats() for m in layers]
        for m in layers:
            m.reset_stats()
        if not stats or "load" not in stats[0]:
            return {}
        out = {"moe_load": [[round(x, 4) for x in s["load"]] for s in stats]}
        lbls = [s["lbl"] for s in stats if "lbl" in s]
        if lbls:
            out["moe_lbl"] = sum(lbls) / len(lbls)
        if self.config.capacity_factor > 0:
            out["moe_dropped"] = sum(s["dropped"] for s in stats) / len(stats)
        return out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs) -> MoECausalLMOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                            past_key_values=past_key_values, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        extra = {k: v for k, v in out.items() if k not in ("last_hidden_state", "aux_loss")}
        return MoECausalLMOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, **extra)


def register() -> None:
    AutoConfig.register(MODEL_TYPE, UpcycledMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(UpcycledMoEConfig, UpcycledMoEForCausalLM, exist_ok=True)

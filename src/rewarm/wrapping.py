"""What every model class built around a base model's own architecture shares (the upcycled MoE,
the RETRO model): the base's config carried as a dict, the top-level fields generation reads, the
name of the KV-cache argument, and the embedding accessors over `backbone.inner` + `lm_head`."""
from __future__ import annotations

import inspect

from transformers import AutoConfig, PretrainedConfig

# config fields that say nothing about the computation (where a model came from, how it was saved)
IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                       "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states"}


def base_config_dict(cfg: PretrainedConfig) -> dict:
    """A base model's config as the wrapping config stores it (`base`): computation fields + model_type."""
    out = {k: v for k, v in cfg.to_dict().items() if k not in IGNORED_CONFIG_KEYS}
    out["model_type"] = cfg.model_type
    return out


def top_level_kwargs(base: dict, kwargs: dict) -> dict:
    """`kwargs` for PretrainedConfig.__init__ with what generation and the cache read from the top-level
    config (sizes, special tokens, tied head) taken from `base` unless given."""
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if key in base:
            kwargs.setdefault(key, base[key])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if base.get(key) is not None:
            kwargs.setdefault(key, base[key])
    kwargs.setdefault("tie_word_embeddings", base.get("tie_word_embeddings", False))
    return kwargs


def build_base_config(base: dict) -> PretrainedConfig:
    fields = dict(base)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def cache_argument(module) -> str:
    """The KV-cache keyword of a transformers backbone: `cache` (transformers >= 5.2x) or `past_key_values`."""
    try:
        return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


class InnerEmbeddings:
    """Embedding accessors of a causal LM whose body is `self.backbone.inner` and head `self.lm_head`."""

    def get_input_embeddings(self):
        return self.backbone.inner.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.inner.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

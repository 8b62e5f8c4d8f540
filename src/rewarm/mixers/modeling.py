"""A Llama-shaped causal LM whose attention is any mixer (or a per-layer pattern of them),
registered with transformers' Auto classes on `import rewarm`: `AutoModelForCausalLM.from_pretrained`
loads saved ones without remote code, and `model.generate` runs on the mixers' recurrent state.

Layer names follow Llama (model.embed_tokens, model.layers.N.self_attn.{q,k,v,o}_proj, mlp.
{gate,up,down}_proj, input/post_attention_layernorm, model.norm, lm_head), so a Llama checkpoint's
weights load into it: what `rewarm linearize` builds on.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from rewarm.mixers import fla_backend, lora
from rewarm.mixers.base import HeadRMSNorm, rope_tables
from rewarm.mixers.deltanet import ShortConv
from rewarm.mixers.feature_maps import FeatureMap
from rewarm.mixers.lolcats import GAMMA_LOGIT, LolcatsAttention
from rewarm.mixers.registry import MIXERS, layer_mixers

try:  # transformers >= 5: init functions that leave loaded parameters alone
    from transformers import initialization as init
except ImportError:  # older transformers: plain torch (it initialises only what was not loaded)
    import types

    init = types.SimpleNamespace(normal_=nn.init.normal_, zeros_=nn.init.zeros_, ones_=nn.init.ones_,
                                 constant_=nn.init.constant_, copy_=lambda t, other: t.copy_(other))

MODEL_TYPE = "rewarm_mixer"
# transformers >= 5.2x names the carried state `cache`; older versions `past_key_values`
CACHE = "cache" if "cache" in {f.name for f in fields(BaseModelOutputWithPast)} else "past_key_values"


class MixerConfig(PretrainedConfig):
    """Llama's fields plus the mixer per layer and each mixer's options (defaults from the papers)."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", attention_bias=False,
                 initializer_range=0.02, tie_word_embeddings=True, use_cache=True,
                 mixer="hedgehog", chunk_size=64, feature_map=None, feature_dim=None, linear_eps=1e-6,
                 gate_temperature=16.0, window=64, block_size=64, conv_size=4, num_memories=4,
                 memory_top_k=2, aux_loss_coef=0.01, backend="auto", rope_parameters=None,
                 attention_transfer=False, transfer_loss="mse", transfer_scale=1000.0, trainable=None,
                 lora_rank=0, lora_alpha=16.0, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                 linear_branch=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        if rope_parameters and "rope_theta" in rope_parameters:  # as Llama configs give it
            rope_theta = rope_parameters["rope_theta"]
        self.rope_theta = rope_theta
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.mixer = layer_mixers(mixer, num_hidden_layers)
        self.chunk_size, self.feature_map, self.feature_dim = chunk_size, feature_map, feature_dim
        self.linear_eps, self.gate_temperature = linear_eps, gate_temperature
        self.window, self.block_size, self.conv_size = window, block_size, conv_size
        self.num_memories, self.memory_top_k, self.aux_loss_coef = num_memories, memory_top_k, aux_loss_coef
        for key in ("chunk_size", "window", "block_size", "conv_size", "num_memories", "memory_top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if feature_dim is not None and (not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1):
            raise ValueError(f"feature_dim must be a positive integer (or unset: the head dim), got {feature_dim!r}")
        if backend not in ("auto", "torch", "fla"):
            raise ValueError(f"backend must be auto, torch or fla, not {backend!r}")
        self.backend = backend
        # linearizing (rewarm.linearize): attention transfer, which parameters train, adapters
        if transfer_loss not in ("mse", "attention_ce"):
            raise ValueError(f"transfer_loss must be mse or attention_ce, not {transfer_loss!r}")
        unknown = [t for t in (lora_targets or ()) if t not in lora.TARGETS]
        if unknown:
            raise ValueError(f"LoRA target `{unknown[0]}` is not a linear layer of this model; "
                             f"choose from {', '.join(lora.TARGETS)}")
        self.attention_transfer, self.transfer_loss, self.transfer_scale = attention_transfer, transfer_loss, transfer_scale
        self.trainable = list(trainable) if trainable else None
        self.lora_rank, self.lora_alpha, self.lora_targets = int(lora_rank or 0), lora_alpha, list(lora_targets or ())
        self.linear_branch = linear_branch
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class MixerCache:
    """Every layer's carried state during generation and how many tokens produced it.
    Linear mixers keep O(1) per layer; softmax layers keep their key/value cache."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.states: list = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __len__(self) -> int:
        return len(self.states)


class RMSNorm(HeadRMSNorm):
    """The same normalisation over the hidden size (the decoder's pre-norms)."""


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = lora.linear(config, "gate_proj", h, i, False)
        self.up_proj = lora.linear(config, "up_proj", h, i, False)
        self.down_proj = lora.linear(config, "down_proj", i, h, False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MixerConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MIXERS[config.mixer[layer_idx]](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, hidden, rope=None, state=None, form=None):
        mixed, state = self.self_attn(self.input_layernorm(hidden), rope, state, form)
        hidden = hidden + mixed
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), state


@dataclass
class MixerModelOutput(BaseModelOutputWithPast):
    aux_loss: torch.Tensor | None = None


@dataclass
class MixerCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None


class MixerPreTrainedModel(PreTrainedModel):
    config_class = MixerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MixerDecoderLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the state is a MixerCache, not transformers' key/value cache

    @torch.no_grad()
    def _init_weights(self, module):
        """Fresh parameters only: transformers >= 5 skips those loaded from a checkpoint (its init
        functions check a flag), so converting a Llama keeps its weights and initialises the rest."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if isinstance(module, lora.LoRALinear):
                init.normal_(module.lora_A, 0.0, module.in_features ** -0.5)
                init.zeros_(module.lora_B)
        elif isinstance(module, HeadRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConv):
            init.normal_(module.conv.weight, 0.0, std)
        elif isinstance(module, LolcatsAttention):
            init.constant_(module.window_factor, GAMMA_LOGIT)
        elif isinstance(module, FeatureMap) and module.name == "hedgehog":
            d_in, d_out = module.weight.shape[1:]
            init.copy_(module.weight, torch.eye(d_in, d_out).expand_as(module.weight))
            init.zeros_(module.bias)


class MixerModel(MixerPreTrainedModel):
    def __init__(self, config: MixerConfig):
        super().__init__(config)
        fla_backend.check(config.backend)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MixerDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None,
                inputs_embeds=None, form=None, past_key_values=None, **kwargs) -> MixerModelOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("mixer models do not take padded batches (attention_mask with zeros): "
                             "a recurrent state has no notion of masked positions; pass unpadded rows")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        cache = cache if isinstance(cache, MixerCache) else None
        if use_cache and cache is None:
            cache = MixerCache(len(self.layers))
        seen = cache.seen if cache is not None else 0
        positions = torch.arange(seen, seen + hidden.shape[1], device=hidden.device)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        if self.config.attention_transfer and self.training:
            return self._attention_transfer(hidden, rope, form)
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            hidden, state = layer(hidden, rope=rope, state=state, form=form)
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen = seen + hidden.shape[1]
        aux = [layer.self_attn.aux_loss for layer in self.layers if getattr(layer.self_attn, "aux_loss", None) is not None]
        aux_loss = self.config.aux_loss_coef * torch.stack(aux).mean() if aux and self.training else None
        return MixerModelOutput(last_hidden_state=self.norm(hidden), aux_loss=aux_loss,
                                **{CACHE: cache if use_cache else None})


    def _attention_transfer(self, hidden, rope, form) -> MixerModelOutput:
        """Stage 1 of linearizing (LoLCATs): the hidden states follow the teacher — softmax attention
        of each layer's own projections, frozen — while each layer's mixer, given the teacher's
        layer input, learns to reproduce the teacher's per-head attention output. No error travels
        across layers. The transfer loss comes back as `aux_loss` (the training loop adds and logs
        it); the language-model loss on the teacher's hidden states has no gradient.
            mse:          transfer_scale · mean_layers MSE(student heads, teacher heads)
            attention_ce: mean_layers cross-entropy(teacher softmax weights, student linear weights)"""
        losses = []
        for layer in self.layers:
            attn = layer.self_attn
            with torch.no_grad():
                x = layer.input_layernorm(hidden)
                teacher = attn.teacher_heads(x, rope)
            if self.config.transfer_loss == "attention_ce":
                losses.append(attention_weight_ce(attn, x, rope))
            else:
                student, _ = attn.heads_out(x, rope, None, form)
                losses.append(F.mse_loss(student.float(), teacher.float()) * self.config.transfer_scale)
            with torch.no_grad():
                hidden = hidden + attn.merge_heads(teacher)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return MixerModelOutput(last_hidden_state=self.norm(hidden), aux_loss=torch.stack(losses).mean(),
                                **{CACHE: None})


def attention_weight_ce(attn, x, rope) -> torch.Tensor:
    """Hedgehog's stage-1 loss: −Σ_i A_ti log Â_ti, A = softmax(q kᵀ/√d) (causal), Â = the linear
    attention's normalised weights φ(q)φ(k)ᵀ / Σ; quadratic in length, so train on short windows."""
    fmap = getattr(attn, "feature_map", None)
    if fmap is None:
        raise ValueError(f"transfer_loss attention_ce needs a feature-map mixer, not {type(attn).__name__}")
    q, k, _ = attn.project(x, rope)
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    with torch.no_grad():
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        target = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    lin = (fmap(q) @ fmap(k).transpose(-1, -2)).float().masked_fill(~causal, 0.0)
    pred = lin / (lin.sum(-1, keepdim=True) + 1e-12)
    return -(target * torch.log(pred + 1e-12)).sum(-1).mean()


class MixerForCausalLM(MixerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MixerConfig):
        super().__init__(config)
        self.model = MixerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.apply_trainable()

    def apply_trainable(self) -> None:
        """With `config.trainable` (name fragments), only matching parameters train: the
        feature maps and mixing weights in attention transfer, the adapters in LoRA."""
        if not self.config.trainable:
            return
        for name, p in self.named_parameters():
            p.requires_grad_(any(part in name for part in self.config.trainable))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.apply_trainable()  # loading may hand back fresh Parameters
        return model

    def merge_adapters(self) -> int:
        """Fold every LoRA adapter into its weight (same function), clear the adapter and
        training settings from the config, so the model saves as a plain mixer model."""
        n = lora.merge_all(self)
        self.config.lora_rank, self.config.trainable, self.config.attention_transfer = 0, None, False
        for p in self.parameters():
            p.requires_grad_(True)
        return n

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, inputs_embeds=None,
                labels=None, form=None, logits_to_keep: int = 0, past_key_values=None, **kwargs) -> MixerCausalLMOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                         past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds, form=form)
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
        return MixerCausalLMOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, **{CACHE: getattr(out, CACHE)})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        """Feed only the tokens the state has not seen yet."""
        state = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(state, MixerCache) and state.seen:
            input_ids = input_ids[:, state.seen:]
        else:
            state = None
        return {"input_ids": input_ids, CACHE: state, "use_cache": use_cache, "attention_mask": attention_mask}


def register() -> None:
    """Make `AutoConfig` / `AutoModel(ForCausalLM)` know `rewarm_mixer` (called on `import rewarm`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(MODEL_TYPE, MixerConfig, exist_ok=True)
    AutoModel.register(MixerConfig, MixerModel, exist_ok=True)
    AutoModelForCausalLM.register(MixerConfig, MixerForCausalLM, exist_ok=True)

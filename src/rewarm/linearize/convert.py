"""A pretrained Llama-family model → the same weights in rewarm.mixers' model with another
mixer in every attention layer. Everything the teacher had is copied (embeddings, norms, MLPs,
q/k/v/o projections); what it did not have (feature maps, mixing weights, gates, convs, extra
memories) starts at the mixer's own initialisation — and is what attention transfer trains."""
from __future__ import annotations

import torch

from rewarm.errors import UserError
from rewarm.mixers.modeling import MixerConfig, MixerForCausalLM

LAYER_KEYS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "input_layernorm.weight", "post_attention_layernorm.weight")
SUPPORTED = ("llama", "mistral", "rewarm_mixer")


def check_teacher(teacher: torch.nn.Module) -> None:
    """Refuse, with the reason, a model whose attention this conversion cannot find or replace."""
    cfg = teacher.config
    keys = set(teacher.state_dict())
    missing = [f"model.layers.0.{k}" for k in LAYER_KEYS if f"model.layers.0.{k}" not in keys]
    if cfg.model_type not in SUPPORTED or missing:
        raise UserError(
            f"cannot linearize a `{cfg.model_type}` model ({type(teacher).__name__}): rewarm replaces Llama-style "
            f"attention (LlamaAttention / MistralAttention: model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj "
            f"without biases, SwiGLU MLP, RMSNorm)" + (f"; missing {missing[0]}" if missing else "")
            + ". GPT-NeoX (fused query_key_value) and Qwen2 (q/k/v biases) are not supported yet.")
    if any(k.endswith("_proj.bias") for k in keys):
        raise UserError(f"cannot linearize {type(teacher).__name__}: its projections have biases (not supported yet).")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"cannot linearize {type(teacher).__name__}: rotary scaling `{rope.get('rope_type')}` "
                        "is not supported (plain RoPE only).")


def rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def student_config(teacher_cfg, mixer, **options) -> MixerConfig:
    """The teacher's shape with `mixer` in every layer (or a pattern) and the mixer's options."""
    fields = dict(
        vocab_size=teacher_cfg.vocab_size, hidden_size=teacher_cfg.hidden_size,
        intermediate_size=teacher_cfg.intermediate_size, num_hidden_layers=teacher_cfg.num_hidden_layers,
        num_attention_heads=teacher_cfg.num_attention_heads,
        num_key_value_heads=getattr(teacher_cfg, "num_key_value_heads", None) or teacher_cfg.num_attention_heads,
        head_dim=getattr(teacher_cfg, "head_dim", None), max_position_embeddings=teacher_cfg.max_position_embeddings,
        rms_norm_eps=teacher_cfg.rms_norm_eps, rope_theta=rope_theta(teacher_cfg),
        tie_word_embeddings=getattr(teacher_cfg, "tie_word_embeddings", False),
        bos_token_id=teacher_cfg.bos_token_id, eos_token_id=teacher_cfg.eos_token_id,
        pad_token_id=getattr(teacher_cfg, "pad_token_id", None), mixer=mixer,
    )
    try:
        return MixerConfig(**{**fields, **options})
    except ValueError as exc:
        raise UserError(f"linearize: {exc}") from None


def convert(teacher: torch.nn.Module, mixer, **options) -> tuple[MixerForCausalLM, list[str]]:
    """(student with the teacher's weights, names of the parameters the teacher did not have)."""
    check_teacher(teacher)
    torch.manual_seed(0)  # the new parameters' initialisation is part of the recipe: same every time
    student = MixerForCausalLM(student_config(teacher.config, mixer, **options))
    state = {k: v for k, v in teacher.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    result = student.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if "lora_" not in k]
    if unexpected:
        raise UserError(f"linearize: the teacher has weights the student has no place for: {unexpected[:3]}")
    if student.config.tie_word_embeddings:
        student.tie_weights()
    new = [k for k in result.missing_keys if k != "lm_head.weight"]
    return student, new


def new_parameter_fragments(new_names: list[str]) -> list[str]:
    """`model.layers.3.self_attn.feature_map.weight` → `self_attn.feature_map`: the trainable set of
    attention transfer as name fragments (short enough for config.json, the same in every layer)."""
    out = set()
    for name in new_names:
        if ".self_attn." in name:
            out.add("self_attn." + name.split(".self_attn.", 1)[1].split(".")[0])
        else:
            out.add(name)
    return sorted(out)

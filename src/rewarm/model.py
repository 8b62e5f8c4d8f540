"""Build, load and save causal LMs (HF transformers, safetensors).

Presets copy EleutherAI's Pythia GPT-NeoX settings (rotary on 25% of each head, parallel
residual, untied embeddings, vocab 50304); `tiny` is the same architecture sized for CPU demos.
`llama-tiny` and `smollm2-135m` are Llama-family shapes (RMSNorm, SwiGLU, GQA, tied embeddings).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from rewarm import atomic
from rewarm.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

_PYTHIA_COMMON = dict(
    model_type="gpt_neox",
    vocab_size=50304,
    max_position_embeddings=2048,
    hidden_act="gelu",
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    use_parallel_residual=True,
    tie_word_embeddings=False,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    bos_token_id=0,
    eos_token_id=0,
)

_LLAMA_COMMON = dict(
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_PYTHIA_COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, max_position_embeddings=1024, vocab_size=None),
    "pythia-14m": dict(_PYTHIA_COMMON, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "pythia-70m": dict(_PYTHIA_COMMON, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-160m": dict(_PYTHIA_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(_PYTHIA_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # Llama family (RMSNorm, SwiGLU, rotary on the whole head, grouped-query attention, tied embeddings)
    "llama-tiny": dict(_LLAMA_COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=344, max_position_embeddings=1024, vocab_size=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), for a from-scratch control
    "smollm2-135m": dict(_LLAMA_COMMON, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, max_position_embeddings=8192, vocab_size=49152,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}


def round_vocab(n: int, multiple: int = 64) -> int:
    return ((n + multiple - 1) // multiple) * multiple


MIXER_MODEL_TYPE = "rewarm_mixer"  # registered by rewarm.mixers on `import rewarm`


def _with_mixer(model_type: str, fields: dict, mixer, backend: str, origin: str) -> tuple[str, dict]:
    """A Llama-family shape with another sequence mixer is a `rewarm_mixer` model of the same fields."""
    if mixer is None or mixer == "softmax":
        return model_type, fields
    if model_type not in ("llama", MIXER_MODEL_TYPE):
        raise UserError(f"`model.mixer: {mixer}` needs a Llama-family shape (presets llama-tiny, smollm2-135m, or a "
                        f"Llama config); {origin} is {model_type}.")
    return MIXER_MODEL_TYPE, {**fields, "mixer": mixer, "backend": backend}


def build_config(preset: str | None, path: str | None, overrides: dict, tokenizer_len: int, vocab_size: int | None,
                 eos_id: int, mixer=None, mixer_backend: str = "auto"):
    """An HF config from a preset name or a config found at `path`, with overrides applied
    (and, with `mixer`, the same shape with another sequence mixer: see rewarm.mixers)."""

    if not preset and mixer not in (None, "softmax"):
        loaded = load_config(path)
        preset_fields = {k: v for k, v in loaded.to_dict().items() if k not in ("architectures", "auto_map")}
        model_type = preset_fields.pop("model_type")
        model_type, fields = _with_mixer(model_type, preset_fields, mixer, mixer_backend, f"the config of {path}")
        return _build_preset_config(model_type, fields, overrides, tokenizer_len, vocab_size, eos_id, keep_ids=True)
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown model preset `{preset}`{did_you_mean(preset, PRESETS)}. Choose one of: {', '.join(PRESETS)}.")
        fields = dict(PRESETS[preset])
        model_type = fields.pop("model_type")
        model_type, fields = _with_mixer(model_type, fields, mixer, mixer_backend, f"preset {preset}")
        return _build_preset_config(model_type, fields, overrides, tokenizer_len, vocab_size, eos_id)
    config = load_config(path)
    apply_overrides(config, overrides)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    check_vocab(config.vocab_size, tokenizer_len)
    return config


def _build_preset_config(model_type: str, fields: dict, overrides: dict, tokenizer_len: int, vocab_size: int | None,
                         eos_id: int, keep_ids: bool = False):
    """A config of `model_type` from preset-like `fields`, with `model.overrides` applied."""
    from transformers import AutoConfig

    if fields.get("vocab_size") is None:
        fields["vocab_size"] = round_vocab(tokenizer_len)
    if not keep_ids:
        fields["bos_token_id"] = fields["eos_token_id"] = eos_id
    # the shape a per-layer mixer list is checked against is the one after the overrides
    first = {**fields, **({"num_hidden_layers": overrides["num_hidden_layers"]}
                          if "mixer" in fields and "num_hidden_layers" in (overrides or {}) else {})}
    try:
        config = AutoConfig.for_model(model_type, **first)
    except ValueError as exc:  # the mixer config's own checks (an unknown mixer name, with its did-you-mean)
        raise UserError(f"`model.mixer`: {exc}") from None
    apply_overrides(config, overrides)  # checks the keys first
    # then build again with them, so fields derived at construction (Llama's head_dim) follow
    try:
        config = AutoConfig.for_model(model_type, **{**fields, **(overrides or {})})
    except Exception as exc:  # transformers' own validation (ValueError, or huggingface_hub's class errors)
        cause = exc.__cause__ or exc
        raise UserError(f"the model does not build or run with this config ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''}). Check `model.overrides` "
                        f"({overrides}).") from None
    if vocab_size is not None:
        config.vocab_size = vocab_size
    check_vocab(config.vocab_size, tokenizer_len)
    return config


def check_vocab(model_vocab: int, tokenizer_len: int) -> None:
    if model_vocab < tokenizer_len:
        raise UserError(
            f"the model's vocab ({model_vocab}) is smaller than the tokenizer's ({tokenizer_len}): some token ids "
            f"would have no embedding. Set model.vocab_size >= {tokenizer_len} or use the model's own tokenizer."
        )


def apply_overrides(config, overrides: dict) -> None:
    """`model.overrides` on an HF config, the same for presets, copied configs and loaded models."""
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise UserError(f"`model.overrides.{key}` is not a field of {type(config).__name__}"
                            f"{did_you_mean(key, config.to_dict())}.")
        setattr(config, key, value)
    shape = {"hidden_size", "num_attention_heads"} & set(overrides or {})
    if shape and "head_dim" not in (overrides or {}) and getattr(config, "head_dim", None):
        config.head_dim = config.hidden_size // config.num_attention_heads  # derived, not free: keep it consistent


def load_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load a model config from `{path}`: {str(exc).splitlines()[0]}. "
                        f"Pass an HF model directory, a rewarm checkpoint directory, or a hub id (with internet).") from None


def init_scratch(config, seed: int) -> torch.nn.Module:
    """Random weights, seeded so the same config + seed gives the same model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_pretrained(path: str, revision: str | None = None, overrides: dict | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Weights from a local HF directory, a rewarm checkpoint, or a hub id + revision (safetensors only)."""
    from transformers import AutoModelForCausalLM

    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{local} has no config.json: not an HF model directory. Point model.path at a run's final/ or checkpoints/step_N.")
    config = load_config(path, revision, trust_remote_code)
    apply_overrides(config, overrides or {})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, revision=revision, dtype=torch.float32, use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError (truncated or not safetensors)
        if not isinstance(exc, (OSError, ValueError)) and "Safetensor" not in type(exc).__name__:
            raise
        raise UserError(
            f"could not load model weights from `{path}`"
            f"{' revision ' + revision if revision else ''}: {str(exc).splitlines()[0]}. "
            f"rewarm loads safetensors weights only; re-save the model with safe_serialization."
        ) from None
    return model


def save_model(model: torch.nn.Module, out_dir: str | Path, tokenizer=None, state_dict: dict | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Save as an HF directory (safetensors) under a temp name, then rename into place.
    `state_dict` (a gathered full state) is saved instead of the module's own when given;
    `extra_files` (name → text) are written inside before the rename, so they appear together."""
    out = Path(out_dir)
    tmp = atomic.temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    atomic.require_free(out.parent, int(weights * 1.1), f"the model {out.name}/")
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except Exception as exc:
        atomic.fail_if_disk_full(exc, tmp, f"the model {out}")
        raise
    return atomic.commit(tmp, out)


def count_params(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters; with `exclude_embeddings`, without the input embedding and an untied output
    embedding (the convention of Kaplan et al. and Pythia's "non-embedding" counts, which scaling
    laws use; a tied head is the input embedding and is counted once, by `parameters()`)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        emb = model.get_input_embeddings().weight
        n -= emb.numel()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and head.weight is not emb:
            n -= head.weight.numel()
    return n

import pytest
import torch
from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

from rewarm.errors import UserError
from rewarm.model import build_config, count_params, init_scratch, load_pretrained, save_model


@pytest.mark.parametrize("name,params", [("pythia-14m", 14_067_712), ("pythia-70m", 70_426_624), ("pythia-160m", 162_322_944)])
def test_pythia_presets_match_eleutherai_parameter_counts(name, params):
    # EleutherAI's published totals for vocab 50304 (HF model cards / config.json)
    config = build_config(name, None, {}, 50277, None, 0)
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    assert count_params(model) == params
    assert config.rope_parameters["partial_rotary_factor"] == 0.25 and config.use_parallel_residual


def test_tiny_vocab_covers_tokenizer_and_rejects_small_vocab():
    cfg = build_config("tiny", None, {}, 8193, None, 0)
    assert cfg.vocab_size == 8256  # rounded up to a multiple of 64
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        build_config("tiny", None, {}, 8193, 8000, 0)
    with pytest.raises(UserError, match="did you mean `pythia-70m`"):
        build_config("pythia-70", None, {}, 100, None, 0)


def test_save_and_load_through_the_hub_code_path(tmp_path):
    cfg = build_config("tiny", None, {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}, 300, None, 0)
    model = init_scratch(cfg, seed=3)
    out = save_model(model, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    loaded = load_pretrained(str(out))  # a local directory is a valid hub id
    plain = AutoModelForCausalLM.from_pretrained(out)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(plain.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])
    with pytest.raises(UserError, match="no config.json"):
        load_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="could not load a model config from .*missing-model.*hub id"):
        load_pretrained(str(tmp_path / "missing-model"), revision="step143000")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(UserError, match="could not load model weights from .*noweights.*safetensors"):
        load_pretrained(str(tmp_path / "noweights"))


def test_overrides_apply_the_same_to_presets_and_loaded_models(tmp_path):
    """`model.overrides` goes through one function whether the config comes from a preset or a saved model."""
    small = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    out = save_model(init_scratch(build_config("tiny", None, small, 300, None, 0), seed=3), tmp_path / "m")
    loaded = load_pretrained(str(out), overrides={"attention_dropout": 0.25, "layer_norm_eps": 1e-3})
    preset = build_config("tiny", None, {**small, "attention_dropout": 0.25, "layer_norm_eps": 1e-3}, 300, None, 0)
    assert (loaded.config.attention_dropout, loaded.config.layer_norm_eps) == (0.25, 1e-3)
    assert (preset.attention_dropout, preset.layer_norm_eps) == (0.25, 1e-3)
    for bad in (lambda: load_pretrained(str(out), overrides={"hiden_size": 64}),
                lambda: build_config("tiny", None, {"hiden_size": 64}, 300, None, 0)):
        with pytest.raises(UserError, match="`model.overrides.hiden_size` is not a field.*did you mean `hidden_size`"):
            bad()


def test_same_seed_same_init():
    cfg = build_config("tiny", None, {"num_hidden_layers": 1}, 300, None, 0)
    a, b = init_scratch(cfg, 1), init_scratch(cfg, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

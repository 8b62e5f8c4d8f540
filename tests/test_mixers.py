"""rewarm.mixers: every mixer's naive / recurrent / chunkwise forms compute the same function
(values in fp32, gradients in fp64), a state carried across calls equals one call, and the
mixer models generate with the recurrent state exactly what step-by-step decoding gives."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rewarm  # noqa: F401  (registers the mixer model with transformers)
from rewarm.mixers import delta, local, scan
from rewarm.mixers.feature_maps import FeatureMap
from rewarm.mixers.modeling import MixerConfig, MixerForCausalLM
from rewarm.mixers.registry import MIXERS, layer_mixers

B, H, T, D, C = 2, 3, 37, 8, 8  # T is not a multiple of the chunk C
LINEAR = [m for m in MIXERS if m != "softmax"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def qkv(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3)]


def tiny_config(mixer, **kw):
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, mixer=mixer, chunk_size=C, window=6, block_size=5, num_memories=3)
    return MixerConfig(**{**base, **kw})


# ---- kernels ------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [False, True])
def test_linear_scan_forms_agree_and_carry_state(decay):
    q, k, v = qkv()
    ld = F.logsigmoid(torch.randn(B, H, T)) if decay else None
    ref = scan.naive(q, k, v, ld)
    rec, s_rec = scan.recurrent(q, k, v, ld)
    chk, s_chk = scan.chunkwise(q, k, v, ld, chunk=C)
    assert rel_err(rec, ref) <= 1e-5 and rel_err(chk, ref) <= 1e-5
    assert rel_err(s_chk, s_rec) <= 1e-5
    cut = 13
    first, s = scan.chunkwise(q[..., :cut, :], k[..., :cut, :], v[..., :cut, :],
                              None if ld is None else ld[..., :cut], chunk=C)
    second, _ = scan.chunkwise(q[..., cut:, :], k[..., cut:, :], v[..., cut:, :],
                               None if ld is None else ld[..., cut:], state=s, chunk=C)
    assert rel_err(torch.cat([first, second], dim=-2), ref) <= 1e-5


def test_normalised_linear_attention_is_katharopoulos():
    """φ(q)ᵀS_t / (φ(q)ᵀz_t + ε) written out with explicit sums."""
    q, k, v = (F.elu(x) + 1 for x in qkv())
    got, _ = scan.normalised(scan.chunkwise, q, k, v, eps=1e-6, chunk=C)
    scores = (q @ k.transpose(-1, -2)).tril()
    want = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    assert rel_err(got, want) <= 1e-5


def test_delta_rule_forms_agree_and_match_the_update_written_out():
    q, k, v = qkv()
    k = F.normalize(k, dim=-1)
    beta = torch.rand(B, H, T)
    s = torch.zeros(B, H, D, D)
    want = []
    for t in range(T):  # S_t = (I − β k kᵀ) S_{t−1} + β k vᵀ, o_t = S_tᵀ q_t
        kt = k[..., t, :, None]
        s = (torch.eye(D) - beta[..., t, None, None] * kt @ kt.transpose(-1, -2)) @ s \
            + beta[..., t, None, None] * kt @ v[..., t, None, :]
        want.append((s.transpose(-1, -2) @ q[..., t, :, None]).squeeze(-1))
    want = torch.stack(want, dim=-2)
    ref = delta.naive(q, k, v, beta)
    rec, s_rec = delta.recurrent(q, k, v, beta)
    chk, s_chk = delta.chunkwise(q, k, v, beta, chunk=C)
    for got in (ref, rec, chk):
        assert rel_err(got, want) <= 1e-5
    assert rel_err(s_chk, s) <= 1e-5 and rel_err(s_rec, s) <= 1e-5


@pytest.mark.parametrize("span", [local.Span(window=5), local.Span(block=6)], ids=["sliding", "block"])
def test_local_softmax_forms_agree_and_carry_state(span):
    q, k, v = qkv()
    ref = local.naive(q, k, v, span)
    assert rel_err(local.recurrent(q, k, v, span)[0], ref) <= 1e-5
    assert rel_err(local.chunkwise(q, k, v, span, chunk=C)[0], ref) <= 1e-5
    first, s = local.chunkwise(q[..., :11, :], k[..., :11, :], v[..., :11, :], span, chunk=4)
    second, s = local.recurrent(q[..., 11:20, :], k[..., 11:20, :], v[..., 11:20, :], span, state=s)
    third, s = local.chunkwise(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], span, state=s, chunk=C)
    assert rel_err(torch.cat([first, second, third], dim=-2), ref) <= 1e-5
    assert s[0].shape[-2] <= span.reach  # the state stays O(window), not O(T)


def test_hedgehog_feature_map_starts_as_the_identity_projection():
    fmap = FeatureMap("hedgehog", H, D)
    x = torch.randn(B, H, T, D)
    assert torch.allclose(fmap(x), torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1))
    assert FeatureMap("hedgehog", H, D, feature_dim=16)(x).shape[-1] == 32
    with pytest.raises(ValueError, match="unknown feature map"):
        FeatureMap("cosine", H, D)


# ---- blocks: the whole mixer (projections, convs, gates, norms) ----------------------------------

@pytest.mark.parametrize("name", list(MIXERS))
def test_block_forms_agree_in_fp32_and_state_carries(name):
    torch.manual_seed(0)
    block = MIXERS[name](tiny_config(name), 0).eval()
    x = torch.randn(B, T, 48)
    with torch.no_grad():
        ref = block(x, form="naive")[0]
        rec = block(x, form="recurrent")[0]
        chk = block(x, form="chunkwise")[0]
        first, s = block(x[:, :13], form="chunkwise")
        second, s = block(x[:, 13:14], state=s, form="recurrent")
        third, _ = block(x[:, 14:], state=s, form="chunkwise")
    assert rel_err(rec, ref) <= 1e-5 and rel_err(chk, ref) <= 1e-5
    assert rel_err(torch.cat([first, second, third], dim=1), ref) <= 1e-5


@pytest.mark.parametrize("name", LINEAR)
def test_block_gradients_chunkwise_equal_naive_in_fp64(name):
    torch.manual_seed(0)
    block = MIXERS[name](tiny_config(name), 0).double()
    x = torch.randn(B, 19, 48, dtype=torch.float64)
    grads = {}
    for form in ("naive", "chunkwise"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out = block(xi, form=form)[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads[form] = [xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]
    assert len(grads["naive"]) == len(grads["chunkwise"]) > 4
    for a, b in zip(grads["chunkwise"], grads["naive"]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_naive_form_refuses_a_state():
    block = MIXERS["deltanet"](tiny_config("deltanet"), 0)
    _, state = block(torch.randn(1, 4, 48), form="chunkwise")
    with pytest.raises(ValueError, match="carries no state"):
        block(torch.randn(1, 4, 48), state=state, form="naive")


def test_mixture_of_memories_routes_each_token_to_k_memories_and_balances():
    torch.manual_seed(0)
    block = MIXERS["mom"](tiny_config("mom", memory_top_k=2), 0)
    x = torch.randn(B, T, 48)
    weights, chosen, probs = block.route(x)
    assert torch.equal(chosen.sum(1), torch.full((B, T), 2.0))
    assert torch.allclose(weights.sum(1), torch.ones(B, T)) and torch.equal(weights > 0, chosen > 0)
    block(x)
    f = chosen.mean(dim=(0, 2)) / 2
    assert block.aux_loss.item() == pytest.approx(3 * (f * probs.mean(dim=(0, 1))).sum().item())
    assert block.aux_loss.item() >= 1.0 - 1e-6  # M·Σ f·P ≥ 1, equality when perfectly balanced


# ---- the model ----------------------------------------------------------------------------------

def test_layer_patterns():
    assert layer_mixers("transnormer", 4) == ["diag_attention"] * 2 + ["norm_attention"] * 2
    assert layer_mixers("deltanet/softmax@4", 8) == ["deltanet"] * 3 + ["softmax"] + ["deltanet"] * 3 + ["softmax"]
    assert layer_mixers(["mom", "liger"], 2) == ["mom", "liger"]
    with pytest.raises(ValueError, match="did you mean `deltanet`"):
        layer_mixers("deltanett", 2)
    with pytest.raises(ValueError, match="names 1 layers but the model has 2"):
        layer_mixers(["mom"], 2)


@pytest.mark.parametrize("name", [*LINEAR, "transnormer", "deltanet/softmax@2"])
def test_generate_matches_step_by_step_recurrent_decoding(name):
    torch.manual_seed(0)
    model = MixerForCausalLM(tiny_config(name)).eval()
    prompt = torch.randint(0, 97, (1, 9))
    fed = []
    forward = model.model.forward

    def spy(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    model.model.forward = spy
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.model.forward = forward
    assert fed == [9] + [1] * 7  # the prompt once, then one token at a time on the carried state
    ids = prompt
    with torch.no_grad():  # by hand: prefill chunkwise, then the recurrent form token by token
        out = model(ids, use_cache=True)
        for _ in range(8):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            out = model(nxt, cache=out.cache, use_cache=True, form="recurrent")
        full = model(ids[:, :-1], use_cache=False, form="naive").logits
    assert torch.equal(got, ids)
    assert full[:, -1].argmax(-1).item() == ids[0, -1].item()


def test_padded_batches_are_refused_with_a_reason():
    model = MixerForCausalLM(tiny_config("deltanet"))
    with pytest.raises(ValueError, match="padded"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


def test_saved_models_load_with_automodel_after_import_rewarm_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    names = ["hedgehog", "liger", "deltanet", "transnormer", "mom", "deltanet/softmax@2"]
    ids = torch.randint(0, 97, (1, 12))
    for i, name in enumerate(names):
        model = MixerForCausalLM(tiny_config(name)).eval()
        model.save_pretrained(tmp_path / str(i))
        torch.save(model(ids, use_cache=False).logits.detach(), tmp_path / f"{i}.pt")
        assert {p.name for p in (tmp_path / str(i)).iterdir()} >= {"config.json", "model.safetensors"}
    script = f"""
import torch, rewarm
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids.tolist()})
for i in range({len(names)}):
    m = AutoModelForCausalLM.from_pretrained(r"{tmp_path}/" + str(i)).eval()
    assert type(m).__name__ == "MixerForCausalLM", type(m)
    assert torch.equal(m(ids, use_cache=False).logits, torch.load(r"{tmp_path}/" + str(i) + ".pt")), i
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-linear-attention kernels need CUDA (a lent GPU)")
def test_fla_backend_matches_torch_on_cuda():
    pytest.importorskip("fla")
    from rewarm.mixers import fla_backend

    for name in ("deltanet", "gla", "hedgehog"):
        torch.manual_seed(0)
        block = MIXERS[name](tiny_config(name, backend="torch"), 0).cuda()
        x = torch.randn(2, 256, 48, device="cuda")
        want = block(x, form="chunkwise")[0]
        with fla_backend.forced(block):
            got = block(x, form="chunkwise")[0]
        assert rel_err(got, want) <= 1e-3, name

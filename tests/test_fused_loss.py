"""The fused head + cross-entropy gives the unfused loss and gradients on a real HF model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewarm.fused_loss import head_and_backbone, linear_cross_entropy, lm_loss
from rewarm.model import build_config, init_scratch


def _model(vocab: int = 1000):
    cfg = build_config("tiny", None, {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                       "intermediate_size": 64}, vocab, vocab, 0)
    return init_scratch(cfg, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_matches_unfused_loss_and_every_gradient(reduction):
    torch.manual_seed(0)
    windows = torch.randint(0, 1000, (3, 41))
    grads = []
    losses = []
    for fused in (False, True):
        model = _model()
        loss = lm_loss(model, windows, reduction=reduction, fused=fused)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunks_bias_and_no_grad_paths():
    torch.manual_seed(1)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    ref = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    ref_grads = torch.autograd.grad(ref, (hidden, weight, bias))
    got = linear_cross_entropy(hidden, weight, bias, targets, chunk=8)  # 37 rows: 4 full chunks and a partial one
    got_grads = torch.autograd.grad(got, (hidden, weight, bias))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, bias, targets, chunk=8).item() == pytest.approx(ref.item(), rel=1e-6)


def test_only_plain_hf_models_take_the_fused_path():
    model = _model()
    assert head_and_backbone(model) is not None
    assert head_and_backbone(torch.nn.Sequential(model)) is None
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style capping: logits are not head(hidden)
    assert head_and_backbone(model) is None

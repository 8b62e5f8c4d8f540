"""Degeneration as RETRO-fitting papers measure it: the share of repeated n-grams in greedy
continuations (Welleck et al. 2019's seq-rep-n: 1 − unique n-grams / n-grams; n = 4)."""
from __future__ import annotations

import torch


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (1, T), recomputing the whole sequence each step (a RETRO
    model retrieves for whole chunks; the same path with retrieval off keeps the comparison fair)."""
    ids = prompt
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(model(input_ids=ids, use_cache=False).logits[0, -1].float().argmax())
        out.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return out


def repetition(model, prompts: torch.Tensor, new_tokens: int = 64, n: int = 4) -> dict:
    """Mean seq-rep-n over the prompts (rows of token ids), and the continuations' token counts."""
    was = model.training
    model.eval()
    try:
        rates = [repetition_rate(greedy(model, p[None], new_tokens), n) for p in prompts]
    finally:
        model.train(was)
    return {f"rep_{n}": sum(rates) / len(rates), "prompts": len(rates), "new_tokens": new_tokens}

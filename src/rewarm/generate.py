"""Continuations of fixed prompts: what forgetting and adaptation read like, not only what they measure.

Greedy by default, so the same weights give the same text; with a temperature the sampling uses
its own seeded generator, never the global RNG that training draws from (sampling during a run
must not change the run's numbers).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)


def _cache_arg(model) -> str:
    """The KV-cache argument and output field: `cache` (transformers >= 5.2x) or `past_key_values` (before)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@torch.no_grad()
def continue_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, temperature: float = 0.0,
                     seed: int = 0, device: torch.device | None = None) -> list[str]:
    """The model's continuation of each prompt (the new text only), one prompt at a time with a KV cache
    (or, for a model that says `needs_full_sequence` — a RETRO model retrieving — the whole sequence each step)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    eos = tokenizer.eos_token_id
    max_pos = getattr(model.config, "max_position_embeddings", None)
    out = []
    cache_arg = _cache_arg(model)
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] == 0:  # an empty prompt: start from the end-of-text token, as a document would
                ids = torch.tensor([[eos if eos is not None else 0]], device=device)
            keep = None if max_pos is None else max(1, max_pos - max_new_tokens)
            if keep is not None and ids.shape[1] > keep:  # as a sliding context would: the prompt's end matters
                log.warning("a prompt of %d tokens leaves no room for %d new ones in the model's %d positions; "
                            "continuing its last %d tokens", ids.shape[1], max_new_tokens, max_pos, keep)
                ids = ids[:, -keep:]
            budget = max_new_tokens if max_pos is None else max(0, min(max_new_tokens, max_pos - ids.shape[1]))
            new: list[int] = []
            past, step_ids = None, ids
            for _ in range(budget):
                if getattr(model, "needs_full_sequence", False):
                    res = model(input_ids=torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=device)], 1)
                                if new else ids, use_cache=False)
                else:
                    res = model(input_ids=step_ids, use_cache=True, **{cache_arg: past})
                past, logits = getattr(res, cache_arg), res.logits[0, -1].float().cpu()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(logits.argmax())
                if eos is not None and token == eos:
                    break
                new.append(token)
                step_ids = torch.tensor([[token]], device=device)
            out.append(tokenizer.decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out

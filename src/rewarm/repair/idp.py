"""Scoring a compressed model through soft prompts: one prompt for every input, or inference-time
dynamic prompting (IDP, Hoang et al. 2023) — per input, one of K prompts chosen by the input itself.

Selection rule (the paper's method section was not reachable offline; this is its description as
implemented here): all K prompts are placed before the input in one forward; the prompt whose
positions receive the most attention from the input's tokens (summed over those tokens, averaged
over layers and heads) is chosen, and the input is then scored with that prompt alone. In lm-eval's
multiple-choice tasks the choice is made on the context only, so every answer of one question is
scored with the same prompt and the answer never influences which prompt is used.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import torch
from lm_eval.models.huggingface import HFLM


@torch.no_grad()
def prompt_attention(model: torch.nn.Module, prompts: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(K,) attention mass the input `ids` give each of the K prompts (K × P × h), placed before it."""
    k, p, h = prompts.shape
    device = model.get_input_embeddings().weight.device
    emb = model.get_input_embeddings()(torch.tensor([ids], device=device))
    x = torch.cat([prompts.reshape(1, k * p, h).to(emb.dtype).to(device), emb], dim=1)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
    try:
        out = model(inputs_embeds=x, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    att = torch.stack([a[0].float() for a in out.attentions])  # (layers, heads, S, S)
    mass = att[:, :, k * p:, : k * p].sum(dim=2).mean(dim=(0, 1))  # from every input token to each prompt position
    return mass.view(k, p).sum(-1)


def choose(model: torch.nn.Module, prompts: torch.Tensor, ids: list[int]) -> int:
    """IDP's choice for one input: the most-attended prompt (the first of equals: deterministic)."""
    scores = prompt_attention(model, prompts, ids)
    return int(torch.nonzero(scores == scores.max())[0])


class PromptedLM(HFLM):
    """lm-eval's HF model with a soft prompt before every input: `mode="single"` uses prompts[0] for
    everything, `mode="idp"` chooses per context. `record` (a dict) receives the chosen-prompt
    histogram per task and the extra tokens spent on selection."""

    def __init__(self, *args, prompts: torch.Tensor, mode: str = "single", record: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts = prompts.to(self.device)
        self.mode = mode
        self.active: int | None = None
        self.record = record if record is not None else {}
        self._task_of: dict = {}

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.active is None:
            return super()._model_call(inps, attn_mask, labels)
        prompt = self.prompts[self.active]
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype or torch.float32,
                                             enabled=self.mixed_precision_dtype is not None):
            emb = self.model.get_input_embeddings()(inps)
            x = torch.cat([prompt.to(emb.dtype).unsqueeze(0).expand(len(inps), -1, -1), emb], dim=1)
            return self.model(inputs_embeds=x, use_cache=False).logits[:, prompt.shape[0]:]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._task_of = {tuple(r.args): getattr(r, "task_name", None) or "?" for r in requests}
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.mode == "single":
            self.active = 0
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            finally:
                self.active = None
        chosen: dict[tuple, int] = {}
        hist = self.record.setdefault("chosen_prompts", defaultdict(Counter))
        for (strings, context, _) in requests:
            key = tuple(context)
            if key not in chosen:
                chosen[key] = choose(self.model, self.prompts, list(context))
                hist[self._task_of.get(tuple(strings), "?")][chosen[key]] += 1
                self.record["selection_tokens"] = self.record.get("selection_tokens", 0) + len(context) + self.prompts.shape[0] * self.prompts.shape[1]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (_, context, _) in enumerate(requests):
            groups[chosen[tuple(context)]].append(i)
        results: list = [None] * len(requests)
        for k, idx in sorted(groups.items()):
            self.active = k
            try:
                for i, r in zip(idx, super()._loglikelihood_tokens([requests[i] for i in idx], disable_tqdm, override_bs)):
                    results[i] = r
            finally:
                self.active = None
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        from rewarm.errors import UserError

        raise UserError("soft prompts are applied to log-likelihood (multiple-choice) tasks only; drop generation tasks "
                        "from --tasks when scoring with --prompt.")

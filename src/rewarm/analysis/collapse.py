"""A collapse alarm (Yang et al. 2024, "The butterfly effect of model editing: few edits can trigger
large language models collapse").

A single bad update can wreck a model while the training loss looks ordinary for a while. The
paper's cheap detector is the perplexity of a fixed set of ordinary sentences: ME-PPL, the mean over
sentences of exp(mean token NLL of the sentence). A collapsed model's ME-PPL jumps by orders of
magnitude; ordinary training moves it by a few percent. rewarm computes it at every eval and raises
the alarm when it exceeds `factor` × its step-0 value.

The built-in set (`sentences.txt`, 100 short neutral English sentences) was written for this
project; `eval.collapse.sentences: PATH` takes one sentence per line instead.
"""
from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from rewarm.errors import UserError


def load_sentences(spec: str) -> list[str]:
    """`builtin` or a text file with one sentence per line (blank lines ignored)."""
    if spec == "builtin":
        text = resources.files("rewarm.analysis").joinpath("sentences.txt").read_text(encoding="utf-8")
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"`eval.collapse.sentences`: {spec} is not a file. Give `builtin` or a text file with "
                            f"one sentence per line.")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            raise UserError(f"`eval.collapse.sentences`: {spec} is not UTF-8 text (a binary file?). Give a text file "
                            f"with one sentence per line, or `builtin`.")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise UserError(f"`eval.collapse.sentences`: {spec} holds no sentences (one per line). Use `builtin` or "
                        f"add sentences.")
    return sentences


def encode(tokenizer, sentences: list[str], max_tokens: int | None = None) -> list[torch.Tensor]:
    """Token ids per sentence, each with at least 2 tokens (one prediction); shorter ones are dropped,
    longer ones than `max_tokens` (the model's positions) cut to fit."""
    out = []
    for s in sentences:
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids  # the first word is predicted from the start of text
        ids = ids[:max_tokens] if max_tokens else ids
        if len(ids) >= 2:
            out.append(torch.tensor(ids, dtype=torch.long))
    if not out:
        raise UserError("`eval.collapse.sentences`: every sentence encodes to fewer than 2 tokens; nothing to score.")
    return out


@torch.no_grad()
def me_ppl(model: torch.nn.Module, encoded: list[torch.Tensor], device: torch.device | str = "cpu",
           batch: int = 16) -> float:
    """Mean over sentences of exp(mean next-token NLL of the sentence), right-padded batches."""
    was_training = model.training
    model.eval()
    ppls = []
    try:
        for i in range(0, len(encoded), batch):
            chunk = encoded[i:i + batch]
            width = max(len(x) for x in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, x in enumerate(chunk):
                ids[j, :len(x)], mask[j, :len(x)] = x, 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                  reduction="none").view(len(chunk), -1)
            m = mask[:, 1:].float()
            per_sentence = (nll * m).sum(1) / m.sum(1)
            ppls += torch.exp(per_sentence.double()).tolist()
    finally:
        model.train(was_training)
    finite = [p if math.isfinite(p) else math.inf for p in ppls]
    return sum(finite) / len(finite)

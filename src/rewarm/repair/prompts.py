"""Soft prompts (Lester et al. 2021) for a compressed model: P virtual tokens, trained on next-token
loss over a prepared shard while every weight of the model stays frozen — the repair that changes
no weight (Xu et al. 2023, "Soft prompt recovers compressed LLMs"; Hoang et al. 2023 train several).

A prompt is a directory: `prompt.safetensors` (the P × hidden embeddings) and `prompt.json` (the
model it belongs to, by its weights' and tokenizer's fingerprints; the data; the loss before/after
on the shard's held-out windows), written atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from rewarm import atomic
from rewarm.errors import UserError


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex) over the weights' names, shapes and a strided sample of their values:
    a prompt trained for one model is refused by another (a compressed copy has other weights)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        h.update(name.encode() + str(tuple(p.shape)).encode() + sample)
    return h.hexdigest()[:16]


def windows_from(split: np.ndarray, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """n random windows of seq_len + 1 tokens from a split (seeded)."""
    if len(split) < seq_len + 2:
        raise UserError(f"the data has {len(split)} tokens in this split, fewer than one window of {seq_len + 1}.")
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(split) - seq_len - 1, size=n)
    return torch.from_numpy(np.stack([np.asarray(split[s:s + seq_len + 1], dtype=np.int64) for s in starts]))


def prompted_loss(model: torch.nn.Module, prompt: torch.Tensor | None, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of `windows` with `prompt` (P × h) before each (None: no prompt)."""
    import torch.nn.functional as F

    inputs, targets = windows[:, :-1], windows[:, 1:]
    emb = model.get_input_embeddings()(inputs)
    if prompt is not None:
        emb = torch.cat([prompt.to(emb.dtype).unsqueeze(0).expand(len(inputs), -1, -1), emb], dim=1)
    logits = model(inputs_embeds=emb, use_cache=False).logits
    logits = logits[:, -targets.shape[1]:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def train_prompt(model: torch.nn.Module, train: np.ndarray, val: np.ndarray, *, virtual_tokens: int = 16,
                 steps: int = 200, batch: int = 8, seq_len: int = 256, lr: float = 3e-3, seed: int = 0,
                 eval_windows: int = 16, progress: bool = True) -> dict:
    """A soft prompt trained on `train` (Adam on the prompt alone); returns it with its losses.
    Initialised from the embeddings of random vocabulary tokens (Lester et al.'s best simple start)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    table = model.get_input_embeddings().weight
    init_ids = torch.randint(0, table.shape[0], (virtual_tokens,))
    prompt = torch.nn.Parameter(table[init_ids].detach().clone().float())
    opt = torch.optim.Adam([prompt], lr=lr)
    held_out = windows_from(val, seq_len, eval_windows, seed + 1)
    with torch.no_grad():
        before = float(prompted_loss(model, None, held_out))
    losses, started = [], time.perf_counter()
    bar = tqdm(range(steps), desc="prompt", unit="step", disable=not progress)
    for step in bar:
        loss = prompted_loss(model, prompt, windows_from(train, seq_len, batch, seed * 1_000_003 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    with torch.no_grad():
        after = float(prompted_loss(model, prompt, held_out))
    if not math.isfinite(after):
        raise UserError(f"prompt training diverged (held-out loss {after}); lower --lr (now {lr}).")
    return {"prompt": prompt.detach(), "held_out_loss_without": before, "held_out_loss_with": after,
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "seconds": time.perf_counter() - started, "tokens": steps * batch * seq_len}


def save_prompt(out: Path, prompt: torch.Tensor, info: dict) -> Path:
    from safetensors.torch import save_file

    tmp = atomic.temp_path(out)
    tmp.mkdir(parents=True)
    save_file({"prompt": prompt.contiguous()}, str(tmp / "prompt.safetensors"))
    (tmp / "prompt.json").write_text(json.dumps(info, indent=2))
    return atomic.commit(tmp, out)


def load_prompt(path: str | Path, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """(P × h prompt, its record); with `model`, refused unless it is the model the prompt was trained for."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "prompt.safetensors").is_file() or not (p / "prompt.json").is_file():
        raise UserError(f"{p} is not a soft prompt (no prompt.safetensors / prompt.json): make one with "
                        f"`rewarm repair prompt MODEL --data NAME=SHARDS -o {p}`.")
    info = json.loads((p / "prompt.json").read_text())
    prompt = load_file(str(p / "prompt.safetensors"))["prompt"]
    if model is not None:
        fp = model_fingerprint(model)
        if info.get("model_fingerprint") != fp:
            raise UserError(f"the soft prompt {p} was trained for another model ({info.get('model')}, fingerprint "
                            f"{info.get('model_fingerprint')}; this one is {fp}). A prompt repairs the exact weights it "
                            f"was trained with: train one for this model.")
    return prompt, info

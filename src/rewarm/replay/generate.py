"""`rewarm replay generate`: sample text from the frozen initial model and write it as an ordinary
prepared shard directory, which a config mixes like any replay source (`weight: 0.05`).

Replay needs the pre-training data, which users of released models do not have. WSRL (Zhou et al.
2024) warms up online RL on the pretrained policy's own rollouts instead of its offline data; the
language-model analogue is replaying the model's own samples: they carry what the model knew, in
the model's own distribution. Sampling: ancestral (temperature, no top-k / top-p), batched, with a
KV cache (transformers' `generate`), each batch seeded from `seed`, so the same model, settings and
seed give the same text on CPU. A sample ends at the end-of-text token or after `length` tokens.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rewarm import atomic
from rewarm.errors import UserError

log = logging.getLogger(__name__)


def _prompts(prompts_file: str | None, unconditional: bool) -> list[str] | None:
    if prompts_file and unconditional:
        raise UserError("--prompts and --unconditional exclude each other: pick one.")
    if not prompts_file and not unconditional:
        raise UserError("say what to sample from: --unconditional (from the start-of-text token) or --prompts FILE "
                        "(one prompt per line).")
    if unconditional:
        return None
    path = Path(prompts_file)
    if not path.is_file():
        raise UserError(f"--prompts {prompts_file} is not a file (one prompt per line).")
    lines = [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    if not lines:
        raise UserError(f"--prompts {prompts_file} holds no prompts (one per line).")
    return lines


def _require_lm_head(model_dir: str) -> None:
    """A base model (e.g. GPTNeoXModel) would load as a causal LM with a random head and generate noise."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        return  # a hub id: transformers resolves it
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"{model_dir} holds a {archs[0]}, which has no language-modelling head to generate with "
                        f"(it would get a random one). Give a causal LM, e.g. final/ of a rewarm run.")


def generate_replay(model_dir: str, out_dir: str | Path, tokens: int, temperature: float = 1.0,
                    prompts_file: str | None = None, unconditional: bool = False, length: int = 256,
                    batch: int = 16, seed: int = 0, tokenizer: str | None = None, overwrite: bool = False,
                    progress: bool = True, cpu: bool = False) -> dict:
    """Sample about `tokens` new tokens and prepare them into `out_dir`; returns its meta.json."""
    from transformers import AutoTokenizer

    from rewarm.data.prepare import prepare
    from rewarm.model import load_pretrained
    from rewarm.model_store import resolve

    if tokens < 1:
        raise UserError(f"--tokens must be a positive number of tokens to generate, got {tokens}.")
    if not temperature > 0:
        raise UserError(f"--temperature must be > 0 (1.0 samples the model's own distribution), got {temperature}.")
    for flag, value in (("--length", length), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}.")
    prompts = _prompts(prompts_file, unconditional)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists. Pass --overwrite to replace it, or choose another -o.")
    model_dir = resolve(model_dir, "model")
    _require_lm_head(model_dir)
    model = load_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer or model_dir)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise UserError("the tokenizer has neither a start- nor an end-of-text token to start unconditional samples from.")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and length >= max_pos:
        raise UserError(f"--length {length} leaves no room in the model's {max_pos} positions. Lower --length.")
    device = torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    model.to(device).eval()
    eos = tok.eos_token_id
    texts, made, started, i = [], 0, time.perf_counter(), 0
    bar = tqdm(total=tokens, unit="tok", desc="sampling", disable=not progress)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    while made < tokens:
        if prompts is None:
            ids = torch.full((batch, 1), start, dtype=torch.long)
            mask = torch.ones_like(ids)
        else:
            chunk = [prompts[(i * batch + j) % len(prompts)] for j in range(batch)]
            # a prompt longer than the positions left after `length` new tokens keeps its end
            tok.truncation_side = "left"
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=True, truncation=max_pos is not None,
                      max_length=(max_pos - length) if max_pos is not None else None)
            ids, mask = enc.input_ids, enc.attention_mask
        torch.manual_seed(seed * 1_000_003 + i)  # each batch its own seed: the same text on every rerun
        with torch.no_grad():
            seq = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=length,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
        for row in seq[:, ids.shape[1]:].tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            made += len(row)
            if row:
                texts.append(tok.decode(row, skip_special_tokens=True))
        bar.update(min(made, tokens) - bar.n)
        i += 1
    bar.close()
    seconds = time.perf_counter() - started
    tmp = atomic.temp_path(out.with_name(out.name + "-samples"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        samples = tmp / "samples.jsonl"
        samples.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()))
        meta = prepare([str(samples)], str(tokenizer or model_dir), out, val_tokens=0, seed=seed, overwrite=overwrite,
                       progress=False)
        meta["sources"] = [str(out / "samples.jsonl")]  # the text as kept beside the shards
        meta["generated"] = {"model": str(model_dir), "temperature": temperature, "tokens_generated": made,
                             "samples": len(texts), "length": length, "batch": batch, "seed": seed,
                             "prompts": str(prompts_file) if prompts else "unconditional",
                             "tokens_per_s": round(made / seconds, 1), "device": device.type}
        atomic.write_json(out / "meta.json", meta)
        shutil.copy(samples, out / "samples.jsonl")  # the text itself, to read
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated %d tokens in %d samples at %.0f tokens/s -> %s", made, len(texts), made / seconds, out)
    return meta

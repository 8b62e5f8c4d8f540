"""Linear-time mixers vs softmax attention on this CPU (`make bench`, or alone:
`python benchmarks/mixers.py [--quick] [--only speed|decode|quality]`).

1. speed: one mixer block (same width and heads), forward + backward at sequence lengths 256 to
   16k: time per token and the activation memory autograd saves for backward per token (counted
   exactly with saved-tensor hooks), as ratios to softmax (torch SDPA) at the same length, and
   the first length at which each mixer is faster than softmax.
2. decode: a small model of each mixer: tokens/s generating 32 tokens after a 4k / 16k-token
   context, on the recurrent state vs softmax's KV cache.
3. quality: tiny Llama-shaped models trained from scratch with each mixer on the demo's upstream
   corpus (Shakespeare + King James Bible), same width, depth, tokens and seed: held-out loss.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import rewarm  # noqa: F401  (registers the mixer model)
from rewarm.mixers.modeling import MixerConfig, MixerForCausalLM
from rewarm.mixers.registry import MIXERS

SPEED_MIXERS = ["softmax", "hedgehog", "gla", "liger", "deltanet", "norm_attention", "diag_attention", "mom"]


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


def block_config(name: str) -> MixerConfig:
    return MixerConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8, mixer=name, feature_dim=32, backend="torch")


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while `fn` runs (each storage once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def fwd_bwd(block, x, reps: int) -> tuple[float, int]:
    mem, out = saved_bytes(lambda: block(x, form="chunkwise")[0])
    out.sum().backward()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        block(x, form="chunkwise")[0].sum().backward()
        times.append(time.perf_counter() - start)
    return min(times), mem


def section_speed(lengths: list[int]) -> None:
    rows, first_faster = {}, {}
    for name in SPEED_MIXERS:
        torch.manual_seed(0)
        block = MIXERS[name](block_config(name), 0)
        for t in lengths:
            x = torch.randn(1, t, 512, requires_grad=True)
            sec, mem = fwd_bwd(block, x, reps=2 if t <= 4096 else 1)
            rows[(name, t)] = (sec, mem)
    out = []
    for name in SPEED_MIXERS:
        cells = []
        for t in lengths:
            sec, mem = rows[(name, t)]
            base_sec, base_mem = rows[("softmax", t)]
            cells.append(f"{1e6 * sec / t:,.0f} µs, {mem / t / 1024:,.1f} KiB ({base_sec / sec:.2f}x, {mem / base_mem:.2f}x mem)")
            if name != "softmax" and name not in first_faster and sec < base_sec:
                first_faster[name] = t
        out.append([name, *cells, f"{first_faster[name]:,}" if name in first_faster else
                    ("–" if name == "softmax" else f"not up to {lengths[-1]:,}")])
    table("mixers 1. one block (hidden 512, 8 heads), forward + backward per token: time, saved activations "
          "(speed-up and memory vs softmax SDPA at the same length)",
          ["mixer", *[f"T = {t:,}" for t in lengths], "faster than softmax from"], out)


def small_model(name: str) -> MixerForCausalLM:
    torch.manual_seed(0)
    cfg = MixerConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, mixer=name, feature_dim=32,
                      max_position_embeddings=32768, backend="torch")
    return MixerForCausalLM(cfg).eval()


@torch.no_grad()
def decode_rate(model, context: int, new: int = 32) -> float:
    ids = torch.randint(0, 1024, (1, context))
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    cache = out.cache
    for _ in range(new):
        out = model(nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return new / (time.perf_counter() - start)


def state_bytes(state) -> int:
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, (tuple, list)):
        return sum(state_bytes(s) for s in state)
    return 0


def section_decode(contexts: list[int]) -> None:
    rows = []
    base = {}
    for name in SPEED_MIXERS:
        model = small_model(name)
        cells = []
        for c in contexts:
            rate = decode_rate(model, c)
            with torch.no_grad():
                state = model(torch.randint(0, 1024, (1, c)), use_cache=True).cache.states
            if name == "softmax":
                base[c] = rate
            cells.append(f"{rate:,.0f} tok/s ({rate / base[c]:.2f}x), state {state_bytes(state) / 2**20:,.1f} MiB")
        rows.append([name, *cells])
    table("mixers 2. decoding 32 tokens after a long context (4 layers, hidden 256): tokens/s "
          "(vs softmax's KV cache) and the carried state",
          ["mixer", *[f"context {c:,}" for c in contexts]], rows)


def section_quality(steps: int) -> None:
    from rewarm import corpora
    from rewarm.config import config_from_dict
    from rewarm.data.prepare import prepare
    from rewarm.data.sources import ReadStats, file_documents
    from rewarm.tokenizer import train_tokenizer
    from rewarm.train import train

    with tempfile.TemporaryDirectory() as tmp:
        texts = [*corpora.shakespeare_modern(), corpora.king_james_bible()]
        tok = train_tokenizer(file_documents([Path(p) for p in texts], "text", ReadStats()), 4096, Path(tmp) / "tok")
        shards = Path(tmp) / "upstream"
        prepare([str(p) for p in texts], str(tok), shards, val_fraction=0.02, progress=False)
        rows, base = [], None
        for name in ["softmax", "hedgehog", "linear", "gla", "liger", "deltanet", "transnormer", "mom",
                     "deltanet/softmax@2"]:
            cfg = {
                "out_dir": str(Path(tmp) / "runs" / name.replace("/", "_")), "seed": 0,
                "model": {"preset": "llama-tiny", "mixer": name, "mixer_backend": "torch"},
                "data": {"train": [{"name": "upstream", "path": str(shards)}],
                         "eval": [{"name": "upstream", "path": str(shards)}]},
                "train": {"seq_len": 128, "global_batch": 16, "micro_batch": 16, "max_steps": steps,
                          "precision": "fp32", "num_threads": os.cpu_count() or 1},
                "schedule": {"name": "cosine", "max_lr": 3e-3, "min_lr": 3e-4, "warmup": 0.05},
                "eval": {"interval": steps, "tokens": 32768, "batch": 16},
                "checkpoint": {"interval": 0},
            }
            start = time.perf_counter()
            run = train(config_from_dict(cfg), progress=False)
            seconds = time.perf_counter() - start
            loss = json.loads(run.summary.read_text())["final"]["upstream"]
            base = loss if base is None else base
            rows.append([name, f"{loss:.4f}", f"{loss - base:+.4f}", f"{steps * 16 * 128 / seconds:,.0f}"])
        table(f"mixers 3. quality: llama-tiny shape (4 layers, hidden 128), {steps} steps x 2,048 tokens from scratch "
              "on Shakespeare + KJV, seed 0: held-out loss (nats/token)",
              ["mixer", "held-out loss", "vs softmax", "train tokens/s"], rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("speed", "decode", "quality"))
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.time()
    if args.only in (None, "speed"):
        section_speed([256, 1024] if args.quick else [256, 1024, 4096, 16384])
    if args.only in (None, "decode"):
        section_decode([1024] if args.quick else [4096, 16384])
    if args.only in (None, "quality"):
        section_quality(20 if args.quick else 150)
    print(f"\nmixer benchmarks finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

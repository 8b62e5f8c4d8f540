"""GPU checks and numbers (CUDA): what the CPU suite cannot show. Run where a GPU is:

    PYTHONPATH=src python benchmarks/gpu_check.py

1. a Llama-family run (tiny, random init) in bf16 on CUDA: trains, samples text, resumes
   (same numbers to rounding: CUDA's embedding backward adds with atomics);
2. SmolLM2-135M's shape (random init, vocab 49,152) at seq 2048: rewarm vs a bare PyTorch loop
   in bf16, eager and compiled, MFU against the bf16 GEMM peak measured here;
3. activation checkpointing at seq 2048: peak CUDA memory and speed, on and off.
Every number is printed as measured in this process (ratios against the bare loop beside them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewarm import corpora
from rewarm.config import config_from_dict
from rewarm.data.mixture import Mixture, Source
from rewarm.data.prepare import prepare
from rewarm.data.shards import TokenShards
from rewarm.data.sources import ReadStats, file_documents
from rewarm.model import build_config, init_scratch
from rewarm.tokenizer import train_tokenizer
from rewarm.train import train


def gemm_peak(dtype=torch.bfloat16, n=8192, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(model, seq):
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and "embed_in" not in name)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_cfg(out, shards, preset, seq, batch, micro, steps, **extra):
    raw = {"out_dir": str(out), "model": {"preset": preset, **extra.pop("model", {})},
           "data": {"train": [{"name": "code", "path": str(shards)}], "eval": [{"name": "code", "path": str(shards)}]},
           "train": {"seq_len": seq, "global_batch": batch, "micro_batch": micro, "max_steps": steps, "precision": "bf16",
                     "device": "cuda", **extra.pop("train", {})},
           "schedule": {"name": "cosine", "max_lr": 3e-4, "min_lr": 3e-5, "warmup": 2},
           "eval": {"interval": 10**6, "tokens": seq * 8, **extra.pop("eval", {})},
           "checkpoint": {"interval": extra.pop("ckpt", 0), "keep_last": 5}}
    return config_from_dict(raw)


def check_llama(tmp, shards):
    over = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 688}
    extra = dict(model={"overrides": over}, eval={"interval": 10, "samples": {"prompts": ["def main(", "import os"],
                                                                             "max_new_tokens": 12}}, ckpt=10)
    full = train(run_cfg(tmp / "llama", shards, "llama-tiny", 256, 16, 8, 20, **json.loads(json.dumps(extra))), progress=False)
    ev = metrics(full.path)
    tr = [e for e in ev if e["event"] == "train"]
    samples = [e for e in ev if e["event"] == "samples"]
    print(f"1. llama-tiny bf16 on CUDA: loss {tr[0]['loss']:.3f} -> {tr[-1]['loss']:.3f}; samples at steps "
          f"{[e['step'] for e in samples]}: {samples[-1]['samples'][0]}; start event device {ev[0]['device']}, "
          f"peak_cuda_mb {ev[0].get('peak_cuda_mb')}")
    # resume: the same run again, cut after its step-10 checkpoint, continued
    r = tmp / "llama_r"
    train(run_cfg(r, shards, "llama-tiny", 256, 16, 8, 20, **json.loads(json.dumps(extra))), progress=False)
    shutil.rmtree(r / "checkpoints" / "step_000020")
    shutil.rmtree(r / "final")
    (r / "summary.json").unlink()
    cfg = run_cfg(r, shards, "llama-tiny", 256, 16, 8, 20, **json.loads(json.dumps(extra)))
    cfg.init = "resume"
    train(cfg, progress=False)
    a = [e["loss"] for e in metrics(full.path) if e["event"] == "train"]
    b = [e["loss"] for e in metrics(r) if e["event"] == "train"]
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"   same config twice, the second cut at step 10 and resumed: all 20 losses equal: {a == b}; "
          f"largest relative difference {worst:.2e}", flush=True)


def bare_loop(model, windows, compiled=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model
    times = []
    for x in windows:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return x.shape[0] * (x.shape[1] - 1) / statistics.median(times[3:])


def check_smollm2_shape(tmp, shards, vocab):
    seq, batch, steps = 2048, 8, 12
    peak = gemm_peak()
    print(f"2. measured bf16 GEMM peak (8192^3): {peak / 1e12:.0f} TFLOP/s")
    m = Mixture([Source("code", TokenShards(shards), 1.0)], seq, batch, 0)
    windows = [torch.from_numpy(m.batch(i)[0]).cuda() for i in range(steps)]
    rows = []
    for compiled in (False, True):
        model = init_scratch(build_config("smollm2-135m", None, {}, vocab, 49152, 0), 0).cuda()
        fpt = flops_per_token(model, seq)
        bare = bare_loop(model, windows, compiled)
        del model
        torch.cuda.empty_cache()
        run = train(run_cfg(tmp / f"s{compiled}", shards, "smollm2-135m", seq, batch, batch, steps,
                            train={"compile": compiled}), progress=False)
        tps = statistics.median([e["tokens_per_s"] for e in metrics(run.path) if e["event"] == "train"][3:])
        rows.append((compiled, bare, tps, fpt))
        print(f"   {'compiled' if compiled else 'eager'}: bare {bare:,.0f} tok/s, rewarm {tps:,.0f} tok/s "
              f"(rewarm/bare {tps / bare:.2f}), rewarm MFU {100 * tps * fpt / peak:.1f}%", flush=True)
    return rows


def check_activation_checkpointing(tmp, shards):
    for ac in (False, True):
        torch.cuda.reset_peak_memory_stats()
        run = train(run_cfg(tmp / f"ac{ac}", shards, "smollm2-135m", 2048, 16, 16, 6,
                            train={"activation_checkpointing": ac}), progress=False)
        ev = metrics(run.path)
        tps = statistics.median([e["tokens_per_s"] for e in ev if e["event"] == "train"][2:])
        print(f"3. seq 2048 x micro-batch 16, activation checkpointing {'on ' if ac else 'off'}: "
              f"{tps:,.0f} tok/s, peak CUDA memory {ev[-1]['summary']['peak_cuda_mb']:,.0f} MB", flush=True)


def main():
    argparse.ArgumentParser(description=__doc__).parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        code = corpora.python_stdlib(limit_bytes=6_000_000)
        tok = train_tokenizer(file_documents(code[:200], "text", ReadStats()), 8192, tmp / "tok")
        shards = tmp / "code"
        prepare([str(f) for f in code], str(tok), shards, val_fraction=0.02, progress=False)
        print(f"data ready in {time.time() - t0:.0f} s", flush=True)
        for name, fn in (("llama", lambda: check_llama(tmp, shards)),
                         ("smollm2", lambda: check_smollm2_shape(tmp, shards, 8192)),
                         ("ac", lambda: check_activation_checkpointing(tmp, shards))):
            try:
                fn()
            except Exception as exc:  # report and go on: one failing check must not hide the others
                import traceback

                traceback.print_exc()
                print(f"CHECK {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
    print(f"gpu checks finished in {time.time() - t0:.0f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

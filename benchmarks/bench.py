"""rewarm benchmarks: ratios against baselines measured in this same process, on this machine.

    python benchmarks/bench.py [--quick]          (what `make bench` runs)

1. training throughput and MFU: rewarm's trainer vs a bare PyTorch loop vs transformers.Trainer
2. bf16 autocast and torch.compile, as ratios to fp32 eager (rewarm's trainer)
3. data preparation: `rewarm prepare` vs datasets.map(batched=True); peak RSS at 1x and 4x corpus
4. evaluation throughput vs the bare loop's forward
5. data-loader share of the training step
6. a real pretrained LLM (SmolLM2-135M, `rewarm models install smollm2-135m`): rewarm vs bare loop
   vs transformers.Trainer in fp32 and bf16, MFU; activation checkpointing at seq 2048 (peak RSS)

Each number is the median over measured steps after warm-up. MFU = model FLOPs / measured
dense-GEMM peak of this machine in the same precision, with model FLOPs per token =
6 * N_matmul + 12 * n_layers * d_model * seq_len  (N_matmul: parameters of all matrix
multiplies, i.e. everything but the input embedding and norms; the second term is attention).
Token ids come from a real 8k BPE over real text; for the vocab-50304 rows the same ids feed
a model with a 50304-wide head (the cost depends on the model's vocab, not on the ids).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rewarm import corpora
from rewarm.config import config_from_dict
from rewarm.data.mixture import Mixture, Source
from rewarm.data.prepare import prepare
from rewarm.data.shards import TokenShards
from rewarm.data.sources import ReadStats, file_documents
from rewarm.evaluate import EvalSet, evaluate
from rewarm.model import build_config, init_scratch
from rewarm.tokenizer import load_tokenizer, train_tokenizer
from rewarm.train import train

SHAPES = {
    "tiny": {},
    "pythia-14m": {"num_hidden_layers": 6},  # tiny's width (128) with Pythia-14m's depth
}


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The best of `reps` n x n GEMMs: a peak, so MFU is not flattered by one slow repeat."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and "embed_in" not in name)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def model_config(shape: str, vocab: int):
    over = dict(SHAPES[shape])
    return build_config("tiny", None, over, vocab, vocab, 0)


def bare_loop(shape, vocab, seq, batch, windows, steps, precision="fp32"):
    model = init_scratch(model_config(shape, vocab), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    times = []
    for i in range(steps + 2):
        x = torch.from_numpy(windows[i % len(windows)])
        t = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = model(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return batch * seq / statistics.median(times[2:]), model


def _time_hf_trainer(model, windows, batch: int, steps: int, **training_args) -> float:
    """Median seconds per step of transformers.Trainer on `windows`, after 2 warm-up steps."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = np.concatenate(windows)[: batch * steps]
    ds = Dataset.from_dict({"input_ids": rows[:, :-1].tolist(), "labels": rows[:, :-1].tolist()})
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
                                 disable_tqdm=True, **training_args)
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[Timer()]).train()
    return statistics.median(times[2:])


def hf_trainer(shape, vocab, seq, batch, windows, steps):
    model = init_scratch(model_config(shape, vocab), 0)
    return batch * seq / _time_hf_trainer(model, windows, batch, steps + 2, learning_rate=1e-4, weight_decay=0.1)


def rewarm_trainer(shape, vocab, seq, batch, shards, steps, tmp, precision="fp32", compile_=False, name="r"):
    over = dict(SHAPES[shape])
    raw = {
        "out_dir": str(Path(tmp) / f"{name}_{shape}_{vocab}_{seq}_{precision}_{compile_}"),
        "model": {"preset": "tiny", "overrides": over, "vocab_size": vocab},
        "data": {"train": [{"name": "code", "path": str(shards)}]},
        "train": {"seq_len": seq, "global_batch": batch, "micro_batch": batch, "max_steps": steps + 3,
                  "precision": precision, "compile": compile_},
        "schedule": {"name": "constant", "max_lr": 1e-4, "warmup": 0},
        "eval": {"interval": 10**6},
    }
    run = train(config_from_dict(raw), progress=False, overwrite=True)
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r["event"] == "train"][3:]
    return statistics.median(tps)


def table(title, header, rows):
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def section_train(tmp, shards, tok_vocab, quick):
    steps = 3 if quick else 4
    peak32 = gemm_peak(torch.float32)
    peak16 = gemm_peak(torch.bfloat16, n=512 if gemm_peak(torch.bfloat16, n=256, reps=1) < peak32 / 10 else 2048)
    print(f"measured dense GEMM peak (2048^2): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s", flush=True)
    mix = Mixture([Source("code", TokenShards(shards), 1.0)], 1024, 8, 0)
    rows = []
    grid = [("tiny", 8192, 256)] if quick else [(s, v, q) for s in SHAPES for v in (8192, 50304) for q in (256, 1024)]
    for shape, vocab, seq in grid:
        batch = 4096 // seq  # 4,096 tokens per step
        m = Mixture([Source("code", TokenShards(shards), 1.0)], seq, batch, 0)
        windows = [m.batch(i)[0] for i in range(steps + 2)]
        bare, model = bare_loop(shape, vocab, seq, batch, windows, steps)
        ours = rewarm_trainer(shape, vocab, seq, batch, shards, steps, tmp)
        hf = hf_trainer(shape, vocab, seq, batch, windows, steps)
        mfu = ours * flops_per_token(model, seq) / peak32
        rows.append([shape, vocab, seq, batch, f"{bare:,.0f}", f"{ours:,.0f}", f"{hf:,.0f}",
                     f"{ours / bare:.2f}", f"{ours / hf:.2f}", f"{100 * mfu:.1f}%"])
    table("1. Training throughput, fp32 eager (tokens/s)",
          ["shape", "vocab", "seq", "batch", "bare loop", "rewarm", "HF Trainer", "rewarm / bare", "rewarm / HF", "rewarm MFU"], rows)
    del mix

    # 2. bf16 and compile on tiny / 8192 / 256
    batch, seq = 16, 256
    m = Mixture([Source("code", TokenShards(shards), 1.0)], seq, batch, 0)
    base = rewarm_trainer("tiny", 8192, seq, batch, shards, steps, tmp)
    # without bf16 matrix units bf16 GEMMs are ~100x slower: measure, but with few steps
    bf16_steps = steps if peak16 > peak32 else 2
    bf16 = rewarm_trainer("tiny", 8192, seq, batch, shards, bf16_steps, tmp, precision="bf16")
    comp = rewarm_trainer("tiny", 8192, seq, batch, shards, steps + 4, tmp, compile_=True)
    comp16 = rewarm_trainer("tiny", 8192, seq, batch, shards, bf16_steps + 4, tmp, precision="bf16", compile_=True)
    _, model = bare_loop("tiny", 8192, seq, batch, [m.batch(0)[0]] * 3, 1)
    fpt = flops_per_token(model, seq)

    def mfu16(tok_s: float) -> str:
        # without bf16 units autocast keeps some GEMMs in fp32, so a bf16 "MFU" would exceed 100%
        return f"{100 * tok_s * fpt / peak16:.1f}%" if peak16 > peak32 / 10 else "n/a (no bf16 units)"

    table("2. Precision and compile (rewarm trainer, tiny, vocab 8192, seq 256, batch 16)",
          ["configuration", "tokens/s", "ratio to fp32 eager", "MFU (vs same-precision peak)"],
          [["fp32 eager", f"{base:,.0f}", "1.00", f"{100 * base * fpt / peak32:.1f}%"],
           ["bf16 autocast", f"{bf16:,.0f}", f"{bf16 / base:.2f}", mfu16(bf16)],
           ["fp32 + compile", f"{comp:,.0f}", f"{comp / base:.2f}", f"{100 * comp * fpt / peak32:.1f}%"],
           ["bf16 + compile", f"{comp16:,.0f}", f"{comp16 / base:.2f}", mfu16(comp16)]])

    # 4. evaluation vs the bare loop's forward
    es = EvalSet.from_shards("code", TokenShards(shards), seq, 16 * seq * 8)
    model.eval()
    evaluate(model, [es], 16)
    t = time.perf_counter()
    evaluate(model, [es], 16)
    ours = es.tokens / (time.perf_counter() - t)
    with torch.no_grad():
        t = time.perf_counter()
        for i in range(0, es.windows.shape[0], 16):
            x = es.windows[i : i + 16]
            logits = model(input_ids=x[:, :-1]).logits
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        bare_fwd = es.tokens / (time.perf_counter() - t)
    table("4. Evaluation throughput (tiny, vocab 8192, seq 256)", ["rewarm evaluate", "bare forward + loss", "ratio"],
          [[f"{ours:,.0f}", f"{bare_fwd:,.0f}", f"{ours / bare_fwd:.2f}"]])

    # 5. data-loader share
    t = time.perf_counter()
    for i in range(50):
        m.batch(1000 + i)
    per_batch = (time.perf_counter() - t) / 50
    step_time = batch * seq / base
    table("5. Data-loader overhead (Mixture.batch per step)", ["batch build (ms)", "train step (ms)", "share"],
          [[f"{per_batch * 1e3:.2f}", f"{step_time * 1e3:.0f}", f"{100 * per_batch / step_time:.2f}%"]])


PEAK_RSS = """
def peak_rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

PREP_CHILD = PEAK_RSS + """
import sys, time
import transformers.models.auto.tokenization_auto  # imports are not part of the measurement
from rewarm.data.prepare import prepare
files = sys.argv[3:]
t = time.perf_counter()
meta = prepare(files, sys.argv[1], sys.argv[2], val_fraction=0.01, progress=False, overwrite=True)
dt = time.perf_counter() - t
print(meta["train"]["tokens"] + meta["val"]["tokens"], dt, peak_rss_kb())
"""

MAP_CHILD = PEAK_RSS + """
import sys, time
from datasets import Dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
docs = [open(f, encoding="utf-8", errors="replace").read() for f in sys.argv[2:]]
ds = Dataset.from_dict({"text": docs})
t = time.perf_counter()
out = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
n = sum(len(x) for x in out["input_ids"])
print(n, time.perf_counter() - t, peak_rss_kb())
"""


def section_prepare(tmp, tok_dir, quick):
    files = [str(f) for f in corpora.python_stdlib(limit_bytes=3_000_000 if not quick else 1_000_000)]
    # 4x corpus: four copies of the same files
    import shutil

    big = []
    for k in range(4):
        d = Path(tmp) / f"copy{k}"
        d.mkdir(exist_ok=True)
        for i, f in enumerate(files):
            copy = d / f"{i:05d}_{Path(f).name}"
            if not copy.exists():
                shutil.copyfile(f, copy)
            big.append(str(copy))
    rows = []
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    def child(code: str, *argv: str) -> tuple[int, float, int]:
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        return int(out[0]), float(out[1]), int(out[2])

    for label, inputs in (("1x", files), ("4x", big)):
        for f in inputs:  # both sides read from the page cache, not whoever runs first from disk
            Path(f).read_bytes()
        # alternate the two, twice each, and keep each one's faster run
        runs = [(child(PREP_CHILD, str(tok_dir), str(Path(tmp) / f"prep{label}"), *inputs),
                 child(MAP_CHILD, str(tok_dir), *inputs)) for _ in range(2)]
        n, dt, rss = min((r[0] for r in runs), key=lambda x: x[1])
        n2, dt2, rss2 = min((r[1] for r in runs), key=lambda x: x[1])
        rows.append([label, f"{n:,}", f"{n / dt:,.0f}", f"{n2 / dt2:,.0f}", f"{(n / dt) / (n2 / dt2):.2f}",
                     f"{rss / 1024:.0f}", f"{rss2 / 1024:.0f}"])
    table("3. Data preparation (stdlib code, 8k BPE)", ["corpus", "tokens", "rewarm prepare tok/s", "datasets.map tok/s",
                                                     "ratio", "prepare peak RSS (MB)", "map peak RSS (MB)"], rows)


def section_prepare_one_document(tmp, tok_dir, quick):
    """Peak RSS of `rewarm prepare` on ONE document of 10 / 50 / 100 MB, as one line and as many lines:
    flat in the document's size means the document is never held whole (ratio vs the 10 MB run)."""
    text = "".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in corpora.shakespeare_modern())
    rows, base = [], {}
    for mb in ((10, 50) if quick else (10, 50, 100)):
        for shape in ("many lines", "one line"):
            doc = Path(tmp) / f"one_{mb}_{shape.replace(' ', '_')}.txt"
            block = text if shape == "many lines" else text.replace("\n", " ")
            with open(doc, "w", encoding="utf-8") as fh:
                left = mb << 20  # characters (the text is nearly all ASCII: ~bytes)
                while left > 0:
                    fh.write(block[:left])
                    left -= len(block)
            out = subprocess.run([sys.executable, "-c", PREP_CHILD, str(tok_dir), str(Path(tmp) / "one_out"), str(doc)],
                                 capture_output=True, text=True, check=True).stdout.split()
            n, dt, rss = int(out[0]), float(out[1]), int(out[2])
            base.setdefault(shape, rss)
            rows.append([f"{mb} MB", shape, f"{n:,}", f"{n / dt:,.0f}", f"{rss / 1024:.0f}", f"{rss / base[shape]:.2f}"])
            doc.unlink()
    table("3b. prepare on one large document (Shakespeare text repeated)",
          ["document", "shape", "tokens", "tok/s", "peak RSS (MB)", "RSS vs 10 MB"], rows)


def _real_windows(model_dir: str, tmp: str, seq: int, batch: int, n: int):
    shards = Path(tmp) / "real_code"
    if not (shards / "meta.json").exists():
        prepare([str(f) for f in corpora.python_stdlib(limit_bytes=600_000)], model_dir, shards, val_fraction=0.05,
                progress=False)
    m = Mixture([Source("code", TokenShards(shards), 1.0)], seq, batch, 0)
    return shards, [m.batch(i)[0] for i in range(n)]


def _load(model_dir: str):
    from rewarm.model import load_pretrained

    return load_pretrained(model_dir)


def _bare_real(model_dir, windows, precision):
    model = _load(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    times = []
    for x in map(torch.from_numpy, windows):
        t = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            logits = model(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return windows[0].shape[0] * (windows[0].shape[1] - 1) / statistics.median(times[2:]), model


def _hf_real(model_dir, windows, precision):
    batch, seq = windows[0].shape[0], windows[0].shape[1] - 1
    return batch * seq / _time_hf_trainer(_load(model_dir), windows, batch, len(windows), learning_rate=1e-5,
                                          bf16=precision == "bf16")


def _rewarm_real(model_dir, shards, seq, batch, steps, tmp, precision, extra=None, subprocess_run=False):
    raw = {
        "out_dir": str(Path(tmp) / f"real_{seq}_{batch}_{precision}_{'_'.join(f'{k}{v}' for k, v in (extra or {}).items())}"),
        "init": "weights",
        "model": {"path": model_dir}, "data": {"train": [{"name": "code", "path": str(shards)}]},
        "train": {"seq_len": seq, "global_batch": batch, "micro_batch": batch, "max_steps": steps, "precision": precision,
                  **(extra or {})},
        "schedule": {"name": "constant", "max_lr": 1e-5, "warmup": 0}, "eval": {"interval": 10**6},
    }
    if subprocess_run:  # peak RSS is a per-process high-water mark: one process per configuration
        import yaml

        cfg = Path(tmp) / f"{Path(raw['out_dir']).name}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        subprocess.run([sys.executable, "-m", "rewarm", "train", str(cfg), "-q", "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(raw["out_dir"]) / "metrics.jsonl").read_text().splitlines()]
    else:
        run = train(config_from_dict(raw), progress=False, overwrite=True)
        rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if r["event"] == "train"][2:]
    end = [r for r in rows if r["event"] == "end"][-1]["summary"]
    return statistics.median(tps), end.get("peak_rss_train_mb", end.get("peak_rss_mb"))


def section_real(tmp, quick, long_only=False):
    from rewarm.model_store import installed, models_dir

    if "smollm2-135m" not in installed():
        print(f"\n## 6. SmolLM2-135M\n\nskipped: not installed in {models_dir()} (rewarm models install smollm2-135m)")
        return
    model_dir = str(models_dir() / "smollm2-135m")
    seq, batch, n = 256, 8, 4 if quick else 5
    shards, windows = _real_windows(model_dir, tmp, seq, batch, n)
    peak32, peak16 = gemm_peak(torch.float32), gemm_peak(torch.bfloat16, n=256, reps=1)
    has_bf16 = peak16 > peak32 / 10
    rows = []
    for precision in () if long_only else ("fp32", "bf16") if has_bf16 else ("fp32",):
        bare, model = _bare_real(model_dir, windows, precision)
        fpt = flops_per_token(model, seq)
        del model
        ours, _ = _rewarm_real(model_dir, shards, seq, batch, n, tmp, precision)
        hf = _hf_real(model_dir, windows, precision)
        peak = peak32 if precision == "fp32" else gemm_peak(torch.bfloat16)
        rows.append([precision, f"{bare:,.0f}", f"{ours:,.0f}", f"{hf:,.0f}", f"{ours / bare:.2f}", f"{ours / hf:.2f}",
                     f"{100 * ours * fpt / peak:.1f}%"])
    if not has_bf16:
        rows.append(["bf16", "n/a", "n/a", "n/a", "n/a", "n/a",
                     f"not measured: no bf16 units (bf16 GEMM {peak16 / 1e9:.1f} GFLOP/s vs fp32 {peak32 / 1e9:.0f})"])
    if not long_only:
        table(f"6. SmolLM2-135M training, seq {seq} x batch {batch} (tokens/s; targets: >= 1.1x bare, >= 1.0x HF, "
              f"MFU >= 60% of the fp32 GEMM peak {peak32 / 1e9:.0f} GFLOP/s)",
              ["precision", "bare loop", "rewarm", "HF Trainer", "rewarm / bare", "rewarm / HF", "rewarm MFU"], rows)
    if quick:
        return
    long_rows = []
    for ac in (False, True):
        tps, rss = _rewarm_real(model_dir, shards, 2048, 1, 4, tmp, "fp32", {"activation_checkpointing": ac}, True)
        long_rows.append(["on" if ac else "off", f"{tps:,.0f}", f"{rss:,.0f}"])
    table("6b. SmolLM2-135M at seq 2048 x batch 1, fp32: activation checkpointing (one process each; RSS "
          "high-water mark of the training steps, model loading excluded)",
          ["activation checkpointing", "tokens/s", "peak RSS of training (MB)"], long_rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one shape, fewer steps (a smoke run)")
    p.add_argument("--only", choices=("real", "real-long"), help="run one section only (real-long: table 6b alone)")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in ("real", "real-long"):
            section_real(tmp, args.quick, long_only=args.only == "real-long")
            print(f"\nbenchmarks finished in {time.time() - t0:.0f} s")
            return
        stats = ReadStats()
        code = corpora.python_stdlib(limit_bytes=4_000_000)
        tok_dir = train_tokenizer(file_documents(code[: len(code) // 2], "text", stats), 8192, Path(tmp) / "tok")
        shards = Path(tmp) / "code"
        prepare([str(f) for f in code], str(tok_dir), shards, val_fraction=0.02, progress=False)
        section_train(tmp, shards, len(load_tokenizer(str(tok_dir))), args.quick)
        section_prepare(tmp, tok_dir, args.quick)
        section_prepare_one_document(tmp, tok_dir, args.quick)
        section_real(tmp, args.quick)
    print(f"\nbenchmarks finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

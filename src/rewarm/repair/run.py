"""What `rewarm compress`, `rewarm repair prompt` and `rewarm downstream --prompt` do, from paths
to files on disk (the CLI parses and prints)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rewarm import atomic
from rewarm.errors import UserError


def _calibration(shards_dir: str, tokenizer, vocab: int, tokens: int, seq_len: int) -> torch.Tensor:
    """Windows spread evenly over a prepared directory's train split (deterministic)."""
    import numpy as np

    from rewarm.data.shards import TokenShards
    from rewarm.tokenizer import fingerprint

    shards = TokenShards(shards_dir)
    shards.check_compatible(fingerprint(tokenizer), vocab, "calibration")
    train = shards.split("train")
    total = (len(train) - 1) // seq_len
    n = min(max(tokens // seq_len, 1), total)
    if n < 1:
        raise UserError(f"the calibration data {shards_dir} has {len(train)} training tokens, fewer than one window of "
                        f"{seq_len + 1}; lower --seq-len.")
    picks = (np.arange(n) * total) // n
    return torch.from_numpy(np.stack([np.asarray(train[i * seq_len: i * seq_len + seq_len + 1], dtype=np.int64)[:-1]
                                      for i in picks]))


def _check_length(model, tokens: int, what: str) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and tokens > max_pos:
        raise UserError(f"{what} needs {tokens} positions but the model has {max_pos}. Use shorter windows.")


def generation_tasks(names: list[str]) -> list[str]:
    """Tasks that generate text (soft prompts score log-likelihoods only): found before any model loads."""
    from rewarm.downstream.tasks import expand, task_configs

    specs, _ = task_configs(expand(names))
    return [s["task"] for s in specs if s.get("output_type") == "generate_until"]


def compress_model(model_dir: str, out: str, method: str, *, sparsity: float | None = None, pattern: str = "unstructured",
                   bits: int = 4, group: int = 128, calib: str | None = None, calib_tokens: int = 16384,
                   seq_len: int = 512, progress: bool = True) -> dict:
    from rewarm.model import load_pretrained, save_model
    from rewarm.repair.compress import METHODS, Pattern, compress
    from rewarm.tokenizer import load_tokenizer

    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {method!r}.")
    if calib and method != "wanda":
        raise UserError(f"--calib is read by --method wanda only; {method} uses no calibration data. Drop --calib.")
    if method != "rtn" and pattern != "unstructured" and sparsity is not None:
        raise UserError(f"--pattern {pattern} fixes the sparsity (N of every M weights); drop --sparsity.")
    sparsity = 0.5 if sparsity is None else sparsity
    if method == "rtn":
        if not 2 <= bits <= 16:
            raise UserError(f"--bits must be between 2 and 16 (k-bit round-to-nearest), got {bits}.")
        if group < 1:
            raise UserError(f"--group must be a positive number of weights, got {group}.")
    else:
        if not 0 <= sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1) (the share of weights set to zero), got {sparsity}.")
    shape = Pattern.parse(pattern)
    if method == "wanda" and not calib:
        raise UserError("--method wanda scores weights by their inputs' size: pass --calib SHARDS (a prepared directory "
                        "of text like the model's training data).")
    if seq_len < 1 or calib_tokens < 1:
        raise UserError(f"--seq-len and --calib-tokens must be positive, got {seq_len} and {calib_tokens}.")
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose another output directory (nothing is overwritten).")
    model = load_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    calibration = None
    if method == "wanda":
        _check_length(model, seq_len, f"--seq-len {seq_len}")
        calibration = _calibration(calib, tokenizer, model.config.vocab_size, calib_tokens, seq_len)
    result = compress(model, method, sparsity=sparsity, pattern=shape, bits=bits, group=group,
                      calibration=calibration, progress=progress)
    record = dict(result["record"], source=str(model_dir), **({"calibration": str(calib)} if calib else {}))
    model.config.rewarm_compression = list(getattr(model.config, "rewarm_compression", None) or []) + [record]
    save_model(model, out, tokenizer, extra_files={
        "compression.json": json.dumps({"record": record, "matrices": result["matrices"]}, indent=2)})
    return record


def make_prompt(model_dir: str, data: str, out: str, *, name: str | None = None, virtual_tokens: int = 16,
                steps: int = 200, batch: int = 8, seq_len: int = 256, lr: float = 3e-3, seed: int = 0,
                progress: bool = True) -> dict:
    from rewarm.data.shards import TokenShards
    from rewarm.model import load_pretrained
    from rewarm.repair.prompts import model_fingerprint, save_prompt, train_prompt
    from rewarm.tokenizer import fingerprint, load_tokenizer

    for key, value in (("--virtual-tokens", virtual_tokens), ("--steps", steps), ("--batch", batch), ("--seq-len", seq_len)):
        if value < 1:
            raise UserError(f"{key} must be a positive integer, got {value}.")
    if not lr > 0 or lr == float("inf"):
        raise UserError(f"--lr must be a positive number, got {lr}.")
    if Path(out).exists():
        raise UserError(f"{out} already exists; choose another output directory (nothing is overwritten).")
    model = load_pretrained(model_dir)
    _check_length(model, seq_len + virtual_tokens, f"--seq-len {seq_len} + --virtual-tokens {virtual_tokens}")
    tokenizer = load_tokenizer(model_dir)
    shards = TokenShards(data)
    shards.check_compatible(fingerprint(tokenizer), model.config.vocab_size, name or "prompt data")
    fp = model_fingerprint(model)
    result = train_prompt(model, shards.split("train"), shards.split("val"), virtual_tokens=virtual_tokens,
                          steps=steps, batch=batch, seq_len=seq_len, lr=lr, seed=seed, progress=progress)
    if model_fingerprint(model) != fp:
        raise UserError("internal error: prompt training changed the model's weights")  # frozen: never
    info = {k: v for k, v in result.items() if k != "prompt"}
    info.update(model=str(model_dir), model_fingerprint=fp, tokenizer_fingerprint=fingerprint(tokenizer),
                data=str(data), name=name or Path(data).name, virtual_tokens=virtual_tokens, steps=steps, batch=batch,
                seq_len=seq_len, lr=lr, seed=seed)
    save_prompt(Path(out), result["prompt"], info)
    return info


def load_prompts(paths: list[str], model) -> tuple[torch.Tensor, list[dict]]:
    """K prompts for `model` (each checked against it), stacked K × P × h; all must have the same length."""
    from rewarm.repair.prompts import load_prompt

    if len({str(Path(p).resolve()) for p in paths}) < len(paths):
        raise UserError("the same prompt is given twice: IDP chooses among different prompts.")
    loaded = [load_prompt(p, model) for p in paths]
    lengths = sorted({tuple(t.shape) for t, _ in loaded})
    if len(lengths) > 1:
        raise UserError(f"the prompts have different lengths ({', '.join(str(s[0]) for s in lengths)} virtual tokens): "
                        f"IDP needs prompts of one length.")
    return torch.stack([t for t, _ in loaded]).float(), [i for _, i in loaded]


def downstream_with_prompts(model, tokenizer, tasks: list[str], prompt_dirs: list[str], *, limit=None, num_fewshot=0,
                            batch=8, max_length=None, samples_out=None, loaded=None) -> tuple[dict, dict]:
    """(results, record): one prompt for every input, or IDP among several. `loaded`: the prompts and
    their records already loaded (and checked against the model's fp32 weights) by the caller."""
    from rewarm.downstream.harness import run_tasks
    from rewarm.repair.idp import PromptedLM

    prompts, infos = loaded if loaded is not None else load_prompts(prompt_dirs, model)
    mode = "idp" if len(prompt_dirs) > 1 else "single"
    record: dict = {}
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_length is None and max_pos:
        max_length = max_pos - prompts.shape[0] * prompts.shape[1]  # room for the prompts before the longest input
    results = run_tasks(model, tokenizer, tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch,
                        max_length=max_length, samples_out=samples_out, lm_class=PromptedLM,
                        lm_kwargs={"prompts": prompts, "mode": mode, "record": record})
    labels = prompt_labels(prompt_dirs)
    hist = {task: {labels[k]: n for k, n in sorted(c.items())} for task, c in record.get("chosen_prompts", {}).items()}
    return results, {"mode": mode, "prompts": [str(p) for p in prompt_dirs], "chosen_prompts": hist,
                     "selection_tokens": record.get("selection_tokens", 0),
                     "prompt_names": [i.get("name") for i in infos]}


def prompt_labels(paths: list[str]) -> list[str]:
    """Each prompt's directory name, or its whole path where two names are the same."""
    names = [Path(p).name for p in paths]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, paths)]


def write_prompted(out: Path, model_dir: str, results: dict, settings: dict, prompted: dict) -> Path:
    return atomic.write_json(out, {"model": str(model_dir), **settings, "prompting": prompted, "tasks": results})


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

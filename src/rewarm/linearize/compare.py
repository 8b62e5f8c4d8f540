"""What linearizing cost and bought: teacher vs student on the run's held-out sets, the hybrid's
loss with its linear branch zeroed (does the model use it, or bypass it through the window?),
decoding speed and state memory after long contexts, and text samples from both."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from rewarm import atomic
from rewarm.generate import _cache_arg, continue_prompts

DEFAULT_PROMPTS = ["The history of the city begins", "def read_config(path):", "Thou shalt not"]


def _eval_sets(cfg):
    from rewarm.data.shards import TokenShards
    from rewarm.evaluate import EvalSet

    return [EvalSet.from_shards(s.name, TokenShards(s.path), cfg.train.seq_len, cfg.eval.tokens) for s in cfg.data.eval]


def _held_out(model, sets, cfg) -> dict:
    from rewarm.evaluate import evaluate

    return {k: round(v["loss"], 5) for k, v in evaluate(model, sets, cfg.eval.batch).items()}


def _set_linear_branch(model, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "linear_weight"):
            m.linear_weight = 1.0 if on else 0.0


def _state_bytes(state) -> int:
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, (tuple, list)):
        return sum(_state_bytes(s) for s in state)
    if hasattr(state, "states"):  # MixerCache
        return _state_bytes(state.states)
    return 0


def kv_cache_bytes(config, context: int, bytes_per_value: int = 4) -> int:
    """A softmax model's key/value cache after `context` tokens: 2 × layers × kv heads × head dim × T."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * context * bytes_per_value


@torch.no_grad()
def decode_speed(model, context: int, new_tokens: int, vocab: int) -> tuple[float, int]:
    """(tokens/s generating `new_tokens` greedily after a random `context`, bytes of the carried state)."""
    model.eval()
    arg = _cache_arg(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context), generator=g)
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = getattr(out, arg), out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{arg: cache})
        cache, nxt = getattr(out, arg), out.logits[:, -1:].argmax(-1)
    rate = new_tokens / (time.perf_counter() - start)
    measured = _state_bytes(cache)
    return rate, measured if measured else kv_cache_bytes(model.config, context + new_tokens)


def _teacher_key(cfg, prompts: list[str], n: int) -> str:
    """What the teacher's side depends on: its weights, the eval sets, the tasks and the prompts
    (not the recipe). A changed teacher file or setting gives a new key, never a stale number."""
    weights = sorted(Path(str(cfg.model.path)).glob("*.safetensors"))  # model.path is resolved by now
    ds = cfg.eval.downstream
    what = {
        "teacher_path": str(cfg.model.path),
        "teacher": [(str(w.resolve()), w.stat().st_size, w.stat().st_mtime_ns) for w in weights],
        "sets": [(s.name, str(Path(s.path).resolve())) for s in cfg.data.eval],
        "seq_len": cfg.train.seq_len, "eval_tokens": cfg.eval.tokens, "eval_batch": cfg.eval.batch,
        "tasks": list(ds.tasks), "limit": ds.limit, "num_fewshot": ds.num_fewshot,
        "prompts": prompts, "new_tokens": n,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _teacher_side(teacher, sets, cfg, tok, prompts: list[str], n: int, cache: Path | None) -> dict:
    """The teacher's held-out losses, task results and samples: computed once per key and kept in
    `cache` (a JSON file shared by the runs of one comparison), so comparing five recipes does not
    score the same teacher five times. Decoding speed is measured every time (it is a timing)."""
    key = _teacher_key(cfg, prompts, n) if cache else None
    kept = {}
    if cache and cache.is_file():
        try:
            kept = json.loads(cache.read_text())
        except ValueError:
            kept = {}  # a damaged cache is recomputed, not trusted
        if isinstance(kept, dict) and isinstance(kept.get(key), dict):
            return kept[key]
    side: dict = {"held_out": _held_out(teacher, sets, cfg)}
    ds = cfg.eval.downstream
    if ds.tasks:
        from rewarm.downstream.harness import run_tasks

        side["downstream"] = run_tasks(teacher, tok, ds.tasks, limit=ds.limit or None,
                                       num_fewshot=ds.num_fewshot, batch_size=ds.batch)
    side["samples"] = continue_prompts(teacher, tok, prompts, n)
    if cache:
        kept = kept if isinstance(kept, dict) else {}
        atomic.write_json(cache, {**kept, key: side})
    return side


def compare(teacher, student, cfg, spec, hybrid: bool, teacher_cache: Path | None = None) -> dict:
    from rewarm.tokenizer import load_tokenizer

    sets = _eval_sets(cfg)
    tok = load_tokenizer(cfg.tokenizer or str(cfg.model.path))
    prompts = list(cfg.eval.samples.prompts) or DEFAULT_PROMPTS
    n = cfg.eval.samples.max_new_tokens
    side = _teacher_side(teacher, sets, cfg, tok, prompts, n, teacher_cache)
    out: dict = {"held_out": {"teacher": side["held_out"], "student": _held_out(student, sets, cfg)}}
    out["held_out"]["gap"] = {k: round(out["held_out"]["student"][k] - v, 5) for k, v in out["held_out"]["teacher"].items()}
    if hybrid:
        _set_linear_branch(student, False)
        out["held_out"]["student_linear_branch_zeroed"] = _held_out(student, sets, cfg)
        _set_linear_branch(student, True)
    ds = cfg.eval.downstream
    if ds.tasks:  # the same tasks, settings and examples for both (lm-evaluation-harness, offline data)
        from rewarm.downstream.harness import run_tasks

        teacher_tasks = side["downstream"]
        student_tasks = run_tasks(student, tok, ds.tasks, limit=ds.limit or None, num_fewshot=ds.num_fewshot,
                                  batch_size=ds.batch)
        out["downstream"] = {
            name: {f"{who}_{key}": res[name].get(key) for who, res in (("teacher", teacher_tasks), ("student", student_tasks))
                   for key in ("acc", "acc_stderr", "p_choices_gold")}
            for name in teacher_tasks if name in student_tasks}
    decode = {}
    max_pos = getattr(teacher.config, "max_position_embeddings", None)
    for c in spec.compare_contexts:
        if max_pos and c + spec.compare_new_tokens > max_pos:
            decode[str(c)] = {"skipped": f"beyond the teacher's {max_pos} positions"}
            continue
        t_rate, t_bytes = decode_speed(teacher, c, spec.compare_new_tokens, teacher.config.vocab_size)
        s_rate, s_bytes = decode_speed(student, c, spec.compare_new_tokens, teacher.config.vocab_size)
        decode[str(c)] = {"teacher_tok_s": round(t_rate, 1), "student_tok_s": round(s_rate, 1),
                          "teacher_state_mb": round(t_bytes / 2**20, 2), "student_state_mb": round(s_bytes / 2**20, 2)}
    out["decode"] = decode
    out["samples"] = [{"prompt": p, "teacher": a, "student": b} for p, a, b in
                      zip(prompts, side["samples"], continue_prompts(student, tok, prompts, n))]
    return out

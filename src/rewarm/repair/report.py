"""`rewarm repair report SPEC.yaml`: base vs compressed vs each repair route, on the same held-out
sets and downstream tasks, with the compute each route spent.

    out_dir: repair_out
    base: smollm2-135m                      # the uncompressed model
    eval: [{name: code, path: data/code}, {name: wiki, path: data/wiki}]    # old skills (held-out loss)
    tasks: [arc_easy, piqa, sciq, winogrande]
    limit: 200
    seq_len: 256                            # held-out windows
    eval_tokens: 16384
    precision: fp32                         # or bf16 (the weights are cast after the prompts are checked)
    batch: 16                               # windows / lm-eval batch size
    compressed:
      - name: wanda50
        model: models/wanda50
        retrained: [runs/wanda50_16, runs/wanda50_64]    # runs from it (their final/)
        prompts: [prompts/wanda50_code, prompts/wanda50_prose]   # the first alone; all of them: IDP

Each route's numbers go to out_dir/results.json as soon as they exist (a second call with the same
spec reuses them; a changed spec is refused rather than mixed with the old numbers),
then out_dir/report.md: held-out loss per set, accuracy and p_choices(gold) (± standard error) per
task, and compute: training FLOPs ≈ 6·N·tokens (re-training), ≈ 4·N·tokens (a prompt: forward and the
backward through activations only), and the extra tokens each input costs at inference.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rewarm import atomic
from rewarm.config import read_mapping
from rewarm.errors import UserError

KEYS = {"out_dir", "base", "eval", "tasks", "limit", "seq_len", "eval_tokens", "precision", "compressed", "batch"}


def _positive_int(spec: dict, key: str, where: str) -> None:
    v = spec[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(f"repair report spec {where}: `{key}` must be a positive integer, got {v!r}.")


def _str_list(value, what: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise UserError(f"repair report spec {where}: `{what}` must be a list of paths/names, got {value!r}.")
    return value


def load_spec(path: str | Path) -> dict:
    p = Path(path)
    spec = read_mapping(p, "repair report spec", ", ".join(sorted(KEYS)))
    unknown = set(spec) - KEYS
    if unknown:
        raise UserError(f"repair report spec {p}: unknown keys {sorted(unknown)}; valid: {', '.join(sorted(KEYS))}.")
    for key in ("out_dir", "base", "eval", "compressed"):
        if not spec.get(key):
            raise UserError(f"repair report spec {p}: `{key}` is required.")
    if not isinstance(spec["out_dir"], str) or not isinstance(spec["base"], str):
        raise UserError(f"repair report spec {p}: `out_dir` and `base` must be paths (or a model name).")
    spec.setdefault("limit", 200)
    spec.setdefault("seq_len", 256)
    spec.setdefault("eval_tokens", 16384)
    spec.setdefault("precision", "fp32")
    spec.setdefault("batch", 16)
    spec["tasks"] = _str_list(spec.get("tasks"), "tasks", str(p))
    for key in ("limit", "seq_len", "eval_tokens", "batch"):
        _positive_int(spec, key, str(p))
    if spec["precision"] not in ("fp32", "bf16"):
        raise UserError(f"repair report spec {p}: precision must be fp32 or bf16, got {spec['precision']!r}.")
    if not isinstance(spec["eval"], list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                      and isinstance(e.get("path"), str) for e in spec["eval"]):
        raise UserError(f"repair report spec {p}: `eval` must be a list of {{name, path}} held-out sets, got {spec['eval']!r}.")
    if not isinstance(spec["compressed"], list):
        raise UserError(f"repair report spec {p}: `compressed` must be a list of {{name, model, retrained, prompts}}.")
    names = {"base"}
    for c in spec["compressed"]:
        if not isinstance(c, dict) or not c.get("name") or not c.get("model") or set(c) - {"name", "model", "retrained", "prompts"}:
            raise UserError(f"repair report spec {p}: each `compressed` entry is {{name, model[, retrained, prompts]}}; "
                            f"got {c!r}.")
        if c["name"] in names:
            raise UserError(f"repair report spec {p}: compressed name `{c['name']}` is used twice or is the reserved `base`.")
        names.add(c["name"])
        c["retrained"] = _str_list(c.get("retrained"), f"{c['name']}.retrained", str(p))
        c["prompts"] = _str_list(c.get("prompts"), f"{c['name']}.prompts", str(p))
        for run in c["retrained"]:
            if not (Path(run) / "summary.json").is_file():
                raise UserError(f"repair report spec {p}: {run} is not a finished run (no summary.json).")
    if spec["tasks"]:
        from rewarm.downstream.tasks import check_names

        check_names(spec["tasks"])
        if any(c["prompts"] for c in spec["compressed"]):
            from rewarm.repair.run import generation_tasks

            generating = generation_tasks(spec["tasks"])
            if generating:
                raise UserError(f"repair report spec {p}: soft prompts score log-likelihood tasks only; "
                                f"{', '.join(generating)} generate text.")
    return spec


def _settings(spec: dict) -> dict:
    """What every number in results.json depends on besides the route itself."""
    return {k: spec[k] for k in ("eval", "tasks", "limit", "seq_len", "eval_tokens", "precision", "base")}


def _eval_sets(spec):
    from rewarm.data.shards import TokenShards
    from rewarm.evaluate import EvalSet

    return [EvalSet.from_shards(e["name"], TokenShards(e["path"]), spec["seq_len"], spec["eval_tokens"]) for e in spec["eval"]]


def _load(model_dir: str):
    from rewarm.model import load_pretrained
    from rewarm.model_store import resolve

    return load_pretrained(resolve(model_dir, "model")).eval()


@torch.no_grad()
def _held_out(model, eval_sets, prompts: torch.Tensor | None, batch: int) -> dict[str, float]:
    """Mean next-token loss per set; with K prompts, each window scored with IDP's choice (one: that one)."""
    from rewarm.repair.idp import choose
    from rewarm.repair.prompts import prompted_loss

    out = {}
    for es in eval_sets:
        total, n = 0.0, 0
        if prompts is None or len(prompts) == 1:
            for rows in es.windows.split(batch):
                total += float(prompted_loss(model, None if prompts is None else prompts[0], rows)) * len(rows)
                n += len(rows)
        else:
            for row in es.windows:
                k = choose(model, prompts, row[:-1].tolist())
                total += float(prompted_loss(model, prompts[k], row[None]))
                n += 1
        out[es.name] = total / n
    return out


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_report(spec: dict, progress: bool = True) -> Path:
    from rewarm.downstream.harness import run_tasks
    from rewarm.model_store import resolve
    from rewarm.repair.run import downstream_with_prompts, load_prompts
    from rewarm.tokenizer import fingerprint, load_tokenizer

    out = Path(spec["out_dir"])
    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if saved and saved.get("settings") != _settings(spec):
        raise UserError(f"{results_path} holds numbers made with other settings ({saved.get('settings')}); this spec "
                        f"says {_settings(spec)}. Use another out_dir, or delete {results_path} to score again.")
    results = saved.get("routes", {})
    tokenizer = load_tokenizer(resolve(spec["base"], "model"))
    eval_sets = _eval_sets(spec)
    from rewarm.model import load_config

    base_vocab = load_config(resolve(spec["base"], "model")).vocab_size  # the config alone: no weights loaded twice
    for e in spec["eval"]:
        from rewarm.data.shards import TokenShards

        TokenShards(e["path"]).check_compatible(fingerprint(tokenizer), base_vocab, e["name"])
    tasks, limit, batch, precision = spec["tasks"], spec["limit"], spec["batch"], spec["precision"]
    out.mkdir(parents=True, exist_ok=True)

    def route(key: str, model_dir: str, **extra):
        prompts = extra.pop("prompts", None)
        if key in results:
            if results[key]["model"] != str(model_dir) or results[key].get("prompt_dirs") != prompts:
                raise UserError(f"{results_path}: route `{key}` was scored on {results[key]['model']} "
                                f"{results[key].get('prompt_dirs') or ''}; the spec now names {model_dir} {prompts or ''}. "
                                f"Use another out_dir, or delete {results_path}.")
            return
        model = _load(model_dir)
        row: dict = {"model": str(model_dir), "params": _params(model), **extra}
        if prompts:
            stacked, infos = load_prompts(prompts, model)  # checked against the fp32 weights they were trained on
            n_prompts, p_len = stacked.shape[0], stacked.shape[1]
            max_pos = getattr(model.config, "max_position_embeddings", None)
            if max_pos is not None and spec["seq_len"] + n_prompts * p_len > max_pos:
                raise UserError(f"seq_len {spec['seq_len']} + {n_prompts}×{p_len} prompt tokens exceed the model's "
                                f"{max_pos} positions; lower seq_len.")
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        if prompts:
            stacked = stacked.to(next(model.parameters()).dtype)
            row.update(prompt_dirs=prompts, n_prompts=n_prompts)
            row["held_out"] = _held_out(model, eval_sets, stacked, batch)
            if tasks:
                row["tasks"], row["prompting"] = downstream_with_prompts(model, tokenizer, tasks, prompts, limit=limit,
                                                                         batch=batch, loaded=(stacked, infos))
            row["prompt_tokens_trained"] = sum(i["tokens"] for i in infos)
            row["virtual_tokens"] = int(stacked.shape[1])
        else:
            row["held_out"] = _held_out(model, eval_sets, None, batch)
            if tasks:
                row["tasks"] = run_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch)
        results[key] = row
        atomic.write_json(results_path, {"settings": _settings(spec), "routes": results})  # kept as soon as it exists

    route("base", spec["base"], route="base")
    for c in spec["compressed"]:
        route(f"{c['name']}", c["model"], route="compressed", of=c["name"])
        for run in c.get("retrained") or []:
            summary = json.loads((Path(run) / "summary.json").read_text())
            route(f"{c['name']}+retrain:{Path(run).name}", str(Path(run) / "final"), route="re-training", of=c["name"],
                  tokens_trained=summary["tokens"])
        prompts = c.get("prompts") or []
        if prompts:
            route(f"{c['name']}+prompt:{Path(prompts[0]).name}", c["model"], route="single prompt", of=c["name"],
                  prompts=prompts[:1])
        if len(prompts) > 1:
            route(f"{c['name']}+idp", c["model"], route=f"IDP ({len(prompts)} prompts)", of=c["name"], prompts=prompts)
    return atomic.write_text(out / "report.md", markdown(results, spec))


def _pm(value, se) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" ± {se:.3f}" if isinstance(se, float) else "")


def markdown(results: dict, spec: dict) -> str:
    sets = [e["name"] for e in spec["eval"]]
    tasks = spec["tasks"]
    base = results.get("base", {})
    lines = ["# Compress, then repair", "",
             f"Held-out loss on {', '.join(sets)} ({spec['eval_tokens']:,} tokens each, windows of {spec['seq_len']}); "
             f"tasks: {', '.join(tasks) or 'none'} (limit {spec['limit']}, 0-shot); precision {spec['precision']}. "
             "Training FLOPs ≈ 6·N·tokens for re-training, 4·N·tokens for a prompt (no weight gradients). Inference: "
             "extra tokens per input (a prompt's P; IDP adds one selection pass over K·P prompt tokens + the input).", "",
             "| " + " | ".join(["route"] + [f"{s} loss" for s in sets] + [f"{t} acc / p_choices(gold)" for t in tasks]
                              + ["mean acc", "training FLOPs", "extra tokens / input"]) + " |",
             "|" + "---|" * (1 + len(sets) + len(tasks) + 3)]
    for key, r in results.items():
        held = " | ".join(f"{r['held_out'][s]:.4f}" + (f" ({r['held_out'][s] - base['held_out'][s]:+.4f})"
                                                       if key != "base" and base else "") for s in sets)
        cells, accs = [], []
        for t in tasks:
            m = (r.get("tasks") or {}).get(t, {})
            cells.append(f"{_pm(m.get('acc'), m.get('acc_stderr'))} / {_pm(m.get('p_choices_gold'), m.get('p_choices_gold_stderr'))}")
            if m.get("acc") is not None:
                accs.append(m["acc"])
        n = r["params"]
        flops = (6 * n * r["tokens_trained"] if "tokens_trained" in r
                 else 4 * n * r["prompt_tokens_trained"] if "prompt_tokens_trained" in r else 0)
        extra = "0"
        if "virtual_tokens" in r:
            k = r.get("n_prompts", 1)
            extra = f"{r['virtual_tokens']}" + (f" + selection ({k}×{r['virtual_tokens']} + input)" if k > 1 else "")
        row = [key, held] + cells + [f"{sum(accs) / len(accs):.3f}" if accs else "–", f"{flops:.2e}", extra]
        lines.append("| " + " | ".join(row) + " |")
    hist = {k: r["prompting"]["chosen_prompts"] for k, r in results.items() if (r.get("prompting") or {}).get("mode") == "idp"}
    if hist:
        lines += ["", "IDP's choices (questions per prompt): "
                  + "; ".join(f"{k}: " + ", ".join(f"{t} (" + ", ".join(f"{p} {n}" for p, n in c.items()) + ")"
                                                     for t, c in h.items()) for k, h in hist.items())]
    return "\n".join(lines) + "\n"

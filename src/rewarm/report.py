"""`rewarm report RUNS... -o DIR`: tables and plots of what every run adapted and forgot.

Writes report.md (+ PNGs) or report.html (one self-contained file, images inlined):
loss vs tokens per eval set (upstream and downstream side by side), the LR of each run,
a table of step-0 / final / min loss per set with forgetting, adaptation and the
re-warming spike, a forgetting-vs-adaptation scatter, and — when the runs are the demo's —
the papers' findings computed from these numbers.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from rewarm import atomic
from rewarm import findings as F
from rewarm.errors import UserError
from rewarm.plots import _pyplot, save_figure
from rewarm.runs import RunData, find_runs


def _set_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for r in runs:
        for _, _, sets in r.evals[:1]:
            names += [n for n in sets if n not in names]
    order = {"upstream": 0, "downstream": 1}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def _colors(runs: list[RunData]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    return {r.name: cmap(i % cmap.N) for i, r in enumerate(runs)}


def plot_losses(runs: list[RunData], out: Path, dashed: set[str] = frozenset(),
                bands: dict[tuple[str, str], dict] | None = None) -> Path:
    """Loss vs tokens per eval set; with `bands` ((run, set) -> forecast), each run's early-curve
    forecast is drawn dotted from its cut to its end, with the 90% band shaded."""
    plt = _pyplot()
    sets = _set_names(runs)
    colors = _colors(runs)
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        for r in runs:
            pts = r.series(name)
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], label=r.name, color=colors[r.name],
                        linestyle="--" if r.name in dashed else "-", linewidth=1.5)
            band = (bands or {}).get((r.name, name))
            if band and "tokens" in band:
                x = [t / 1e6 for t in band["tokens"]]
                ax.plot(x, band["mid"], linestyle=":", color=colors[r.name], linewidth=1.5)
                ax.fill_between(x, band["band_low"], band["band_high"], color=colors[r.name], alpha=0.15, linewidth=0)
        ax.set_title(f"{name} held-out loss" + (" (dotted: forecast, shaded: 90% band)" if bands else ""))
        ax.set_xlabel("tokens seen in this run (millions)")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def _task_names(runs: list[RunData]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [t for t in r.task_names() if t not in names]
    return names


def plot_downstream(runs: list[RunData], out: Path) -> Path | None:
    """One panel per task: p_choices(gold) (solid) and accuracy (dotted) against tokens, per run."""
    tasks = [t for t in _task_names(runs) if any(r.task_series(t, "p_choices_gold") for r in runs)]
    if not tasks:
        return None
    plt = _pyplot()
    colors = _colors(runs)
    cols = min(len(tasks), 3)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.0 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for r in runs:
            for metric, style in (("p_choices_gold", "-"), ("acc", ":")):
                pts = r.task_series(task, metric)
                if pts:
                    ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], linestyle=style, marker=".",
                            color=colors[r.name], label=r.name if metric == "p_choices_gold" else None, linewidth=1.4)
        ax.set_title(f"{task}: p_choices(gold) —, accuracy ···", fontsize=10)
        ax.set_xlabel("tokens seen in this run (millions)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def plot_flatness(runs: list[RunData], out: Path) -> Path | None:
    """tr(H) of the held-out loss against tokens, ± one standard error (eval.flatness)."""
    with_flat = [r for r in runs if r.flatness]
    if not with_flat:
        return None
    plt = _pyplot()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in with_flat:
        ax.errorbar([e["tokens"] / 1e6 for e in r.flatness], [e["trace"] for e in r.flatness],
                    yerr=[e["stderr"] for e in r.flatness], label=r.name, color=colors[r.name], marker=".", capsize=2)
    ax.set_xlabel("tokens seen in this run (millions)")
    ax.set_ylabel("tr(H) of the held-out loss")
    ax.set_title("flatness (Hutchinson, ± standard error): lower is flatter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def health_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """Per run with eval.collapse: ME-PPL at step 0 and at the end, the largest ratio, and the alarms."""
    rows = []
    for r in runs:
        if not r.me_ppl:
            continue
        first, last = r.me_ppl[0], r.me_ppl[-1]
        alarms = "; ".join(f"step {a['step']}: {a.get('action') or 'rollback'} (×{a['ratio']:.1f})" if a["event"] == "collapse"
                           else f"rolled back {a['from_step']} → {a['step']}" for a in r.alarms) or "none"
        rows.append([r.name, f"{first['baseline']:.1f}", f"{last['me_ppl']:.1f}",
                     f"{max(e['ratio'] for e in r.me_ppl):.2f}×", alarms])
    return ["run", "ME-PPL step 0", "ME-PPL last eval", "largest ratio", "alarms"], rows


def retrieval_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """RETRO runs: per eval set, held-out loss of the base (step 0), and at the end with retrieval,
    with random database neighbours (the control) and without neighbours; what relevant neighbours buy
    (random − with); the repeated-4-gram share of greedy continuations with / without retrieval."""
    rows = []
    for r in runs:
        if not r.retrieval or not r.evals:
            continue
        first, last = r.evals[0][2], r.evals[-1][2]
        ev = {e["step"]: e for e in r.retrieval}.get(r.evals[-1][0], r.retrieval[-1])
        rep = next((e["repetition"] for e in reversed(r.retrieval) if "repetition" in e), None)
        for name in last:
            without, rand = ev.get("without", {}).get(name), ev.get("random", {}).get(name)
            fmt = lambda x: f"{x:.4f}" if x is not None else "—"  # noqa: E731
            rows.append([r.name, name, fmt(first.get(name)), fmt(last[name]), fmt(rand), fmt(without),
                         f"{rand - last[name]:+.4f}" if rand is not None else "—",
                         f"{rep['with']:.3f} / {rep.get('random', float('nan')):.3f} / {rep['without']:.3f}" if rep else "—"])
    return ["run", "eval set", "base (step 0)", "with retrieval", "random neighbours", "no neighbours",
            "relevant − random", "rep-4 with / random / none"], rows


def replay_table(runs: list[RunData], up: str = "upstream", down: str = "downstream") -> tuple[list[str], list[list[str]]]:
    """Runs that mix a self-generated source (`rewarm replay generate`) beside the others: what each
    replays and the price it paid, so real replay and self-replay read side by side."""
    import json

    def kind(src: dict) -> str | None:
        try:
            meta = json.loads((Path(src["path"]) / "meta.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return "self-generated" if "generated" in meta else None

    sources = {r.name: r.config.get("data", {}).get("train", []) for r in runs}
    if not any(kind(s) for srcs in sources.values() for s in srcs):
        return [], []
    rows = []
    for r in runs:
        if r.config.get("init") == "scratch":
            continue
        srcs = sources[r.name]
        total = sum(s.get("weight", 1.0) for s in srcs) or 1.0
        mix = ", ".join(f"{s['name']} {100 * s.get('weight', 1.0) / total:.0f}%" + (" (self-generated)" if kind(s) else "")
                        for s in srcs)
        rows.append([r.name, mix, _fmt(r.forgetting(up), True), _fmt(r.adaptation(down), True)])
    return ["run", "training mixture", "forgetting", "adaptation"], rows


def plot_routing(runs: list[RunData], out: Path) -> Path | None:
    """Mixture-of-experts runs (routing.json): per layer, the share of each eval set's token
    assignments that each expert receives — a row per run, a panel per layer."""
    with_routing = [r for r in runs if r.routing.get("sets") and all(s.get("share") for s in r.routing["sets"].values())]
    if not with_routing:
        return None
    plt = _pyplot()
    n_layers = max(len(next(iter(r.routing["sets"].values()))["share"]) for r in with_routing)
    fig, axes = plt.subplots(len(with_routing), n_layers, squeeze=False, layout="constrained",
                             figsize=(2.4 * n_layers + 2.0, 1.0 + 2.2 * len(with_routing)))
    for row, r in enumerate(with_routing):
        sets = list(r.routing["sets"])
        experts = r.routing.get("experts") or []
        for layer in range(n_layers):
            ax = axes[row][layer]
            grid = [r.routing["sets"][s]["share"][layer] if layer < len(r.routing["sets"][s]["share"]) else []
                    for s in sets]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, values in enumerate(grid):
                for j, v in enumerate(values):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(len(grid[0]) if grid else 0), experts[: len(grid[0])] if grid else [], rotation=45, fontsize=7)
            ax.set_yticks(range(len(sets)), sets if layer == 0 else [""] * len(sets), fontsize=7)
            ax.set_title(f"{r.name}: layer {layer}" if layer == 0 else f"layer {layer}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of the set's assignments")
    fig.suptitle("Expert routing per eval set (rows: eval sets, columns: FFN experts)")
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def routing_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """Per MoE run and eval set: the routing distribution's entropy (mean over layers) and its most-used expert."""
    def top(shares: list, experts: list) -> str:
        if not shares or not shares[0]:
            return "–"
        totals = [sum(layer[j] for layer in shares) / len(shares) for j in range(len(shares[0]))]
        best = max(range(len(totals)), key=totals.__getitem__)
        return f"{experts[best] if best < len(experts) else best} ({totals[best]:.2f})"

    rows = []
    for r in runs:
        experts = r.routing.get("experts") or []
        for name, s in r.routing.get("sets", {}).items():
            if not s.get("share"):
                continue
            rows.append([r.name, name, f"{s['mean_entropy_bits']:.3f}", f"{r.routing.get('max_entropy_bits', float('nan')):.3f}",
                         top(s["share"], experts), top(s.get("attention_share") or [], experts)])
    return ["run", "eval set", "FFN routing entropy (bits, mean over layers)", "no preference",
            "most-used FFN expert (share)", "most-weighted attention expert (mean weight)"], rows


def plot_lrs(runs: list[RunData], out: Path) -> Path:
    plt = _pyplot()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in runs:
        if r.lrs:
            ax.plot([s for s, _ in r.lrs], [lr for _, lr in r.lrs], label=r.name, color=colors[r.name], linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule of each run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def plot_tradeoff(runs: list[RunData], out: Path, up: str = "upstream", down: str = "downstream") -> Path | None:
    # a from-scratch run never knew the upstream data: its "forgetting" means nothing
    pts = [(r.name, r.forgetting(up), r.adaptation(down)) for r in runs if r.config.get("init") != "scratch"]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    plt = _pyplot()
    colors = _colors(runs)
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, f, a in pts:
        ax.scatter([f], [a], color=colors[name], s=40)
        ax.annotate(name, (f, a), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"forgetting: final − step-0 {up} loss  (lower is better)")
    ax.set_ylabel(f"adaptation: step-0 − final {down} loss  (higher is better)")
    ax.set_title("the price of adapting: forgetting vs adaptation")
    ax.grid(alpha=0.3)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _fmt_se(x: float | None, se: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3f} ± {se:.3f}" if se is not None else f"{x:.3f}"


FINAL_CHOICES = "last_eval (default) or mean_last_train:N"


def parse_final(spec: str) -> int | None:
    """`last_eval` -> None; `mean_last_train:N` -> N (the table gains that column)."""
    if spec == "last_eval":
        return None
    m = re.fullmatch(r"mean_last_train:(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--final {spec!r} is not understood: use {FINAL_CHOICES}, e.g. mean_last_train:100.")
    return int(m.group(1))


def run_table(runs: list[RunData], mean_last_train: int | None = None, up: str = "upstream",
              down: str = "downstream") -> tuple[list[str], list[list[str]]]:
    sets = _set_names(runs)
    header = ["run", "tokens"]
    for s in sets:
        header += [f"{s} step 0", f"{s} final", f"{s} min"]
    header += ["forgetting", "adaptation", "spike (first 10%)"]
    if mean_last_train:
        header.append(f"train loss (mean of last {mean_last_train} logged steps)")
    tasks = _task_names(runs)
    for t in tasks:
        header += [f"{t} acc", f"{t} p_choices(gold)"]
    rows = []
    for r in runs:
        tokens = r.evals[-1][1] if r.evals else 0
        row = [r.name + ("" if r.finished else " (unfinished)"), f"{tokens:,}"]
        for s in sets:
            row += [_fmt(r.start(s)), _fmt(r.final(s)), _fmt(r.minimum(s))]
        row += [_fmt(r.forgetting(up), True), _fmt(r.adaptation(down), True), _fmt(r.spike(up), True)]
        if mean_last_train:
            row.append(_fmt(r.mean_last_train(mean_last_train)))
        for t in tasks:
            final = r.task_final(t) or {}
            row += [_fmt_se(final.get("acc"), final.get("acc_stderr")),
                    _fmt_se(final.get("p_choices_gold"), final.get("p_choices_gold_stderr"))]
        rows.append(row)
    return header, rows


def replicate_groups(runs: list[RunData]) -> dict[str, list[RunData]]:
    """Runs that differ only in their seed (`X`, `X_seed1`, ... or `X_seed0`, `X_seed1`, ...), by base name."""
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        m = re.fullmatch(r"(.+)_seed\d+", r.name)
        groups.setdefault(m.group(1) if m else r.name, []).append(r)
    return {k: v for k, v in groups.items() if len(v) > 1}


def replicate_table(runs: list[RunData], up: str = "upstream", down: str = "downstream") -> tuple[list[str], list[list[str]]]:
    """Mean ± spread (max − min) over seed replicates: the noise a finding's differences must exceed."""
    header = ["runs", "seeds", f"final {up}", f"final {down}", "forgetting", "adaptation"]
    rows = []
    for base, group in replicate_groups(runs).items():
        done = [r for r in group if r.finished]
        row = [base, str(len(done))]
        for values in ([r.final(up) for r in done], [r.final(down) for r in done],
                       [r.forgetting(up) for r in done], [r.adaptation(down) for r in done]):
            vals = [v for v in values if v is not None]
            row.append(f"{sum(vals) / len(vals):.4f} ± {max(vals) - min(vals):.4f}" if vals else "–")
        rows.append(row)
    return header, rows


def _acc(row: dict | None) -> str:
    return "–" if row is None or row.get("acc") is None else _fmt_se(row["acc"], row.get("acc_stderr"))


def task_change_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """Per run and task: accuracy at step 0 and at the end. A run that skipped its step-0 scoring
    (eval.downstream.at_start: false) borrows it from a run that started from the same weights."""
    tasks = _task_names(runs)
    header = ["run"] + [f"{t} {when}" for t in tasks for when in ("step 0", "final", "Δ")]
    rows = []
    for r in runs:
        if not r.downstream:
            continue
        same_start = [o for o in runs if o.start_info.get("model_from") == r.start_info.get("model_from")
                      and o.start_info.get("init") == r.start_info.get("init") and o.downstream and o.downstream[0][0] == 0]
        row = [r.name]
        for t in tasks:
            first = r.task_at(t, 0) or next((o.task_at(t, 0) for o in same_start if o.task_at(t, 0)), None)
            last = r.task_final(t) if r.downstream[-1][0] > 0 else None
            delta = (last["acc"] - first["acc"]) if first and last and "acc" in first and "acc" in last else None
            row += [_acc(first), _acc(last), _fmt(delta, True)]
        rows.append(row)
    return header, rows


def samples_table(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """Each run's continuation of each prompt at step 0 and at its last eval, side by side."""
    rows = []
    for r in runs:
        if len(r.samples) < 1:
            continue
        (s0, first), (sN, last) = r.samples[0], r.samples[-1]
        for a, b in zip(first, last):
            rows.append([r.name, a["prompt"], " ".join(a["text"].split()), " ".join(b["text"].split()) if sN != s0 else "–"])
    return ["run", "prompt", "step 0", "final"], rows


def forecast_table(runs: list[RunData], bands: dict[tuple[str, str], dict]) -> tuple[list[str], list[list[str]]]:
    """Per run and eval set: the forecast final loss with its 90% interval, the measured one, the error."""
    rows = []
    for r in runs:
        for s in _set_names([r]):
            b = bands.get((r.name, s))
            if b is None:
                continue
            if "skipped" in b:
                rows.append([r.name, s, "–", "–", _fmt(r.final(s)) if r.finished else "–", b["skipped"]])
                continue
            err = f"{100 * b['relative_error']:+.2f}%" if "relative_error" in b else "run unfinished"
            rows.append([r.name, s, f"{b['predicted']:.4f}", f"{b['low']:.4f} – {b['high']:.4f}",
                         _fmt(b.get("measured")), err])
    return ["run", "eval set", "forecast final", "90% interval", "measured final", "error"], rows


def report(paths: list[str], out_dir: str | Path, fmt: str = "md", title: str = "rewarm report",
           roles_file: str | None = None, extra_images: dict[str, Path] | None = None,
           final: str = "last_eval", forecast=None) -> Path:
    """`forecast`: optional (RunData, eval set) -> band dict (rewarm.analysis.forecast.report_bands),
    passed in by the command so the report never imports the analysis package."""
    mean_last_train = parse_final(final)
    runs = find_runs(paths)
    bands = {(r.name, s): forecast(r, s) for r in runs for s in _set_names([r])} if forecast else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_name = {r.name: r for r in runs}
    roles = F.find_roles(paths, set(by_name), roles_file)
    dashed = {n for n in ((roles.scratch, roles.constant) if roles else ()) if n}
    names = (roles.upstream, roles.downstream) if roles else ("upstream", "downstream")  # what forgetting is read on
    images = {
        **(extra_images or {}),
        "Held-out loss vs tokens": plot_losses(runs, out / "loss_vs_tokens.png", dashed, bands),
        "Forgetting vs adaptation": plot_tradeoff(runs, out / "tradeoff.png", *names),
        "Downstream tasks vs tokens": plot_downstream(runs, out / "downstream.png"),
        "Learning rates": plot_lrs(runs, out / "lr.png"),
        "Flatness (Hessian trace) vs tokens": plot_flatness(runs, out / "flatness.png"),
        "Expert routing per eval set (mixture-of-experts runs)": plot_routing(runs, out / "routing.png"),
    }
    images = {k: v for k, v in images.items() if v is not None}
    header, rows = run_table(runs, mean_last_train, *names)
    replicates = replicate_table(runs, *(roles.upstream, roles.downstream) if roles else ())
    tables = [("Seed replicates (mean ± spread)", *replicates),
              (f"Early-curve forecast of the final loss from the first {100 * forecast.at:.0f}% of each run's tokens "
               "(L = E + A·(D + D₀)^−α fitted to the evals after warmup)" if forecast else "", *forecast_table(runs, bands)),
              ("Downstream tasks: accuracy at step 0 and at the end (± standard error)", *task_change_table(runs)),
              ("Text samples: greedy continuations at step 0 and at the end", *samples_table(runs)),
              ("Collapse alarm: ME-PPL of the alarm's sentences (eval.collapse)", *health_table(runs)),
              ("Replay: real vs self-generated (rewarm replay generate)", *replay_table(runs, *names)),
              ("Retrieval (RETRO runs): held-out loss with and without neighbours, degeneration", *retrieval_table(runs)),
              ("Expert specialisation: how concentrated each eval set's routing is (lower = more specialised)",
               *routing_table(runs))]
    tables = [t for t in tables if t[2]]
    found = F.compute(by_name, roles) if roles else []
    up, down = names
    notes = (f"Step-0 loss: the eval before the first update. Final: the last eval. Forgetting = final − step-0 "
             f"`{up}` loss; adaptation = step-0 − final `{down}` loss; spike = peak `{up}` loss over the evals "
             f"in the first 10% of steps minus step-0 `{up}` loss. Downstream columns: the last downstream evaluation "
             "(accuracy and p_choices(gold), the softmax over the choices' log-likelihoods, ± standard error). "
             "Findings: definitions and verdicts (holds / does not hold at this scale / within noise / incomplete) "
             "as in docs/findings.md.")
    if mean_last_train:
        notes += (f" Train loss (mean of last {mean_last_train} logged steps, every train.log_interval): Ibrahim et al. 2024's final loss, the mean "
                  "training-batch loss over the run's last steps (on the training mixture, so it includes replay); "
                  "– when the run logged fewer steps. Findings still use the last eval.")
    if fmt == "html":
        text = _html(title, runs, header, rows, images, found, notes, tables)
        path = out / "report.html"
    else:
        text = _markdown(title, runs, header, rows, images, found, notes, tables)
        path = out / "report.md"
    return atomic.write_text(path, text)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(title, runs, header, rows, images, found, notes, tables) -> str:
    lines = [f"# {title}", "", f"{len(runs)} runs. {notes}", ""]
    if found:
        lines += ["## The papers' findings, in these runs", "", F.as_markdown(found), ""]
    for caption, thead, trows in tables:
        lines += [f"## {caption}", "", "| " + " | ".join(thead) + " |", "|" + "---|" * len(thead)]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in trows] + [""]
    lines += ["## Runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for caption, img in images.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({img.name})"]
    return "\n".join(lines) + "\n"


def _html(title, runs, header, rows, images, found, notes, tables) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>",
             "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}",
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
             "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}",
             ".holds{color:#176a17;font-weight:bold}.fails{color:#a33;font-weight:bold}"
             ".noise{color:#8a6d00;font-weight:bold}.incomplete{color:#777;font-style:italic}</style></head><body>",
             f"<h1>{esc(title)}</h1><p>{len(runs)} runs. {esc(notes)}</p>"]
    if found:
        parts.append("<h2>The papers' findings, in these runs</h2><table><tr><th>id</th><th>finding</th><th>result</th><th>numbers</th></tr>")
        for f in found:
            cls = {F.HOLDS: "holds", F.FAILS: "fails", F.NOISE: "noise"}.get(f.verdict, "incomplete")
            parts.append(f"<tr><td>{f.id}</td><td style='text-align:left'>{esc(f.claim)}</td><td class='{cls}'>{esc(f.verdict)}</td>"
                         f"<td style='text-align:left'>{esc(f.detail)}</td></tr>")
        parts.append("</table>")
    for caption, thead, trows in tables:
        parts.append(f"<h2>{esc(caption)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in thead) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in trows]
        parts.append("</table>")
    parts.append("<h2>Runs</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts.append("</table>")
    for caption, img in images.items():
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)

"""`rewarm forecast`: scaling laws across runs, the end of one run from its start, downstream error
from loss, and the sweep of pilot runs the laws are fitted to. Reads ordinary run directories."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from rewarm import atomic
from rewarm.analysis import curves, laws, loss_to_error
from rewarm.errors import UserError
from rewarm.runs import RunData, find_runs

FORMAT = 1


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def output_path(path: str | Path, what: str) -> Path:
    """Checked before any work (atomic.check_output); --plot files need an image extension."""
    return atomic.check_output(path, what, PLOT_SUFFIXES if what == "--plot" else ())


def check_bootstrap(n: int) -> None:
    if not isinstance(n, int) or n < 10:
        raise UserError(f"--bootstrap must be at least 10 resamples (an interval from fewer means nothing), got {n}.")


def _pick_set(runs: list[RunData], eval_set: str | None) -> str:
    common = None
    for r in runs:
        names = {n for _, _, sets in r.evals for n in sets}
        common = names if common is None else common & names
    if eval_set:
        missing = [r.name for r in runs if eval_set not in {n for _, _, s in r.evals for n in s}]
        if missing:
            raise UserError(f"eval set `{eval_set}` is missing from run(s) {', '.join(missing)}: a law is fitted to "
                            f"one held-out set that every run scored. Sets they share: {sorted(common or [])}.")
        return eval_set
    if not common:
        raise UserError("the runs share no eval set: a law is fitted to the loss of one held-out set that every "
                        "run scored. Give them a common `data.eval` entry.")
    if len(common) > 1:
        raise UserError(f"the runs share several eval sets ({', '.join(sorted(common))}); pick one with --set NAME.")
    return next(iter(common))


def law_points(paths: list[str], eval_set: str | None) -> tuple[str, list[dict]]:
    """(set, [{run, params, tokens, loss}]): each finished from-scratch run's final loss on one set."""
    runs = find_runs(paths)
    bad = [f"{r.name} ({'not finished' if not r.finished else 'init: ' + str(r.config.get('init'))})"
           for r in runs if not r.finished or r.config.get("init", "scratch") != "scratch"]
    if bad:
        raise UserError(f"a scaling law is fitted to finished from-scratch runs (a continual run's tokens leave out its "
                        f"pre-training); not usable: {', '.join(bad)}.")
    fps = {r.start_info.get("tokenizer_fingerprint") for r in runs}
    if len(fps) > 1:
        raise UserError("the runs use different tokenizers: their losses are per token of different tokenizations "
                        "and do not lie on one law. Fit runs prepared with one tokenizer.")
    name = _pick_set(runs, eval_set)
    points = []
    for r in runs:
        n = r.start_info.get("params_non_embedding")
        if not isinstance(n, int):
            raise UserError(f"run {r.name} does not record its non-embedding parameter count (an older rewarm?).")
        points.append({"run": r.name, "params": n, "tokens": r.evals[-1][1], "loss": r.final(name)})
    return name, points


def fit_laws(paths: list[str], out: str | Path, eval_set: str | None = None, bootstrap: int = 200, seed: int = 0,
             plot: str | Path | None = None) -> dict:
    check_bootstrap(bootstrap)
    out = output_path(out, "the law file")
    plot = output_path(plot, "--plot") if plot else None
    name, points = law_points(paths, eval_set)
    n, d, y = (np.array([p[k] for p in points], dtype=np.float64) for k in ("params", "tokens", "loss"))
    result = {"format": FORMAT, "set": name, "params_count": "non-embedding", "runs": points, "laws": {}}
    for law in laws.LAWS.values():
        if len(points) <= len(law.params):
            result["laws"][law.name] = {"skipped": f"needs more than {len(law.params)} runs, got {len(points)}"}
            continue
        f = laws.fit(law, n, d, y, bootstrap=bootstrap, seed=seed)
        result["laws"][law.name] = f.to_dict()
        for p, pred in zip(points, f.predict(n, d)):
            p.setdefault("fitted", {})[law.name] = float(pred)
    if all("skipped" in v for v in result["laws"].values()):
        laws.check_points(laws.LAWS["overtrain"], n, d, y)  # raises with the reason
    atomic.write_json(Path(out), result)
    if plot:
        result["plot"] = str(plot_law(result, plot))
    return result


def plot_law(result: dict, out: Path, held_out: list[dict] | None = None) -> Path:
    """Final loss vs compute C = 6ND: the runs (one colour per token multiplier M), each law's curve
    at those M over the fitted range and up to 30× past it, and any held-out runs."""
    from rewarm.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    runs = result["runs"]
    ms = sorted({float(f"{p['tokens'] / p['params']:.2g}") for p in runs})
    c_lo = min(6 * p["params"] * p["tokens"] for p in runs)
    c_hi = 30 * max(6 * p["params"] * p["tokens"] for p in runs + (held_out or []))
    grid = np.geomspace(c_lo / 2, c_hi, 100)
    styles = {"overtrain": "-", "chinchilla": ":"}
    for i, m in enumerate(ms):
        color = f"C{i}"
        pts = [p for p in runs if float(f"{p['tokens'] / p['params']:.2g}") == m]
        ax.plot([6 * p["params"] * p["tokens"] for p in pts], [p["loss"] for p in pts], "o", color=color, label=f"runs, M = {m:g}")
        n = np.sqrt(grid / (6 * m))  # C = 6·N·(M·N)
        for name, entry in result["laws"].items():
            if "skipped" not in entry:
                ax.plot(grid, laws.Fit.from_dict(entry).predict(n, m * n), styles.get(name, "--"), color=color, lw=1)
    for p in held_out or []:
        ax.plot(6 * p["params"] * p["tokens"], p["loss"], "*", ms=14, color="k",
                label=f"held out (M = {p['tokens'] / p['params']:.0f})")
    ax.set_xscale("log")
    ax.set_xlabel("compute C = 6·N·D (N non-embedding)")
    ax.set_ylabel(f"final `{result['set']}` loss (nats/token)")
    ax.set_title("fitted laws: " + ", ".join(f"{k} ({styles.get(k, '--')})" for k, v in result["laws"].items()
                                             if "skipped" not in v), fontsize=9)
    ax.legend(fontsize=7)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def load_law(path: str | Path) -> dict:
    """A law file, checked whole: a damaged one is refused here, not half-used by `predict`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"law file {p} does not exist. Write one with `rewarm forecast fit RUNS -o {p}`.")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "laws" not in raw:
        raise UserError(f"{p} is not a law file written by `rewarm forecast fit` (format {FORMAT}).")
    try:
        assert isinstance(raw["set"], str) and isinstance(raw["laws"], dict) and raw["runs"]
        for r in raw["runs"]:
            assert float(r["params"]) > 0 and float(r["tokens"]) > 0
        fits = {name: laws.Fit.from_dict({**entry, "law": name}) for name, entry in raw["laws"].items()
                if "skipped" not in entry}
        for f in fits.values():
            assert f.theta.shape == (len(f.law.params),) and np.all(np.isfinite(f.theta))
    except (AssertionError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise UserError(f"{p} is a damaged law file ({type(exc).__name__}: {exc}); fit it again with "
                        "`rewarm forecast fit`.") from None
    if not fits:
        raise UserError(f"{p} holds no fitted law (every law was skipped: {raw['laws']}); fit more runs.")
    raw["_fits"] = fits
    return raw


def predict(law_file: str | Path, params: float, tokens: float, level: float = 0.9) -> dict:
    """Each fitted law's prediction at (N non-embedding params, D tokens) with its bootstrap interval."""
    if not (params > 0 and tokens > 0 and math.isfinite(params) and math.isfinite(tokens)):
        raise UserError(f"--params and --tokens must be positive numbers, got {params} and {tokens}.")
    if not (0 < level < 1):
        raise UserError(f"--level is the interval's coverage, a number in (0, 1) (e.g. 0.9), got {level}.")
    raw = load_law(law_file)
    compute = 6 * params * tokens
    largest = max(6 * float(p["params"]) * float(p["tokens"]) for p in raw["runs"])
    if not math.isfinite(compute) or compute / largest > 1e9:
        raise UserError(f"N × D = {params:.3g} × {tokens:.3g} is {compute / largest:.3g}× the largest fitted run's "
                        "compute: no law fitted to these runs says anything there. Fit larger pilot runs.")
    out = {"set": raw["set"], "params": params, "tokens": tokens, "multiplier": tokens / params,
           "compute": compute, "predictions": {}, "extrapolation": compute / largest}
    for name, f in raw["_fits"].items():
        with np.errstate(over="ignore", invalid="ignore"):
            lo, hi = f.interval(params, tokens, level)
            loss = float(f.predict(params, tokens))
        out["predictions"][name] = {"loss": loss, "low": lo, "high": hi, "level": level}
    return out


def _cut(run: RunData, at: float) -> tuple[float, float, float]:
    """(tokens the run will have seen at its last step, the fit's cutoff, tokens at the end of warmup)."""
    per_step = run.evals[-1][1] / run.evals[-1][0] if run.evals[-1][0] else None
    planned = run.max_steps * per_step if per_step else run.evals[-1][1]
    return planned, at * planned, run.warmup_steps() * per_step if per_step else 0.0


def forecast_set(run: RunData, name: str, at: float, bootstrap: int = 100) -> tuple[dict, curves.CurveForecast]:
    """One eval set's final loss forecast from the evals after warmup up to `at` × the run's tokens,
    with the measured final loss and the relative error when the run has finished."""
    planned, cutoff, _ = _cut(run, at)
    reached = run.evals[-1][1]
    if not run.finished and cutoff > reached:
        raise UserError(f"run {run.name} has trained {reached:,} of its {planned:,.0f} tokens "
                        f"({100 * reached / planned:.0f}%), less than the {100 * at:.0f}% to forecast from: give "
                        f"--at {reached / planned:.2f} or less, or wait for the run.")
    warm = run.warmup_steps()
    pts = [(tok, sets[name]) for step, tok, sets in run.evals if name in sets and step > warm and tok <= cutoff]
    f = curves.forecast([t for t, _ in pts], [v for _, v in pts], bootstrap=bootstrap)
    lo, hi = f.interval(planned)
    row = {"predicted": f.predict(planned), "low": lo, "high": hi, "points": f.points, "curve": f.theta.tolist()}
    measured = [sets[name] for step, _, sets in run.evals if name in sets and step == run.max_steps]
    if run.finished and measured:
        row["measured"] = measured[-1]
        row["relative_error"] = (row["predicted"] - measured[-1]) / measured[-1]
    return row, f


def run_forecast(run_dir: str | Path, at: float, eval_sets: list[str] | None = None, bootstrap: int = 100,
                 plot: str | Path | None = None) -> dict:
    """The final loss of each eval set forecast from the first `at` of the run's tokens
    (and, with `plot`, a figure: the evals, the fitted part, the forecast curve and its 90% band)."""
    check_at(at)
    check_bootstrap(bootstrap)
    plot = output_path(plot, "--plot") if plot else None
    run = RunData.load(run_dir)
    if not run.evals:
        raise UserError(f"{run.path} has no evals yet.")
    planned, cutoff, warm_tokens = _cut(run, at)
    known = {n for _, _, s in run.evals for n in s}
    names = eval_sets or sorted(known)
    out = {"run": str(run.path), "at": at, "cutoff_tokens": cutoff, "final_tokens": planned,
           "finished": run.finished, "sets": {}}
    fits: dict = {}
    for name in names:
        if name not in known:
            raise UserError(f"run {run.name} has no eval set `{name}`.")
        out["sets"][name], f = forecast_set(run, name, at, bootstrap)
        fits[name] = (f, run.series(name), cutoff, warm_tokens)
    if plot:
        out["plot"] = str(plot_forecast(fits, planned, Path(plot), f"{run.name}: forecast from {100 * at:.0f}% of its tokens"))
    return out


def check_at(at: float, flag: str = "--at") -> None:
    if not 0 < at < 1:
        raise UserError(f"{flag} is the fraction of the run's tokens to forecast from, in (0, 1); got {at}.")


def report_bands(at: float, bootstrap: int = 100):
    """What `rewarm report --forecast AT` draws: for (run, eval set), the forecast curve from the cut to
    the run's end with its 90% band, or the reason there is none. The report takes it as a callable,
    so the core never imports this package."""
    check_at(at, "--forecast")

    def band(run: RunData, name: str) -> dict:
        if not run.evals or not run.evals[-1][0]:
            return {"skipped": "no evals after step 0"}
        planned, cutoff, _ = _cut(run, at)
        try:
            row, f = forecast_set(run, name, at, bootstrap)
        except UserError as e:
            return {"skipped": str(e).split(". ")[0]}
        grid = np.linspace(cutoff, planned, 60)
        boot = np.array([curves.curve(t, grid) for t in f.boot])
        low, high = np.nanpercentile(boot, [5, 95], axis=0)
        return {**row, "at": at, "tokens": grid.tolist(), "mid": curves.curve(f.theta, grid).tolist(),
                "band_low": low.tolist(), "band_high": high.tolist()}

    band.at = at
    return band


def plot_forecast(fits: dict, final_tokens: float, out: Path, title: str) -> Path:
    from rewarm.plots import _pyplot, save_figure

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 3.6), squeeze=False)
    for ax, (name, (f, series, cutoff, warm_tokens)) in zip(axes[0], fits.items()):
        tokens = np.array([t for t, _ in series], dtype=np.float64)
        losses = np.array([v for _, v in series])
        seen = (tokens > warm_tokens) & (tokens <= cutoff)
        ax.plot(tokens[~seen], losses[~seen], "o", mfc="none", color="gray", label="evals not fitted (warmup, after the cut)")
        ax.plot(tokens[seen], losses[seen], "o", color="C0", label="evals fitted")
        grid = np.linspace(max(float(tokens[tokens > 0].min()) if np.any(tokens > 0) else 1.0, 1.0), final_tokens, 200)
        boot = np.array([curves.curve(t, grid) for t in f.boot])
        ax.fill_between(grid, *np.nanpercentile(boot, [5, 95], axis=0), color="C1", alpha=0.25, label="90% band")
        ax.plot(grid, curves.curve(f.theta, grid), color="C1", label="forecast")
        ax.axvline(cutoff, color="k", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("held-out loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def error_points(paths: list[str], eval_set: str | None) -> tuple[str, list[dict]]:
    """(set, [{run, step, loss, error}]): every downstream result paired with the eval at its step;
    error = 1 − accuracy averaged over the tasks scored there."""
    runs = find_runs(paths)
    name = _pick_set(runs, eval_set)
    pairs = []
    for r in runs:
        losses = {step: sets[name] for step, _, sets in r.evals if name in sets}
        for step, _, tasks in r.downstream:
            accs = [t["acc"] for t in tasks.values() if isinstance(t.get("acc"), (int, float))]
            if accs and step in losses:
                pairs.append({"run": r.name, "step": step, "loss": losses[step], "error": 1 - sum(accs) / len(accs)})
    return name, pairs


def fit_error(paths: list[str], out: str | Path, eval_set: str | None = None) -> dict:
    out = output_path(out, "the fit file")
    name, pairs = error_points(paths, eval_set)
    f = loss_to_error.fit_error([p["loss"] for p in pairs], [p["error"] for p in pairs])
    result = {"format": FORMAT, "set": name, "pairs": pairs, "fit": f.to_dict()}
    atomic.write_json(Path(out), result)
    return result


def write_grid(base: str | Path, sizes: list[str], multipliers: list[float], out: str | Path, name: str = "scaling") -> dict:
    """A sweep file of pilot runs: each size (a preset, or `preset:key=value,...` overrides) at each
    token multiplier M, with max_steps set so the run trains M × N tokens (N non-embedding)."""
    from rewarm.config import config_from_dict, read_mapping

    out = output_path(out, "the sweep file")
    if not sizes or not multipliers or any(not (m > 0 and math.isfinite(m)) for m in multipliers):
        raise UserError(f"token multipliers must be positive numbers (e.g. --multipliers 5,20,80), got {multipliers}.")
    parsed = [_parse_size(size) for size in sizes]
    base_raw = read_mapping(base, "base config")
    model = dict(base_raw.get("model") or {}, preset=parsed[0][0])  # the sizes give the shape
    model.pop("path", None)
    cfg = config_from_dict({**base_raw, "init": "scratch", "model": model})
    per_step = cfg.train.global_batch * cfg.train.seq_len
    runs = []
    for size, (preset, overrides) in zip(sizes, parsed):
        n = non_embedding_params(cfg, preset, overrides)
        for m in multipliers:
            steps = max(1, math.ceil(m * n / per_step))
            tag = size.replace(":", "_").replace(",", "_").replace("=", "")
            runs.append({"name": f"{tag}_M{m:g}", "set": {"model.preset": preset, "model.overrides": dict(overrides),
                                                            "train.max_steps": steps}})
    names = [r["name"] for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"the grid repeats runs ({', '.join(dupes)}): give each size and multiplier once.")
    spec = {"name": name, "base": str(Path(base).resolve()), "runs": runs}
    atomic.write_text(Path(out), yaml.safe_dump(spec, sort_keys=False))
    return spec


def _parse_size(size: str) -> tuple[str, dict]:
    preset, _, rest = size.partition(":")
    if not preset.strip():
        raise UserError(f"size `{size}` names no preset: give one, e.g. tiny or tiny:hidden_size=64.")
    overrides: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"size `{size}`: overrides are key=value pairs, e.g. tiny:hidden_size=96,num_hidden_layers=3.")
        overrides[key] = yaml.safe_load(value)
    return preset, overrides


def non_embedding_params(cfg, preset: str, overrides: dict) -> int:
    """Build the model's shape on the meta device (no memory) and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    from rewarm.data.shards import TokenShards
    from rewarm.model import build_config, count_params
    from rewarm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or TokenShards(cfg.data.train[0].path).tokenizer_path)
    try:
        hf = build_config(preset, None, overrides, len(tokenizer), cfg.model.vocab_size, tokenizer.eos_token_id)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf)
    except UserError:
        raise
    except Exception as exc:  # transformers' own validation of a field's type or value
        raise UserError(f"size `{preset}` with overrides {overrides} does not build a model "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from None
    return count_params(model, exclude_embeddings=True)

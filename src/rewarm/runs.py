"""Read finished (or partial) run directories back as numbers: evals, LR, forgetting, adaptation.

Definitions (docs/findings.md): step-0 loss = the eval before any update; final loss = the
last eval; forgetting = final upstream - step-0 upstream; adaptation = step-0 downstream -
final downstream; re-warming spike = peak upstream loss over the evals in the first 10% of
steps (after step 0) minus the step-0 upstream loss. A run is finished when its summary.json exists.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rewarm.errors import UserError
from rewarm.rundir import RunDir, iter_metrics

log = logging.getLogger(__name__)


@dataclass
class RunData:
    name: str
    path: Path
    config: dict
    evals: list[tuple[int, int, dict[str, float]]] = field(default_factory=list)  # (step, tokens, {set: loss})
    lrs: list[tuple[int, float]] = field(default_factory=list)  # (step index of the update, lr)
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training-batch loss)
    downstream: list[tuple[int, int, dict[str, dict]]] = field(default_factory=list)  # (step, tokens, {task: metrics})
    finished: bool = False
    start_info: dict = field(default_factory=dict)  # the first start event (model_from, params, ...)
    samples: list[tuple[int, list[dict]]] = field(default_factory=list)  # (step, [{prompt, text}])
    flatness: list[dict] = field(default_factory=list)  # `flatness` events (eval.flatness)
    me_ppl: list[dict] = field(default_factory=list)  # `me_ppl` events (eval.collapse)
    alarms: list[dict] = field(default_factory=list)  # `collapse` events, and rollbacks an alarm asked for
    routing: dict = field(default_factory=dict)  # routing.json of a mixture-of-experts run (`rewarm upcycle`)
    retrieval: list[dict] = field(default_factory=list)  # `retrieval` events of a RETRO run (loss without retrieval, repetition)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> "RunData":
        rd = RunDir(path)
        if not rd.metrics.exists():
            raise UserError(f"{rd.path} is not a run directory (no metrics.jsonl).")
        config = yaml.safe_load(rd.config.read_text()) if rd.config.exists() else {}
        run = cls(name or rd.path.name, rd.path, config, finished=rd.is_finished())
        by_step: dict[int, tuple[int, dict]] = {}
        for e in iter_metrics(rd.metrics):
            if e.get("event") == "start" and not run.start_info:
                run.start_info = e
            elif e.get("event") == "samples":
                run.samples = [x for x in run.samples if x[0] != e["step"]] + [(e["step"], e["samples"])]
            elif e.get("event") == "retrieval":
                run.retrieval = [x for x in run.retrieval if x["step"] != e["step"]] + [e]
            elif e.get("event") == "eval":
                run.evals.append((e["step"], e["tokens"], {k: v["loss"] for k, v in e["sets"].items()}))
            elif e.get("event") == "train":
                run.lrs.append((e["step"] - 1, e["lr"]))
                if isinstance(e.get("loss"), (int, float)):
                    run.train_losses.append((e["step"], e["loss"]))
            elif e.get("event") == "flatness":
                run.flatness.append(e)
            elif e.get("event") == "me_ppl":
                run.me_ppl.append(e)
            elif e.get("event") == "collapse" or (e.get("event") == "rollback" and "alarm" in str(e.get("reason", ""))):
                run.alarms.append(e)
            elif e.get("event") == "downstream":
                by_step.setdefault(e["step"], (e["tokens"], {}))[1].update(e["tasks"])  # later results win
        run.downstream = [(step, tok, tasks) for step, (tok, tasks) in sorted(by_step.items())]
        routing = rd.path / "routing.json"
        if routing.is_file():
            try:
                run.routing = json.loads(routing.read_text())
            except ValueError:
                log.warning("%s is not valid JSON: the routing view skips it", routing)
        return run

    @property
    def max_steps(self) -> int:
        return int(self.config.get("train", {}).get("max_steps", self.evals[-1][0] if self.evals else 0))

    def series(self, name: str) -> list[tuple[int, float]]:
        """(tokens, loss) of one eval set."""
        return [(tok, sets[name]) for _, tok, sets in self.evals if name in sets]

    def task_names(self) -> list[str]:
        names: list[str] = []
        for _, _, tasks in self.downstream:
            names += [t for t in tasks if t not in names]
        return names

    def task_series(self, task: str, metric: str) -> list[tuple[int, float]]:
        """(tokens, value) of one downstream metric over the run."""
        return [(tok, tasks[task][metric]) for _, tok, tasks in self.downstream
                if isinstance(tasks.get(task, {}).get(metric), (int, float))]

    def task_at(self, task: str, step: int) -> dict | None:
        rows = [tasks[task] for s, _, tasks in self.downstream if s == step and task in tasks]
        return rows[-1] if rows else None

    def task_final(self, task: str) -> dict | None:
        rows = [tasks[task] for _, _, tasks in self.downstream if task in tasks]
        return rows[-1] if rows else None

    def start(self, name: str) -> float | None:
        first = [sets[name] for step, _, sets in self.evals if step == 0 and name in sets]
        return first[0] if first else None

    def final(self, name: str) -> float | None:
        vals = [sets[name] for _, _, sets in self.evals if name in sets]
        return vals[-1] if vals else None

    def mean_last_train(self, n: int) -> float | None:
        """Mean training loss over the last `n` logged steps (Ibrahim et al. 2024's "final loss");
        None when the run logged fewer than `n` (a mean over fewer would not be the same statistic)."""
        last = {step: loss for step, loss in self.train_losses}  # a resumed run re-logs nothing, but be safe
        vals = [last[s] for s in sorted(last)][-n:]
        return sum(vals) / n if len(vals) == n else None

    def minimum(self, name: str) -> float | None:
        vals = [sets[name] for _, _, sets in self.evals if name in sets]
        return min(vals) if vals else None

    def forgetting(self, upstream: str = "upstream") -> float | None:
        s, f = self.start(upstream), self.final(upstream)
        return None if s is None or f is None else f - s

    def adaptation(self, downstream: str = "downstream") -> float | None:
        s, f = self.start(downstream), self.final(downstream)
        return None if s is None or f is None else s - f

    def warmup_steps(self) -> int:
        """The run's warmup in steps, as its schedule computed it."""
        from rewarm.config import warmup_steps

        sched = self.config.get("schedule", {})
        return warmup_steps(float(sched.get("warmup", 0.01)), self.max_steps)

    def early_steps(self) -> list[int]:
        """Steps of the evals in the first 10% of the run, after step 0 (where re-warming spikes)."""
        return [step for step, _, _ in self.evals if 0 < step <= 0.1 * self.max_steps]

    def peak(self, name: str, steps: list[int]) -> float | None:
        """The highest loss of set `name` over the evals at `steps` (None if it has none of them)."""
        vals = [sets[name] for step, _, sets in self.evals if step in steps and name in sets]
        return max(vals) if vals else None

    def spike(self, upstream: str = "upstream") -> float | None:
        s = self.start(upstream)
        early = [sets[upstream] for step, _, sets in self.evals
                 if 0 < step <= 0.1 * self.max_steps and upstream in sets]
        return None if s is None or not early else max(early) - s


def find_runs(paths: list[str]) -> list[RunData]:
    """Run directories given directly, or every run inside a sweep / runs directory."""
    found: list[RunData] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").exists():
            found.append(RunData.load(p))
        elif p.is_dir():
            subs = sorted(d for d in p.iterdir() if (d / "metrics.jsonl").exists())
            if not subs:
                raise UserError(f"{p} holds no run directories (no */metrics.jsonl).")
            found.extend(RunData.load(d) for d in subs)
        else:
            raise UserError(f"{p} does not exist. Pass run directories or a sweep directory.")
    names = [r.name for r in found]
    for r in found:  # runs of the same name from different places (e.g. each upcycle plan's `moe`): parent/name
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    return found

"""Live views of a long run beside metrics.jsonl: TensorBoard event files, W&B offline runs.

metrics.jsonl stays the record that reports, findings and resume read; these sinks get a copy
of each event as it is written, so a person can watch loss, LR, grad norm and throughput
while the run goes (`tensorboard --logdir RUN/tensorboard`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rewarm.errors import UserError


def _scalars(event: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl event, by the tag they are plotted under."""
    kind, out = event.get("event"), {}
    if kind == "train":
        for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                         ("tokens_per_s", "train/tokens_per_s")):
            if isinstance(event.get(key), (int, float)):
                out[tag] = float(event[key])
    elif kind == "eval":
        for name, r in event.get("sets", {}).items():
            out[f"eval/{name}/loss"] = float(r["loss"])
    elif kind == "downstream":
        for task, r in event.get("tasks", {}).items():
            for metric in ("acc", "p_choices_gold"):
                if isinstance(r.get(metric), (int, float)):
                    out[f"tasks/{task}/{metric}"] = float(r[metric])
    return out


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("`logging.tensorboard: true` needs the tensorboard package: pip install 'rewarm[live]' "
                            "(or pip install tensorboard), or set logging.tensorboard: false.") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, event: dict[str, Any]) -> None:
        step = int(event.get("step", 0))
        for tag, value in _scalars(event).items():
            self.writer.add_scalar(tag, value, step)
        if event.get("event") == "samples":
            for i, s in enumerate(event["samples"]):
                self.writer.add_text(f"samples/{i}", f"**{s['prompt']}** {s['text']}", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """An offline W&B run in RUN/wandb (nothing leaves the machine until `wandb sync`)."""

    def __init__(self, run_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("`logging.wandb: true` needs the wandb package: pip install wandb, "
                            "or set logging.wandb: false.") from None
        self.run = wandb.init(mode="offline", dir=str(run_dir), project="rewarm", name=name, config=config,
                              reinit="create_new")

    def log(self, event: dict[str, Any]) -> None:
        values = _scalars(event)
        if values:
            self.run.log(values, step=int(event.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def sinks_for(cfg, run_dir: Path) -> list:
    """The live views a run's `logging:` section asks for (rank 0 only)."""
    from rewarm.config import to_dict

    out: list = []
    if cfg.logging.tensorboard:
        out.append(TensorBoardSink(run_dir / "tensorboard"))
    if cfg.logging.wandb:
        out.append(WandbSink(run_dir, run_dir.name, to_dict(cfg)))
    return out

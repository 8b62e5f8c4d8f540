"""Figures people would rather look at than read (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rewarm import atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, out: str | Path) -> Path:
    """Write to a temp name and rename, so a half-written PNG is never left behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.temp_path(out)
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format=out.suffix.lstrip(".") or "png")
    return atomic.commit(tmp, out)


def plot_schedules(specs: list[tuple[str, Any]], steps: int, out: str | Path) -> Path:
    """One line per (label, ScheduleConfig) over `steps` steps."""
    from rewarm.schedules import build_schedule

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    xs = list(range(steps + 1))
    for label, spec in specs:
        lr = build_schedule(spec, steps)
        ax.plot(xs, [lr(x) for x in xs], label=label, linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"learning-rate schedules over {steps} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    path = save_figure(fig, out)
    plt.close(fig)
    return path

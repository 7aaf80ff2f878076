"""Curves of a run from its metrics.jsonl: one PNG, three panels.

    python -m launch.inspect RUN_DIR --plot curves.png
    python -m launch.plot RUN_DIR curves.png

    from launch.plot import plot_run
    fig = plot_run(RUN_DIR, "curves.png")     # RunDir or path; returns the matplotlib Figure

Panels: "train loss" (train/loss per step), "validation accuracy" (validation/accuracy per
validated weights version; step 0 = the base model), "time per stage" (seconds per step of
timing/generation, timing/teacher and timing/training_train_s: wall time of each stage's
window in the step). A metric a run has no rows for leaves its panel with a "no data" note.
When a step was logged twice (a resumed run redoing steps), the last row wins.

Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from shared.rundir import RunDir, read_metrics

TITLES = ("train loss", "validation accuracy", "time per stage")
STAGE_TIMINGS = (("timing/generation", "generation"), ("timing/teacher", "teacher"),
                 ("timing/training_train_s", "training"))



def series(rows: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of `key`, ascending by step, the last row of a step winning."""
    by_step: Dict[int, float] = {}
    for r in rows:
        if key in r and r[key] is not None and "step" in r:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir, out_png, rows: Optional[Sequence[dict]] = None):
    """Write the run's curves to `out_png`; returns the Figure (its axes titled TITLES)."""
    # lazy: 0.6 s to import; only drawing needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    rows = read_metrics(RunDir(root)) if rows is None else rows
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_val, ax_time = fig.subplots(1, 3)

    def empty(ax) -> None:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")

    steps, loss = series(rows, "train/loss")
    if steps:
        ax_loss.plot(steps, loss, marker="o", markersize=3)
    else:
        empty(ax_loss)
    ax_loss.set(title=TITLES[0], xlabel="step", ylabel="loss")

    steps, acc = series(rows, "validation/accuracy")
    if steps:
        ax_val.plot(steps, acc, marker="o", color="tab:green")
        ax_val.set_ylim(-0.02, 1.02)
    else:
        empty(ax_val)
    ax_val.set(title=TITLES[1], xlabel="step (weights version)", ylabel="accuracy")

    drawn = False
    for key, label in STAGE_TIMINGS:
        steps, secs = series(rows, key)
        if steps:
            ax_time.plot(steps, secs, marker="o", markersize=3, label=label)
            drawn = True
    if drawn:
        ax_time.legend()
    else:
        empty(ax_time)
    ax_time.set(title=TITLES[2], xlabel="step", ylabel="seconds")

    for ax in (ax_loss, ax_val, ax_time):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(root.name)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 2:
        print("usage: python -m launch.plot RUN_DIR OUT.png", file=sys.stderr)
        return 2
    plot_run(argv[0], argv[1])
    print(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

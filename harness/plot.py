"""Plot runs from their files: ``python -m harness.plot RUN [RUN ...] [--out FILE]``.

Reads each run's ``metrics.jsonl`` (and ``summary.json`` when the run finished) and draws one
PNG: train loss by term, lr, student and teacher top-1 per epoch (adapted, and as loaded as a
dotted line), each teacher's anchor distance ||W - W0||, each adapting teacher's own top-1 and
CE on the training batches (the window's mean, the guard's smoothed value dashed, its level when
adaptation started dotted, a trip of the teacher guard as a vertical line), images/s and data wait. One run: its
``<run>/plot.png``; several: one figure comparing them (a colour per run), by default
``compare.png`` beside the first run.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from harness.records import METRICS_FILE, read_records

# fields of a train record that are not loss terms
NOT_TERMS = {"kind", "time", "epoch", "step", "lr", "images_per_s", "data_wait", "data_skipped", "steps_skipped",
             "memory_gb", "anchor", "anchor_dist", "teacher_train"}
PANELS = ("loss", "lr", "top1", "anchor_dist", "teacher_top1", "teacher_ce", "images_per_s", "data_wait")


class PlotError(Exception):
    """A run directory that cannot be plotted; the message names it and says why."""


@dataclass
class Run:
    """One run's records: train records by step (a resumed run's re-done steps: the later record), evaluations."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: Optional[dict[str, Any]] = None
    trips: list[dict[str, Any]] = field(default_factory=list)  # the teacher guard's

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str, inner: Optional[str] = None, leaf: Optional[str] = None) -> tuple[list[int], list[float]]:
        """(steps, values) of a train field (``inner``: a key inside a nested one, ``leaf`` one more level), where present."""
        def value(r: dict) -> Any:
            v = r[key] if inner is None else r[key].get(inner, {})
            return v.get(leaf) if leaf is not None else v
        pairs = [(r["step"], value(r)) for r in self.train
                 if key in r and (inner is None or inner in r[key]) and value(r) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]


def load_run(path: Path) -> Run:
    """A run's ``metrics.jsonl`` and ``summary.json``; refused if it has no metrics."""
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise PlotError(f"{path}: no metrics.jsonl there; give a run's output directory (the recipe's `output`)")
    train: dict[int, dict] = {}
    evals: dict[tuple[int, bool], dict] = {}
    trips: dict[str, dict] = {}
    for record in read_records(metrics):
        if record["kind"] == "train":
            train[record["step"]] = record
        elif record["kind"] == "eval":
            evals[(record["epoch"], "teachers_as_loaded" in record)] = record
        elif record["kind"] == "teacher_guard":
            trips[record["teacher"]] = record
    summary = path / "summary.json"
    return Run(path, [train[s] for s in sorted(train)], [evals[k] for k in sorted(evals)],
               json.loads(summary.read_text()) if summary.is_file() else None, list(trips.values()))


def _models(run: Run) -> list[str]:
    """Evaluated models in first-seen order: the student (and its EMA) first, then the teachers."""
    names: list[str] = []
    for record in run.evals:
        for key, value in record.get("teachers_as_loaded", record).items():
            if isinstance(value, dict) and key != "teachers_as_loaded" and key not in names:
                names.append(key)
    return sorted(names, key=lambda n: not n.startswith("student"))


def figure(runs: Sequence[Run]):
    """The figure and its axes by panel name (``PANELS``); every line is labelled ``<run>: <series>``."""
    import matplotlib

    matplotlib.use("Agg")  # files, not windows: training hosts have no display
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(4, 2, figsize=(12, 14), layout="constrained")
    axes = dict(zip(PANELS, grid.flat))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", "-.", (0, (6, 1, 1, 1, 1, 1)))  # dotted is kept for the teachers as loaded
    as_loaded = (0, (1, 2))
    many = len(runs) > 1
    for i, run in enumerate(runs):
        prefix = f"{run.name}: " if many else ""
        colour = colours[i % len(colours)] if many else None

        def pick(j: int) -> dict[str, Any]:
            """One colour per run when comparing (the line style tells the series apart), else one per series."""
            return {"color": colour, "linestyle": styles[j % len(styles)]} if many else {}

        terms = [k for k in dict.fromkeys(k for r in run.train for k in r) if k not in NOT_TERMS]
        for j, term in enumerate(terms):
            axes["loss"].plot(*run.series(term), label=prefix + term, **pick(j))
        axes["lr"].plot(*run.series("lr"), label=prefix + "lr", **pick(0))
        teachers = list(dict.fromkeys(t for r in run.train for t in r.get("anchor_dist", {})))
        for j, teacher in enumerate(teachers):
            axes["anchor_dist"].plot(*run.series("anchor_dist", teacher), label=prefix + teacher, **pick(j))
        watched = list(dict.fromkeys(t for r in run.train for t in r.get("teacher_train", {})))
        for j, teacher in enumerate(watched):
            for panel, metric in (("teacher_top1", "top1"), ("teacher_ce", "ce")):
                (line,) = axes[panel].plot(*run.series("teacher_train", teacher, metric), label=prefix + teacher,
                                           **pick(j))
                same = {"color": line.get_color()}
                axes[panel].plot(*run.series("teacher_train", teacher, f"{metric}_smoothed"), linestyle="--",
                                 linewidth=1, label=f"{prefix}{teacher} smoothed", **same)
                axes[panel].plot(*run.series("teacher_train", teacher, f"{metric}_start"), linestyle=as_loaded,
                                 linewidth=1.5, label=f"{prefix}{teacher} at adaptation start", **same)
                for trip in run.trips:
                    if trip["teacher"] == teacher:
                        axes[panel].axvline(trip["step"], linewidth=1, label=f"{prefix}{teacher} guard: "
                                            f"{trip['action']} at step {trip['step']}", **same)
        axes["images_per_s"].plot(*run.series("images_per_s"), label=prefix + "images/s", **pick(0))
        steps, wait = run.series("data_wait")
        axes["data_wait"].plot(steps, [100 * w for w in wait], label=prefix + "data wait", **pick(0))
        for j, model in enumerate(_models(run)):
            adapted = [(r["epoch"], r[model]["top1"]) for r in run.evals if model in r]
            same = colour  # the as-loaded line takes its adapted line's colour
            if adapted:
                (drawn,) = axes["top1"].plot(*zip(*adapted), marker="o", markersize=3, label=prefix + model, **pick(j))
                same = drawn.get_color()
            loaded = [r["teachers_as_loaded"][model]["top1"] for r in run.evals
                      if model in r.get("teachers_as_loaded", {})]
            if loaded:
                axes["top1"].axhline(loaded[-1], linestyle=as_loaded, linewidth=1.5, label=f"{prefix}{model} as loaded",
                                     color=same)
    titles = {"loss": ("train loss by term", "step", "loss"), "lr": ("learning rate", "step", "lr"),
              "top1": ("top-1 per epoch (dotted: teacher as loaded)", "epoch", "top-1"),
              "anchor_dist": ("anchor distance ||W - W0|| per teacher", "step", "||W - W0||"),
              "teacher_top1": ("adapting teacher's own top-1 on the training batches", "step", "top-1"),
              "teacher_ce": ("adapting teacher's own CE on the training batches", "step", "CE"),
              "images_per_s": ("train images/s", "step", "images/s"), "data_wait": ("data wait", "step", "% of step time")}
    for name, ax in axes.items():
        title, xlabel, ylabel = titles[name]
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in these runs" if many else "not in this run", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
    if all(v > 0 for line in axes["loss"].get_lines() for v in line.get_ydata()) and axes["loss"].get_lines():
        axes["loss"].set_yscale("log")  # terms differ by orders of magnitude
    fig.suptitle("; ".join(_headline(run) for run in runs), fontsize=10)
    return fig, axes


def _headline(run: Run) -> str:
    s = run.summary
    if s is None:
        return f"{run.name} (unfinished)"
    return (f"{run.name}: {s['method']}, student top-1 {s['student']['top1']:.4f}, "
            f"{s['images_per_s']:,.0f} images/s, {s['wall_time_s'] / 60:.1f} min")


def plot(paths: Sequence[Path], out: Optional[Path] = None) -> Path:
    """Draw ``paths`` (run directories) into one PNG; returns where it went."""
    runs = [load_run(Path(p)) for p in paths]
    if out is None:
        out = runs[0].path / "plot.png" if len(runs) == 1 else runs[0].path.parent / "compare.png"
    fig, _ = figure(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.plot", description=__doc__.split("\n\n")[1])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="a run's output directory (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None,
                   help="PNG to write (default: RUN/plot.png; several runs: compare.png beside the first)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (a dependency; an environment built without it gets the fix)
    except ImportError:
        print("error: harness.plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    try:
        print(plot(args.runs, args.out))
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

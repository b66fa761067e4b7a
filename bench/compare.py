"""`make compare`: does ATSC help? Every method on the same small real task, several seeds each.

Trains the teachers once (cached), then ``supervised``, ``kd``, ``simkd``, ``atsc`` (adapted from
the start), ``atsc`` frozen-then-adapted and two-teacher ``atsc`` from ``recipes/compare/*.yaml``,
each through ``accelerate launch harness/run.py`` with ``--set output=... --set runtime.seed=...``,
and reads what the runs wrote (``summary.json``, ``metrics.jsonl``, ``student.safetensors``) into

- ``<out>/compare.md``: student top-1 mean and std over seeds, deployed parameters, wall time;
- ``<out>/compare.json``: the same with every run's numbers and per-epoch curves;
- ``<out>/top1.png``: validation top-1 per epoch, mean over seeds with the std shaded.

A finished run is reused when its recipe, overrides and teachers' recipes are unchanged (its
``compare-key.txt``), so an interrupted comparison continues where it stopped; anything else in
a run's directory is deleted and trained again from scratch (wall times stay whole runs).

    python bench/compare.py                      # what `make compare` runs
    python bench/compare.py --seeds 0 --methods supervised atsc --set schedule.epochs=2
    python bench/compare.py --report-only        # rewrite the reports from finished runs
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "compare"
METHODS: dict[str, str] = {  # recipe stem -> label in the table and the plot, in display order
    "supervised": "supervised (student alone)",
    "kd": "KD (Hinton)",
    "simkd": "SimKD",
    "atsc": "ATSC, adapted from the start",
    "atsc-frozen": "ATSC, frozen then adapted",
    "atsc-2teachers": "ATSC, two teachers",
}
DEFAULT_SEEDS = (0, 1, 2)


class CompareError(Exception):
    """A problem the user can fix (a recipe, a failed run); main() prints it and exits 2."""


@dataclass
class Job:
    """One training run: a recipe under recipes/compare/, its output directory and overrides."""

    name: str
    recipe: Path
    output: Path
    sets: list[str]
    key: str = ""  # fingerprint of everything that determines the run's result
    depends: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- planning


def teacher_stems(recipe: Path) -> list[str]:
    """The teacher recipes a distillation recipe needs, from its teachers' checkpoint paths.

    A compare recipe names each teacher ``checkpoint: runs/compare/<stem>/student.safetensors``
    where ``recipes/compare/<stem>.yaml`` trains it; the driver trains that recipe first.
    """
    tree = yaml.safe_load(recipe.read_text()) or {}
    stems = []
    for k, teacher in enumerate(tree.get("teachers") or []):
        stem = Path(str(teacher.get("checkpoint") or "")).parent.name
        if not (RECIPES / f"{stem}.yaml").is_file():
            raise CompareError(f"{recipe}: `teachers.{k}.checkpoint` must be runs/compare/<stem>/student.safetensors "
                               f"with a recipe recipes/compare/<stem>.yaml that trains it; found "
                               f"{teacher.get('checkpoint')!r}")
        stems.append(stem)
    return stems


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(methods: Sequence[str], seeds: Sequence[int], out: Path, extra: Sequence[str]) -> tuple[list[Job], list[Job]]:
    """Teacher jobs and student jobs (seed-major, so a partial comparison already covers every method).

    ``extra`` overrides go to the student runs only: the teachers are what their recipes say.
    """
    teachers: dict[str, Job] = {}
    students = []
    recipes = {m: RECIPES / f"{m}.yaml" for m in methods}
    for method, recipe in recipes.items():
        if not recipe.is_file():
            raise CompareError(f"{recipe}: no such compare recipe; methods are {', '.join(METHODS)}")
        for stem in teacher_stems(recipe):
            if stem not in teachers:
                path = RECIPES / f"{stem}.yaml"
                # the key leaves out the output folder: a teacher copied to another --out is still reused
                teachers[stem] = Job(stem, path, out / stem, [f"output={out / stem}"], fingerprint(path.read_text()))
    for seed in seeds:
        for method, recipe in recipes.items():
            stems = teacher_stems(recipe)
            sets = [f"output={out / f'{method}-s{seed}'}", f"runtime.seed={seed}",
                    *(f"teachers.{k}.checkpoint={out / stem / 'student.safetensors'}" for k, stem in enumerate(stems)),
                    *extra]
            key = fingerprint(recipe.read_text(), sets, [teachers[s].key for s in stems])
            students.append(Job(f"{method}-s{seed}", recipe, out / f"{method}-s{seed}", sets, key, stems))
    return list(teachers.values()), students


# ----------------------------------------------------------------------------- running


def launch_command(job: Job) -> list[str]:
    """One CPU/GPU process under `accelerate launch`, as the README's launch line."""
    sets = [arg for s in job.sets for arg in ("--set", s)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "harness" / "run.py"), str(job.recipe),
            *sets]


def is_done(job: Job) -> bool:
    marker = job.output / "compare-key.txt"
    return (job.output / "summary.json").is_file() and marker.is_file() and marker.read_text().strip() == job.key


def run_job(job: Job, logs: Path) -> None:
    """Train one run, unless a finished one with the same key exists."""
    if is_done(job):
        print(f"  {job.name}: reusing the finished run in {job.output}", flush=True)
        return
    if job.output.exists():  # stale (other recipe/overrides) or interrupted: train it whole again
        shutil.rmtree(job.output)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{job.name}.log"
    print(f"  {job.name}: training ({' '.join(job.sets[1:]) or 'recipe as written'}), log {log}", flush=True)
    start = time.time()
    with open(log, "w") as sink:
        # PYTHONWARNINGS: the libraries' deprecation chatter would bury the run's own messages in the log
        result = subprocess.run(launch_command(job), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    seconds = time.time() - start
    if result.returncode != 0 or not (job.output / "summary.json").is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(f"{job.name} ({job.recipe}) failed with exit code {result.returncode}; "
                           f"its log {log} ends:\n{tail}")
    (job.output / "compare-process.json").write_text(json.dumps({"seconds": seconds}))
    (job.output / "compare-key.txt").write_text(job.key + "\n")  # last: its presence means "finished"
    summary = json.loads((job.output / "summary.json").read_text())
    print(f"  {job.name}: student top-1 {summary['student']['top1']:.4f} in {seconds:.0f} s", flush=True)


def run_all(jobs: Sequence[Job], logs: Path, workers: int) -> None:
    """Run jobs, ``workers`` at a time; the first failure stops the comparison."""
    if workers <= 1:
        for job in jobs:
            run_job(job, logs)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run_job, job, logs) for job in jobs]:
            future.result()


# ----------------------------------------------------------------------------- reading runs


def deployed_parameters(student_file: Path) -> dict[str, int]:
    """Parameters of the exported student that its prediction uses, and all those the file holds.

    Loads the run's ``student.safetensors`` as deployed (``harness.export.load_student``) and
    counts the parameters that receive a gradient from one forward pass: for simkd/atsc that is
    the backbone, every projector and every (adapted) teacher classifier, not the student's own
    head, which the file carries but the shared-classifier prediction never uses.
    """
    import torch

    from harness.export import load_student

    model = load_student(student_file)
    size = model.preprocess.image_size
    model(torch.zeros(2, 3, size, size)).sum().backward()
    params = list(model.parameters())
    return {"used": sum(p.numel() for p in params if p.grad is not None),
            "in_file": sum(p.numel() for p in params)}


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's final numbers, its student's per-epoch validation top-1 and its recipe."""
    for name in ("summary.json", "metrics.jsonl", "student.safetensors", "recipe.yaml"):
        if not (run_dir / name).is_file():
            raise CompareError(f"{run_dir / name} is missing: the run did not finish; rerun `make compare`")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("kind") == "eval" and "student" in record:
            curve[int(record["epoch"])] = record["student"]["top1"]  # a resumed epoch's later record wins
    process = run_dir / "compare-process.json"
    return {
        "top1": summary["student"]["top1"], "top5": summary["student"]["top5"],
        "teachers": summary.get("teachers", {}), "wall_time_s": summary["wall_time_s"],
        "process_s": json.loads(process.read_text())["seconds"] if process.is_file() else None,
        "images_per_s": summary.get("images_per_s"), "curve": sorted(curve.items()),
        "params": deployed_parameters(run_dir / "student.safetensors"),
        "recipe": yaml.safe_load((run_dir / "recipe.yaml").read_text()),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is 0."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(method: str, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One method's seeds in one row: means and stds, and the mean curve over epochs every seed has."""
    params = {r["params"]["used"] for r in runs.values()}
    if len(params) != 1:
        raise CompareError(f"{method}: seeds exported students of different sizes {sorted(params)}; "
                           f"the runs do not come from one recipe, rerun `make compare`")
    curves = [dict(r["curve"]) for r in runs.values()]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    top1, top1_std = mean_std([r["top1"] for r in runs.values()])
    wall, wall_std = mean_std([r["wall_time_s"] for r in runs.values()])
    recipe = next(iter(runs.values()))["recipe"]
    return {
        "method": method, "label": label(method, recipe), "seeds": sorted(runs),
        "top1_mean": top1, "top1_std": top1_std, "top1_by_seed": {s: r["top1"] for s, r in sorted(runs.items())},
        "params": params.pop(), "params_in_file": next(iter(runs.values()))["params"]["in_file"],
        "wall_mean_s": wall, "wall_std_s": wall_std,
        "epochs": epochs,
        "curve_mean": [mean_std([c[e] for c in curves])[0] for e in epochs],
        "curve_std": [mean_std([c[e] for c in curves])[1] for e in epochs],
    }


def label(method: str, recipe: dict[str, Any]) -> str:
    text = METHODS.get(method, method)
    adapt_after = (recipe.get("method") or {}).get("adapt_after") or 0
    if recipe.get("method", {}).get("name") == "atsc" and adapt_after:
        text += f" (adapt_after {adapt_after})"
    return text


# ----------------------------------------------------------------------------- reports


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s"


def table(rows: Sequence[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> str:
    """The markdown table of compare.md (and the README)."""
    n = max(len(r["seeds"]) for r in rows)
    lines = [f"| method | student top-1, mean ± std ({n} seeds) | per seed | deployed parameters | wall time, mean ± std |",
             "|---|---|---|---|---|"]
    for r in rows:
        seeds = " / ".join(f"{v:.4f}" for v in r["top1_by_seed"].values())
        lines.append(f"| {r['label']} | {r['top1_mean']:.4f} ± {r['top1_std']:.4f} | {seeds} | "
                     f"{r['params']:,} | {fmt_seconds(r['wall_mean_s'])} ± {fmt_seconds(r['wall_std_s'])} |")
    for stem, t in teachers.items():
        lines.append(f"| teacher {t['model']} ({stem}, 1 run) | {t['top1']:.4f} | | {t['params']:,} | "
                     f"{fmt_seconds(t['wall_time_s'])} |")
    return "\n".join(lines)


def settings_line(rows: Sequence[dict[str, Any]], runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    recipe = next(iter(next(iter(runs.values())).values()))["recipe"]
    d, s = recipe["data"], recipe["schedule"]
    return (f"Student `{recipe['student']['model']}` at {d['image_size']} px, batch {d['batch_size']}, "
            f"{s['epochs']} epochs ({s['name']}), lr {recipe['optim']['lr']}; "
            f"recipes in `recipes/compare/`, runs in the output folder.")


def write_markdown(path: Path, rows, teachers, runs, jobs: int) -> None:
    extra = max((r["params_in_file"] - r["params"] for r in rows), default=0)
    notes = [
        "Deployed parameters are counted from each run's exported `student.safetensors`, loaded as deployed: "
        "the parameters its prediction uses (a forward pass reaches them). For simkd/atsc that is the student "
        "backbone + projector(s) + the (adapted) teacher classifier(s); for supervised/kd the student with its own head.",
        f"The simkd/atsc files also carry the student's own unused head ({extra:,} parameters at most here), not counted."
        if extra else "",
        "Std is the sample standard deviation over seeds (n - 1). Wall time is the run's own (summary.json: "
        "model build to export, evaluations included; process start-up not included)"
        + (f", measured with {jobs} runs at once." if jobs > 1 else ", one run at a time."),
        settings_line(rows, runs),
    ]
    body = ["# Does ATSC help? (`make compare`)", "", table(rows, teachers), "",
            *[f"- {n}" for n in notes if n], "", "![validation top-1 per epoch](top1.png)", ""]
    path.write_text("\n".join(body))


def write_plot(path: Path, rows: Sequence[dict[str, Any]], teachers: dict[str, dict[str, Any]]) -> None:
    """Validation top-1 per epoch: mean over seeds, std shaded, teachers dashed; all epochs, and the
    second half zoomed (where the methods part, the full range squeezes them together)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training hosts
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=120)
    last = max(e for r in rows for e in r["epochs"])
    for ax, first in zip(axes, (1, max(1, (last + 1) // 2))):
        low = []
        for r in rows:
            keep = [i for i, e in enumerate(r["epochs"]) if e >= first]
            epochs = [r["epochs"][i] for i in keep]
            mean, std = [r["curve_mean"][i] for i in keep], [r["curve_std"][i] for i in keep]
            (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=f"{r['label']} ({len(r['seeds'])} seeds)")
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
            low += [m - s for m, s in zip(mean, std)]
        for t in teachers.values():
            ax.axhline(t["top1"], linestyle="--", linewidth=1, color="grey")
            ax.annotate(f"teacher {t['model']} {t['top1']:.3f}", (first, t["top1"]), fontsize=7, color="grey",
                        xytext=(2, -2), textcoords="offset points", ha="left", va="top")  # early epochs sit low
        top = max([t["top1"] for t in teachers.values()] + [max(r["curve_mean"]) for r in rows])
        ax.set_ylim(min(low) - 0.01, min(1.0, top + 0.01) + 0.005)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title("all epochs" if first == 1 else f"epochs {first}-{last}, zoomed")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation top-1 of the deployed student")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3)  # below the panels: curves stay visible
    fig.suptitle("Does ATSC help? Mean over seeds, ± 1 std shaded")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def report(out: Path, methods: Sequence[str], seeds: Sequence[int], teacher_names: Sequence[str],
           jobs: int = 1) -> dict[str, Any]:
    """Read the finished runs under ``out`` and write compare.md, compare.json and top1.png there."""
    runs = {m: {s: read_run(out / f"{m}-s{s}") for s in seeds} for m in methods}
    rows = [aggregate(m, runs[m]) for m in methods]
    teachers = {}
    for stem in teacher_names:
        t = read_run(out / stem)
        teachers[stem] = {"model": t["recipe"]["student"]["model"], "top1": t["top1"], "params": t["params"]["used"],
                          "wall_time_s": t["wall_time_s"]}
    write_markdown(out / "compare.md", rows, teachers, runs, jobs)
    write_plot(out / "top1.png", rows, teachers)
    result = {"methods": rows, "teachers": teachers, "jobs": jobs,
              "runs": {m: {s: {k: v for k, v in r.items() if k != "recipe"} for s, r in by_seed.items()}
                       for m, by_seed in runs.items()}}
    (out / "compare.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- command


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="RECIPE",
                   help=f"recipes/compare/ stems to compare (default: {' '.join(METHODS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS), help="runtime.seed values (default: 0 1 2)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "compare", help="output folder (default: runs/compare)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override a key in every student run, not the teachers' (repeatable), e.g. --set runtime.threads=1")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1: wall times then compare without contention)")
    p.add_argument("--report-only", action="store_true", help="train nothing; rewrite the reports from finished runs")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()
    try:
        teachers, students = plan(args.methods, args.seeds, out, args.sets)
        if not args.report_only:
            start = time.time()
            print(f"compare: {len(teachers)} teacher(s), then {len(students)} runs ({len(args.methods)} methods x "
                  f"{len(args.seeds)} seeds), {args.jobs} at a time, into {out}", flush=True)
            run_all(teachers, out / "logs", args.jobs)
            run_all(students, out / "logs", args.jobs)
            print(f"compare: trained in {(time.time() - start) / 60:.1f} min", flush=True)
        report(out, args.methods, args.seeds, [t.name for t in teachers], args.jobs)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((out / "compare.md").read_text())
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'top1.png'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python bench/compare.py` from anywhere: import harness
    main()

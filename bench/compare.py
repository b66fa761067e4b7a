"""`make compare` and `make reproduce`: a table of methods x teacher-student pairs x seeds, trained and reported.

A table file (``recipes/compare/table.yaml``, ``recipes/cifar100/table.yaml``) names the recipes of
each row, the seeds and, where a paper published one, the number each row is to be compared with.
The driver trains every teacher the student recipes name once (cached), then every row x seed,
each through ``accelerate launch harness/run.py RECIPE --set output=... --set runtime.seed=...``,
locally one run after another (``--jobs N`` at a time) or as SLURM array jobs (``--slurm``), and
reads what the runs wrote (``summary.json``, ``metrics.jsonl``, ``student.safetensors``) into

- ``<out>/results.md``: student top-1 mean ± std over seeds, the published number beside it,
  deployed parameters, wall time;
- ``<out>/results.json``: the same with every run's numbers and per-epoch curves;
- ``<out>/top1.png``: validation top-1 per epoch per pair, mean over seeds with the std shaded.

(A table file named other than ``table.yaml``, e.g. ``ablation.yaml`` sharing ``runs/compare``
with ``table.yaml``, writes ``results-ablation.md``, ``results-ablation.json``, ``top1-ablation.png``.)

A teacher recipe is found from the checkpoint its students name: ``checkpoint:
runs/<anything>/<stem>/student.safetensors`` is trained by ``<stem>.yaml`` beside the table.
A finished run is reused when its recipe, overrides and teachers' recipes are unchanged (its
``compare-key.txt``); a run stopped part way (a killed job, a preempted array task) continues
from its latest checkpoint; anything else in a run's directory is trained again from scratch.

    python bench/compare.py                                    # `make compare`: recipes/compare/table.yaml
    python bench/compare.py recipes/cifar100/table.yaml        # `make reproduce`
    python bench/compare.py --only supervised atsc --seeds 0 --set schedule.epochs=2
    python bench/compare.py recipes/cifar100/table.yaml --slurm   # teachers, then every run, as array jobs
    python bench/compare.py --report-only                      # rewrite the reports from finished runs
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
DEFAULT_TABLE = ROOT / "recipes" / "compare" / "table.yaml"


class CompareError(Exception):
    """A problem the user can fix (a table, a recipe, a failed run); main() prints it and exits 2."""


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Cell:
    """One row of the table: a recipe trained over every seed, and what a paper published for it."""

    pair: str  # e.g. "resnet32x4 -> resnet8x4"
    label: str  # e.g. "ATSC"
    recipe: Path
    published: Optional[float] = None  # top-1 in %, as papers print it
    source: Optional[str] = None  # a key of Table.sources
    name: str = ""  # the row's runs are <name>-s<seed>; default: the recipe's stem
    sets: tuple[str, ...] = ()  # overrides of this row only (an ablation of a recipe)

    @property
    def stem(self) -> str:
        return self.name or self.recipe.stem


@dataclass
class Table:
    path: Path

    title: str
    out: Path
    seeds: list[int]
    cells: list[Cell]
    teachers_published: dict[str, tuple[float, Optional[str]]]  # teacher recipe stem -> (top-1 %, source)
    sources: dict[str, str]
    notes: list[str]
    baseline: Optional[str] = None  # a row's name: every other row says whether it beats that one

    def report_file(self, stem: str, suffix: str) -> str:
        """``results.md`` for ``table.yaml``; ``results-<name>.md`` for any other table sharing the folder."""
        return f"{stem}{suffix}" if self.path.stem == "table" else f"{stem}-{self.path.stem}{suffix}"


def load_table(path: Path, only: Sequence[str] = ()) -> Table:
    """Read a table file; ``only`` keeps the rows whose recipe stem or label is listed."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise CompareError(f"cannot read the table {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CompareError(f"{path} is not valid YAML: {e}") from None
    unknown = set(tree) - {"title", "out", "seeds", "rows", "teachers", "sources", "notes", "baseline"}
    if unknown:
        raise CompareError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: title, out, seeds, rows, "
                           f"teachers, sources, notes, baseline")
    cells = []
    for i, row in enumerate(tree.get("rows") or []):
        for j, run in enumerate(row.get("runs") or []):
            recipe = path.parent / str(run.get("recipe", ""))
            if not recipe.is_file() or recipe.suffix != ".yaml":
                raise CompareError(f"{path}: rows[{i}].runs[{j}].recipe {run.get('recipe')!r} is not a recipe file "
                                   f"beside the table ({recipe})")
            source = run.get("source")
            if source is not None and source not in (tree.get("sources") or {}):
                raise CompareError(f"{path}: rows[{i}].runs[{j}].source {source!r} is not a key of `sources`")
            sets = run.get("set") or []
            if not isinstance(sets, list) or not all(isinstance(x, str) and "=" in x for x in sets):
                raise CompareError(f"{path}: rows[{i}].runs[{j}].set must be a list of 'key=value' overrides")
            if sets and not run.get("name"):
                raise CompareError(f"{path}: rows[{i}].runs[{j}] overrides its recipe (`set`) and needs a `name` "
                                   f"of its own for its runs")
            cells.append(Cell(str(row.get("pair", "")), str(run.get("label", recipe.stem)), recipe,
                              run.get("published"), source, str(run.get("name") or ""), tuple(sets)))
    if not cells:
        raise CompareError(f"{path}: no `rows` with `runs`; see recipes/compare/table.yaml for the format")
    if len({c.stem for c in cells}) != len(cells):
        raise CompareError(f"{path}: two rows have the same name; give a row that reuses a recipe a `name`")
    baseline = tree.get("baseline")
    if baseline is not None and baseline not in {c.stem for c in cells}:
        raise CompareError(f"{path}: `baseline` {baseline!r} names no row; rows are {', '.join(c.stem for c in cells)}")
    if only:
        kept = [c for c in cells if c.stem in only or c.label in only]
        missing = set(only) - {c.stem for c in kept} - {c.label for c in kept}
        if missing:
            raise CompareError(f"{path}: --only {' '.join(sorted(missing))} matches no row; rows are "
                               f"{', '.join(c.stem for c in cells)}")
        cells = kept
    teachers = {stem: (t.get("published"), t.get("source")) for stem, t in (tree.get("teachers") or {}).items()}
    out = Path(tree.get("out") or f"runs/{path.parent.name}")
    return Table(path, str(tree.get("title") or path.parent.name), out if out.is_absolute() else ROOT / out,
                 [int(s) for s in tree.get("seeds") or [0]], cells, teachers, dict(tree.get("sources") or {}),
                 list(tree.get("notes") or []), baseline if baseline in {c.stem for c in cells} else None)


@dataclass
class Job:
    """One training run: a recipe, its output directory and overrides."""

    name: str
    recipe: Path
    output: Path
    sets: list[str]
    key: str = ""  # fingerprint of everything that determines the run's result
    depends: list[str] = field(default_factory=list)


def teacher_stems(recipe: Path) -> list[str]:
    """The teacher recipes a distillation recipe needs, from its teachers' checkpoint paths.

    A recipe names each teacher ``checkpoint: runs/<folder>/<stem>/student.safetensors`` where
    ``<stem>.yaml`` beside it trains that teacher; the driver trains that recipe first.
    """
    tree = yaml.safe_load(recipe.read_text()) or {}
    stems = []
    for k, teacher in enumerate(tree.get("teachers") or []):
        stem = Path(str(teacher.get("checkpoint") or "")).parent.name
        if not (recipe.parent / f"{stem}.yaml").is_file():
            raise CompareError(f"{recipe}: `teachers.{k}.checkpoint` must be runs/<folder>/<stem>/student.safetensors "
                               f"with a recipe {recipe.parent}/<stem>.yaml that trains it; found "
                               f"{teacher.get('checkpoint')!r}")
        stems.append(stem)
    return stems


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(table: Table, out: Path, extra: Sequence[str], seeds: Optional[Sequence[int]] = None
         ) -> tuple[list[Job], list[Job]]:
    """Teacher jobs and student jobs (seed-major, so a partial table already covers every row).

    ``extra`` overrides go to the student runs only: the teachers are what their recipes say.
    """
    teachers: dict[str, Job] = {}
    students = []
    for cell in table.cells:
        for stem in teacher_stems(cell.recipe):
            if stem not in teachers:
                path = cell.recipe.parent / f"{stem}.yaml"
                # the key leaves out the output folder: a teacher copied to another --out is still reused
                teachers[stem] = Job(stem, path, out / stem, [f"output={out / stem}"], fingerprint(path.read_text()))
    for seed in seeds if seeds is not None else table.seeds:
        for cell in table.cells:
            stems = teacher_stems(cell.recipe)
            name = f"{cell.stem}-s{seed}"
            sets = [f"output={out / name}", f"runtime.seed={seed}",
                    *(f"teachers.{k}.checkpoint={out / stem / 'student.safetensors'}" for k, stem in enumerate(stems)),
                    *cell.sets, *extra]
            key = fingerprint(cell.recipe.read_text(), sets, [teachers[s].key for s in stems])
            students.append(Job(name, cell.recipe, out / name, sets, key, stems))
    return list(teachers.values()), students


# ----------------------------------------------------------------------------- running


def launch_command(job: Job, resume: bool = False) -> list[str]:
    """One process (one GPU, or the CPU) under `accelerate launch`, as the launch line of docs/getting-started.md."""
    sets = [arg for s in job.sets for arg in ("--set", s)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "harness" / "run.py"), str(job.recipe),
            *sets, *(["--resume"] if resume else [])]


def is_done(job: Job) -> bool:
    marker = job.output / "compare-key.txt"
    return (job.output / "summary.json").is_file() and marker.is_file() and marker.read_text().strip() == job.key


def run_job(job: Job, logs: Path) -> None:
    """Train one run, unless a finished one with the same key exists; continue one that was stopped."""
    if is_done(job):
        print(f"  {job.name}: reusing the finished run in {job.output}", flush=True)
        return
    started = job.output / "compare-started.txt"
    resume = started.is_file() and started.read_text().strip() == job.key
    if job.output.exists() and not resume:  # stale (other recipe/overrides): train it whole again
        shutil.rmtree(job.output)
    job.output.mkdir(parents=True, exist_ok=True)
    started.write_text(job.key + "\n")
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{job.name}.log"
    what = "continuing from its latest checkpoint" if resume else "training"
    print(f"  {job.name}: {what} ({' '.join(job.sets[1:]) or 'recipe as written'}), log {log}", flush=True)
    start = time.time()
    with open(log, "a" if resume else "w") as sink:
        # PYTHONWARNINGS: the libraries' deprecation chatter would bury the run's own messages in the log
        result = subprocess.run(launch_command(job, resume), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"})
    seconds = time.time() - start
    if result.returncode != 0 or not (job.output / "summary.json").is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise CompareError(f"{job.name} ({job.recipe}) failed with exit code {result.returncode}; "
                           f"its log {log} ends:\n{tail}")
    process = job.output / "compare-process.json"
    earlier = json.loads(process.read_text()) if resume and process.is_file() else {"seconds": 0.0, "resumed": 0}
    process.write_text(json.dumps({"seconds": earlier["seconds"] + seconds, "resumed": earlier["resumed"] + resume}))
    (job.output / "compare-key.txt").write_text(job.key + "\n")  # last: its presence means "finished"
    summary = json.loads((job.output / "summary.json").read_text())
    print(f"  {job.name}: student top-1 {summary['student']['top1']:.4f} in {seconds:.0f} s", flush=True)


def run_all(jobs: Sequence[Job], logs: Path, workers: int) -> None:
    """Run jobs, ``workers`` at a time; the first failure stops the table."""
    if workers <= 1:
        for job in jobs:
            run_job(job, logs)
        return
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(run_job, job, logs) for job in jobs]:
            future.result()


def submit_slurm(args: argparse.Namespace, teachers: Sequence[Job], students: Sequence[Job], out: Path) -> list[str]:
    """Teachers as one array job, every run as a second one after it, the report last; the job ids.

    Each array task runs this driver for its own job (``--task KIND:INDEX``), so a task that is
    requeued (preemption) or resubmitted continues its run instead of starting it again, and a
    finished run is never trained twice.
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = [str(args.table), "--out", str(out), *(["--seeds", *map(str, args.seeds)] if args.seeds else []),
              *(a for s in args.sets for a in ("--set", s)), *(["--only", *args.only] if args.only else [])]
    script = str(ROOT / "slurm" / "compare.sbatch")

    def sbatch(name: str, options: list[str], driver_args: list[str]) -> str:
        cmd = ["sbatch", "--parsable", f"--job-name=compare-{name}", f"--output={logs}/slurm-{name}-%A_%a.out",
               f"--chdir={ROOT}", f"--export=ALL,PYTHON={sys.executable}",
               *args.sbatch, *options, script, *common, *driver_args]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        except FileNotFoundError:
            raise CompareError("--slurm needs SLURM's `sbatch` on this host's PATH") from None
        except subprocess.CalledProcessError as e:
            raise CompareError(f"sbatch refused the {name} job: {e.stderr.strip()}") from None
        return done.stdout.strip().split(";")[0]

    ids, after = [], []
    if teachers:
        ids.append(sbatch("teachers", [f"--array=0-{len(teachers) - 1}"], ["--task", "teachers"]))
        after = [f"--dependency=afterok:{ids[-1]}", "--kill-on-invalid-dep=yes"]  # a failed teacher ends the rest
    ids.append(sbatch("runs", [f"--array=0-{len(students) - 1}", *after], ["--task", "runs"]))
    ids.append(sbatch("report", [f"--dependency=afterany:{ids[-1]}", "--output=" + str(logs / "slurm-report-%j.out")],
                      ["--report-only"]))
    return ids


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
    from harness.records import METRICS_FILE, read_records

    for name in ("summary.json", "metrics.jsonl", "student.safetensors", "recipe.yaml"):
        if not (run_dir / name).is_file():
            raise CompareError(f"{run_dir / name} is missing: the run did not finish; rerun the same command")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve, trips, teacher_curves = {}, {}, {}
    for record in read_records(run_dir / METRICS_FILE):
        if record.get("kind") == "eval" and "student" in record:
            curve[int(record["epoch"])] = record["student"]["top1"]  # a resumed epoch's later record wins
            for name in summary.get("teachers", {}):
                if name in record:
                    teacher_curves.setdefault(name, {})[int(record["epoch"])] = record[name]["top1"]
        elif record.get("kind") == "teacher_guard":
            trips[record["teacher"]] = {k: record[k] for k in ("step", "action", "top1_start", "top1_smoothed")}
    process = run_dir / "compare-process.json"
    return {
        "top1": summary["student"]["top1"], "top5": summary["student"]["top5"],
        "teachers": summary.get("teachers", {}), "wall_time_s": summary["wall_time_s"],
        "process_s": json.loads(process.read_text())["seconds"] if process.is_file() else None,
        "images_per_s": summary.get("images_per_s"), "curve": sorted(curve.items()), "guard_trips": trips,
        "teacher_lowest": {name: min(c.values()) for name, c in teacher_curves.items()},
        "params": deployed_parameters(run_dir / "student.safetensors"),
        "recipe": yaml.safe_load((run_dir / "recipe.yaml").read_text()),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of one value is 0."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(cell: Cell, runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row's seeds: means and stds, and the mean curve over the epochs every seed has."""
    params = {r["params"]["used"] for r in runs.values()}
    if len(params) != 1:
        raise CompareError(f"{cell.stem}: seeds exported students of different sizes {sorted(params)}; "
                           f"the runs do not come from one recipe, rerun the same command")
    curves = [dict(r["curve"]) for r in runs.values()]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    top1, top1_std = mean_std([r["top1"] for r in runs.values()])
    # the KD literature reports the best test accuracy over all epochs (RepDistiller, SimKD, ATSC code)
    best, best_std = mean_std([max(c.values()) for c in curves])
    wall, wall_std = mean_std([r["wall_time_s"] for r in runs.values()])
    adapted = {}  # an adapting method's teachers: their own final top-1, and the guard's trips
    if next(iter(runs.values()))["recipe"]["method"]["name"] == "atsc":
        for name in next(iter(runs.values()))["teachers"]:
            m, sd = mean_std([r["teachers"][name]["top1"] for r in runs.values()])
            lowest = statistics.fmean(r["teacher_lowest"].get(name, r["teachers"][name]["top1"]) for r in runs.values())
            steps = [r["guard_trips"][name]["step"] for r in runs.values() if name in r["guard_trips"]]
            adapted[name] = {"top1_mean": m, "top1_std": sd, "lowest_mean": lowest, "tripped": len(steps),
                             "trip_steps": steps}
    return {
        "run": cell.stem, "pair": cell.pair, "label": cell.label, "published": cell.published, "source": cell.source,
        "seeds": sorted(runs),
        "top1_mean": top1, "top1_std": top1_std, "top1_by_seed": {s: r["top1"] for s, r in sorted(runs.items())},
        "best_mean": best, "best_std": best_std,
        "params": params.pop(), "params_in_file": next(iter(runs.values()))["params"]["in_file"],
        "wall_mean_s": wall, "wall_std_s": wall_std, "adapted_teachers": adapted,
        "epochs": epochs,
        "curve_mean": [mean_std([c[e] for c in curves])[0] for e in epochs],
        "curve_std": [mean_std([c[e] for c in curves])[1] for e in epochs],
    }


# ----------------------------------------------------------------------------- reports


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def published_cell(value: Optional[float], source: Optional[str]) -> str:
    """A markdown cell (text and closing bar) with the published top-1 and its source key."""
    return " |" if value is None else f" {value:.2f}" + (f" [{source}]" if source else "") + " |"


def versus(row: dict[str, Any], base: dict[str, Any], key: str) -> str:
    """``row`` against ``base`` on ``key`` (top1 or best): the difference in points, and whether it exceeds the
    two rows' pooled standard deviation, sqrt((s1^2 + s2^2) / 2)."""
    diff = 100 * (row[f"{key}_mean"] - base[f"{key}_mean"])
    pooled = 100 * ((row[f"{key}_std"] ** 2 + base[f"{key}_std"] ** 2) / 2) ** 0.5
    return f"{diff:+.2f} ({'yes' if diff > pooled else 'no'}, pooled std {pooled:.2f})"


def adapted_cell(row: dict[str, Any], seeds: int) -> str:
    """The adapted teachers' own final top-1 and the guard's trips (seeds tripped, at which steps)."""
    parts = []
    for name, t in row.get("adapted_teachers", {}).items():
        trips = f"; guard tripped {t['tripped']}/{seeds}" + (
            f" at step {min(t['trip_steps'])}-{max(t['trip_steps'])}" if t["trip_steps"] else "")
        parts.append(f"{100 * t['top1_mean']:.2f} ± {100 * t['top1_std']:.2f} (lowest {100 * t['lowest_mean']:.2f}){trips}")
    return "; ".join(parts)


def table_markdown(rows: Sequence[dict[str, Any]], teachers: dict[str, dict[str, Any]],
                   baseline: Optional[str] = None) -> str:
    """The markdown table of results.md (and docs/does-atsc-help.md): top-1 in %, as papers print it.

    With a ``baseline`` row, each row says whether it beats that row (final and best-epoch top-1);
    where a method adapts its teachers, their own final top-1 and the guard's trips.
    """
    n = max(len(r["seeds"]) for r in rows)
    has_published = any(r["published"] is not None for r in rows) or any(
        t["published"] is not None for t in teachers.values())
    has_adapted = any(r.get("adapted_teachers") for r in rows)
    base = next((r for r in rows if r["run"] == baseline), None)
    base_label = base["label"].split(" (")[0] if base else ""
    head = (f"| pair | method | top-1 %, mean ± std ({n} seeds) | per seed | best epoch, mean ± std |"
            + (" published |" if has_published else "")
            + (f" vs {base_label}: final | vs {base_label}: best epoch |" if base else "")
            + (" adapted teacher's top-1 %: final (lowest epoch) |" if has_adapted else "")
            + " deployed parameters | wall time, mean ± std |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for stem, t in teachers.items():
        lines.append(f"| teacher | {t['model']} ({stem}, 1 run) | {100 * t['top1']:.2f} | | {100 * t['best']:.2f} |"
                     + (published_cell(t["published"], t["source"]) if has_published else "")
                     + (" | |" if base else "") + (" |" if has_adapted else "")
                     + f" {t['params']:,} | {fmt_seconds(t['wall_time_s'])} |")
    for r in rows:
        seeds = " / ".join(f"{100 * v:.2f}" for v in r["top1_by_seed"].values())
        against = (" | |" if r is base else f" {versus(r, base, 'top1')} | {versus(r, base, 'best')} |") if base else ""
        lines.append(f"| {r['pair']} | {r['label']} | {100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f} | "
                     f"{seeds} | {100 * r['best_mean']:.2f} ± {100 * r['best_std']:.2f} |"
                     + (published_cell(r["published"], r["source"]) if has_published else "") + against
                     + ((" " + adapted_cell(r, len(r['seeds']))).rstrip() + " |" if has_adapted else "")
                     + f" {r['params']:,} | {fmt_seconds(r['wall_mean_s'])} ± {fmt_seconds(r['wall_std_s'])} |")
    return "\n".join(lines)


def settings_line(cell: Cell, recipe: dict[str, Any]) -> str:
    d, s = recipe["data"], recipe["schedule"]
    return (f"{cell.pair}: student `{recipe['student']['model']}` at {d['image_size']} px, batch {d['batch_size']}, "
            f"{s['epochs']} epochs ({s['name']}), lr {recipe['optim']['lr']}.")


def write_markdown(path: Path, table: Table, rows, teachers, runs, jobs: int) -> None:
    """results.md: the title, the table, how to read it, the sources, the plot."""
    extra = max((r["params_in_file"] - r["params"] for r in rows), default=0)
    first_of_pair = {c.pair: c for c in reversed(table.cells)}
    notes = [
        *table.notes,
        "Deployed parameters are counted from each run's exported `student.safetensors`, loaded as deployed: "
        "the parameters its prediction uses (a forward pass reaches them). For simkd/atsc that is the student "
        "backbone + projector(s) + the (adapted) teacher classifier(s); for supervised/kd the student with its own head.",
        f"The simkd/atsc files also carry the student's own unused head ({extra:,} parameters at most here), not counted."
        if extra else "",
        "Top-1 is the final epoch's; \"best epoch\" is the best validation top-1 over all epochs, what the KD "
        "literature reports (its code evaluates on the test set every epoch and prints the best).",
        "Std is the sample standard deviation over seeds (n - 1). Wall time is the run's own (summary.json: "
        "model build to export, evaluations included; process start-up not included)"
        + (f", measured with {jobs} runs at once." if jobs > 1 else ", one run at a time."),
        *(settings_line(c, next(iter(runs[c.stem].values()))["recipe"]) for c in first_of_pair.values()),
        f"Recipes in `{table.path.parent.relative_to(ROOT) if table.path.is_relative_to(ROOT) else table.path.parent}/`.",
    ]
    sources = [f"- [{key}] {text}" for key, text in table.sources.items()]
    if table.baseline:
        notes.append("\"vs\" columns: the row's mean minus the baseline's, in points; \"yes\" where it is larger than "
                     "the two rows' pooled standard deviation sqrt((s1^2 + s2^2) / 2), a plain bar, not a significance test.")
    if any(r.get("adapted_teachers") for r in rows):
        notes.append("Adapted teacher's top-1: the teacher's own validation top-1 at the end of the run (mean ± std "
                     "over seeds; as loaded it is the teacher row's) and, in brackets, its lowest epoch (mean over seeds); "
                     "\"guard tripped\": the seeds in which "
                     "`method.teacher_guard` saw its smoothed training top-1 fall more than `max_drop` points, and where.")
    body = [f"# {table.title}", "", table_markdown(rows, teachers, table.baseline), "", *[f"- {n}" for n in notes if n], "",
            *(["Published numbers:", "", *sources, ""] if sources else []),
            f"![validation top-1 per epoch]({table.report_file('top1', '.png')})", ""]
    path.write_text("\n".join(body))


def write_plot(path: Path, title: str, rows: Sequence[dict[str, Any]], teachers: dict[str, dict[str, Any]],
               teacher_pairs: dict[str, list[str]]) -> None:
    """Validation top-1 per epoch, one row of panels per pair: all epochs, and the second half zoomed
    (where the methods part); mean over seeds, std shaded, teachers dashed, published numbers as x."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training hosts
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, grid = plt.subplots(len(pairs), 2, figsize=(15, 4.5 * len(pairs) + 1), dpi=120, squeeze=False)
    for pair, axes in zip(pairs, grid):
        pair_rows = [r for r in rows if r["pair"] == pair]
        pair_teachers = [teachers[s] for s in teacher_pairs.get(pair, [])]
        last = max(e for r in pair_rows for e in r["epochs"])
        for ax, first in zip(axes, (1, max(1, (last + 1) // 2))):
            low, top = [], [t["top1"] for t in pair_teachers]
            for r in pair_rows:
                keep = [i for i, e in enumerate(r["epochs"]) if e >= first]
                epochs = [r["epochs"][i] for i in keep]
                mean, std = [r["curve_mean"][i] for i in keep], [r["curve_std"][i] for i in keep]
                (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=f"{r['label']} ({len(r['seeds'])} seeds)")
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
                if r["published"] is not None:
                    ax.plot([last], [r["published"] / 100], marker="x", markersize=8, color=line.get_color())
                    top.append(r["published"] / 100)
                low += [m - s for m, s in zip(mean, std)]
                top.append(max(mean))
            for i, t in enumerate(pair_teachers):  # labels stacked: teachers often score alike
                ax.axhline(t["top1"], linestyle="--", linewidth=1, color="grey")
                ax.annotate(f"teacher {t['model']} {t['top1']:.3f}", (first, t["top1"]), fontsize=7, color="grey",
                            xytext=(2, -2 - 9 * i), textcoords="offset points", ha="left", va="top")
            ax.set_ylim(min(low) - 0.01, min(1.0, max(top) + 0.01) + 0.005)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_title(f"{pair}: " + ("all epochs" if first == 1 else f"epochs {first}-{last}, zoomed"), fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("validation top-1 of the deployed student")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: the curves stay visible
    fig.suptitle(f"{title}: mean over seeds, ± 1 std shaded" + (", x: published" if any(
        r["published"] is not None for r in rows) else ""))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(table: Table, out: Path, seeds: Sequence[int], jobs: int = 1) -> dict[str, Any]:
    """Read the finished runs under ``out`` and write results.md, results.json and top1.png there."""
    runs = {c.stem: {s: read_run(out / f"{c.stem}-s{s}") for s in seeds} for c in table.cells}
    rows = [aggregate(c, runs[c.stem]) for c in table.cells]
    teachers, teacher_pairs = {}, {}
    for cell in table.cells:
        for stem in teacher_stems(cell.recipe):
            teacher_pairs.setdefault(cell.pair, [])
            if stem not in teacher_pairs[cell.pair]:
                teacher_pairs[cell.pair].append(stem)
            if stem not in teachers:
                t = read_run(out / stem)
                published, source = table.teachers_published.get(stem, (None, None))
                teachers[stem] = {"model": t["recipe"]["student"]["model"], "top1": t["top1"],
                                  "best": max([t["top1"]] + [v for _, v in t["curve"]]),
                                  "params": t["params"]["used"], "wall_time_s": t["wall_time_s"],
                                  "published": published, "source": source}
    write_markdown(out / table.report_file("results", ".md"), table, rows, teachers, runs, jobs)
    write_plot(out / table.report_file("top1", ".png"), table.title, rows, teachers, teacher_pairs)
    result = {"title": table.title, "rows": rows, "teachers": teachers, "jobs": jobs, "sources": table.sources,
              "runs": {stem: {s: {k: v for k, v in r.items() if k != "recipe"} for s, r in by_seed.items()}
                       for stem, by_seed in runs.items()}}
    (out / table.report_file("results", ".json")).write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- command


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", nargs="?", type=Path, default=DEFAULT_TABLE,
                   help="table file (default: recipes/compare/table.yaml, `make compare`)")
    p.add_argument("--only", nargs="+", default=[], metavar="ROW", help="rows to run, by recipe stem or label")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="runtime.seed values (default: the table's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the table's `out`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="override a key in every student run, not the teachers' (repeatable), e.g. --set runtime.threads=1")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1: wall times then compare without contention)")
    p.add_argument("--report-only", action="store_true", help="train nothing; rewrite the reports from finished runs")
    p.add_argument("--slurm", action="store_true",
                   help="submit the teachers, then every run, as SLURM array jobs (slurm/compare.sbatch), and the report after them")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option for --slurm (repeatable), e.g. --sbatch=--gpus-per-task=1 --sbatch=--partition=gpu")
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # set by slurm/compare.sbatch: teachers|runs
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        table = load_table(args.table.resolve(), args.only)
        out = (args.out or table.out).resolve()
        seeds = args.seeds or table.seeds
        teachers, students = plan(table, out, args.sets, seeds)
        if args.task:  # one SLURM array task: its own job only
            jobs = teachers if args.task == "teachers" else students
            run_job(jobs[int(os.environ["SLURM_ARRAY_TASK_ID"])], out / "logs")
            return
        if args.slurm:
            ids = submit_slurm(args, teachers, students, out)
            print(f"submitted {len(teachers)} teacher(s) and {len(students)} runs as SLURM jobs {', '.join(ids)} "
                  f"(the last writes the report); logs in {out / 'logs'}; `squeue --me` shows them. Submitting "
                  f"again later continues: finished runs are reused, stopped ones continue from their checkpoints.")
            return
        if not args.report_only:
            start = time.time()
            print(f"{table.title}: {len(teachers)} teacher(s), then {len(students)} runs ({len(table.cells)} rows x "
                  f"{len(seeds)} seeds), {args.jobs} at a time, into {out}", flush=True)
            run_all(teachers, out / "logs", args.jobs)
            run_all(students, out / "logs", args.jobs)
            print(f"trained in {(time.time() - start) / 60:.1f} min", flush=True)
        report(table, out, seeds, args.jobs)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    files = [out / table.report_file(stem, suffix) for stem, suffix in
             (("results", ".md"), ("results", ".json"), ("top1", ".png"))]
    print(files[0].read_text())
    print(f"wrote {', '.join(map(str, files))}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # `python bench/compare.py` from anywhere: import harness
    main()

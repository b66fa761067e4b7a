"""`make compare` / `make reproduce` (bench/compare.py): tables, planning, resuming, reporting.

The comparison itself takes half an hour; this checks in seconds that what it prints cannot
silently drift from what the runs wrote: mean and std over seeds, per-epoch curves, the deployed
parameter count read from real exported student files, and that the PNG is written.
"""
import importlib.util
import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import yaml

from harness.data import Preprocess
from harness.export import build_from_config, save_student

# bench/ is scripts, not an installed package: load the driver from its file
ROOT_DIR = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_compare", ROOT_DIR / "bench" / "compare.py")
compare = sys.modules["bench_compare"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(compare)

PRE = asdict(Preprocess(image_size=32, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
PROJECTED = 64  # the fabricated teacher's feature width


def student_config(method: str, shared: bool) -> dict:
    config = {"format": "harness.student/1", "recipe": method, "method": method, "model": "test_resnet",
              "model_kwargs": {}, "num_classes": 10, "preprocess": PRE}
    if shared:
        width = timm.create_model("test_resnet", num_classes=10).num_features
        config["shared_classifier"] = {"taps": ["map"], "teacher_sizes": [None], "teacher_weights": [1.0],
                                       "projector_factor": 4, "projector_dims": [[width, PROJECTED]],
                                       "classifier_bias": [True]}
    return config


def fabricate_run(run_dir: Path, method: str, model: str, top1_by_epoch: list[float], wall: float,
                  student_file: Path) -> None:
    """A finished run's files as harness/run.py writes them (only the keys the report reads)."""
    run_dir.mkdir(parents=True)
    records = [{"kind": "eval", "epoch": 0, "step": 0, "teachers_as_loaded": {}}]
    for epoch, top1 in enumerate(top1_by_epoch, start=1):
        records.append({"kind": "train", "epoch": epoch - 1, "step": 10 * epoch, "loss": 1.0})
        records.append({"kind": "eval", "epoch": epoch, "step": 10 * epoch,
                        "student": {"top1": top1, "top5": 1.0, "samples": 359}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "summary.json").write_text(json.dumps(
        {"recipe": method, "method": method, "student": {"top1": top1_by_epoch[-1], "top5": 1.0, "samples": 359},
         "teachers": {}, "images_per_s": 100.0, "wall_time_s": wall, "epochs": len(top1_by_epoch)}))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
        {"student": {"model": model}, "method": {"name": method, "adapt_after": 0},
         "data": {"image_size": 32, "batch_size": 64}, "schedule": {"epochs": len(top1_by_epoch), "name": "cosine"},
         "optim": {"lr": 0.1}}))
    (run_dir / "student.safetensors").symlink_to(student_file)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Real exported students: a plain timm model, and a shared-classifier one (backbone + P + C)."""
    tmp = tmp_path_factory.mktemp("exports")
    files = {}
    for method, shared in (("supervised", False), ("atsc", True)):
        config = student_config(method, shared)
        files[method] = tmp / f"{method}.safetensors"
        save_student(build_from_config(config).state_dict(), config, files[method])
    return files


def write_table(tmp: Path, published: bool = True) -> "compare.Table":
    """A table file with a teacher recipe and two rows, beside their (minimal) recipes."""
    folder = tmp / "recipes"
    folder.mkdir()
    (folder / "teacher-r18.yaml").write_text("student: {model: resnet18}\n")
    (folder / "supervised.yaml").write_text("student: {model: test_resnet}\n")
    (folder / "atsc.yaml").write_text(
        "student: {model: test_resnet}\nteachers:\n  - {model: resnet18, checkpoint: runs/x/teacher-r18/student.safetensors}\n")
    table = {"title": "A fabricated table", "out": str(tmp), "seeds": [0, 1, 2],
             "rows": [{"pair": "resnet18 -> test_resnet", "runs": [
                 {"label": "supervised (student alone)", "recipe": "supervised.yaml",
                  **({"published": 88.5, "source": "crd"} if published else {})},
                 {"label": "ATSC", "recipe": "atsc.yaml"}]}],
             "teachers": {"teacher-r18": {"published": 98.0, "source": "crd"}} if published else {},
             "sources": {"crd": "Tian et al., ICLR 2020, Table 1"} if published else {}}
    (folder / "table.yaml").write_text(yaml.safe_dump(table))
    return compare.load_table(folder / "table.yaml")


def test_report_means_stds_params_published_and_plot(tmp_path, exported):
    table = write_table(tmp_path)
    curves = {
        "supervised": {0: [0.5, 0.8, 0.90], 1: [0.4, 0.7, 0.86], 2: [0.6, 0.8, 0.88]},
        "atsc": {0: [0.6, 0.9, 0.97], 1: [0.7, 0.9, 0.95], 2: [0.5, 0.9, 0.96]},
    }
    walls = {"supervised": [10.0, 12.0, 14.0], "atsc": [30.0, 31.0, 35.0]}
    for method, by_seed in curves.items():
        for seed, curve in by_seed.items():
            fabricate_run(tmp_path / f"{method}-s{seed}", method, "test_resnet", curve, walls[method][seed],
                          exported[method])
    fabricate_run(tmp_path / "teacher-r18", "supervised", "resnet18", [0.9, 0.98], 50.0, exported["supervised"])

    result = compare.report(table, tmp_path, [0, 1, 2])

    rows = {r["run"]: r for r in result["rows"]}
    for method, by_seed in curves.items():
        finals = [c[-1] for c in by_seed.values()]
        assert rows[method]["top1_mean"] == pytest.approx(statistics.fmean(finals))
        assert rows[method]["top1_std"] == pytest.approx(statistics.stdev(finals))
        assert rows[method]["wall_mean_s"] == pytest.approx(statistics.fmean(walls[method]))
        assert rows[method]["epochs"] == [1, 2, 3]
        assert rows[method]["curve_mean"][1] == pytest.approx(statistics.fmean(c[1] for c in by_seed.values()))
        assert rows[method]["curve_std"][0] == pytest.approx(statistics.stdev(c[0] for c in by_seed.values()))
    # the fabricated supervised std by hand: finals 0.90, 0.86, 0.88 -> std 0.02
    assert rows["supervised"]["top1_std"] == pytest.approx(0.02)
    assert rows["supervised"]["best_mean"] == pytest.approx(0.88)  # the best epoch is the last in every seed
    # parameter counts: the plain student with its head; the shared one without its unused head
    plain = timm.create_model("test_resnet", num_classes=10)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_head = sum(p.numel() for p in plain.get_classifier().parameters())
    shared = build_from_config(student_config("atsc", True))
    n_projector = sum(p.numel() for p in shared.projectors.parameters())
    assert rows["supervised"]["params"] == n_plain
    assert rows["atsc"]["params"] == n_plain - n_head + n_projector + PROJECTED * 10 + 10
    assert rows["atsc"]["params_in_file"] - rows["atsc"]["params"] == n_head
    assert result["teachers"]["teacher-r18"]["top1"] == pytest.approx(0.98)

    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# A fabricated table")
    # top-1 in % as papers print it, the published number and its source beside it
    assert (f"| resnet18 -> test_resnet | ATSC | 96.00 ± 1.00 | 97.00 / 95.00 / 96.00 | 96.00 ± 1.00 | | "
            f"{rows['atsc']['params']:,} |") in md
    assert ("| resnet18 -> test_resnet | supervised (student alone) | 88.00 ± 2.00 | 90.00 / 86.00 / 88.00 | "
            "88.00 ± 2.00 | 88.50 [crd] |") in md
    assert "| teacher | resnet18 (teacher-r18, 1 run) | 98.00 | | 98.00 | 98.00 [crd] |" in md
    assert "- [crd] Tian et al., ICLR 2020, Table 1" in md
    png = (tmp_path / "top1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][1]["top1_by_seed"] == {"0": 0.97, "1": 0.95, "2": 0.96}


def test_a_table_without_published_numbers_has_no_published_column(tmp_path, exported):
    table = write_table(tmp_path, published=False)
    for method in ("supervised", "atsc"):
        fabricate_run(tmp_path / f"{method}-s0", method, "test_resnet", [0.5, 0.9], 10.0, exported[method])
    fabricate_run(tmp_path / "teacher-r18", "supervised", "resnet18", [0.98], 50.0, exported["supervised"])
    compare.report(table, tmp_path, [0])
    assert "published" not in (tmp_path / "results.md").read_text().splitlines()[2]


def test_rows_say_whether_they_beat_the_baseline_and_what_became_of_an_adapted_teacher(tmp_path, exported):
    table = write_table(tmp_path, published=False)
    table.baseline = "supervised"
    finals = {"supervised": [0.90, 0.86, 0.88], "atsc": [0.97, 0.95, 0.96]}
    for method, values in finals.items():
        for seed, final in enumerate(values):
            run = tmp_path / f"{method}-s{seed}"
            fabricate_run(run, method, "test_resnet", [0.5, final], 10.0, exported[method])
            if method == "atsc":  # the adapted teacher's end, and the guard's trip in seeds 0 and 2
                summary = json.loads((run / "summary.json").read_text())
                summary["teachers"] = {"0:resnet18": {"top1": [0.5, 0.7, 0.6][seed], "top5": 1.0, "loaded_top1": 0.98}}
                (run / "summary.json").write_text(json.dumps(summary))
                if seed != 1:
                    with (run / "metrics.jsonl").open("a") as f:
                        f.write(json.dumps({"kind": "teacher_guard", "teacher": "0:resnet18", "step": 10 + seed,
                                            "action": "warn", "top1_start": 0.99, "top1_smoothed": 0.9}) + "\n")
    fabricate_run(tmp_path / "teacher-r18", "supervised", "resnet18", [0.98], 50.0, exported["supervised"])
    result = compare.report(table, tmp_path, [0, 1, 2])
    md = (tmp_path / "results.md").read_text().splitlines()
    assert "| vs supervised: final | vs supervised: best epoch | adapted teacher's top-1 %: final (lowest epoch) |" in md[2]
    (atsc,) = [line for line in md if "| ATSC |" in line]
    # +8.00 points against a pooled std of sqrt((2^2 + 1^2) / 2) = 1.58: beats it
    assert "| +8.00 (yes, pooled std 1.58) | +8.00 (yes, pooled std 1.58) | 60.00 ± 10.00 (lowest 60.00); guard tripped 2/3 at step 10-12 |" in atsc
    (supervised,) = [line for line in md if "| supervised (student alone) |" in line]
    assert "88.00 ± 2.00 | 90.00 / 86.00 / 88.00 | 88.00 ± 2.00 | | | |" in supervised
    row = {r["run"]: r for r in result["rows"]}["atsc"]
    assert row["adapted_teachers"]["0:resnet18"]["trip_steps"] == [10, 12]
    with pytest.raises(compare.CompareError, match="`baseline` 'simkd' names no row"):
        path = table.path
        tree = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**tree, "baseline": "simkd"}))
        compare.load_table(path)


def test_unfinished_run_is_named(tmp_path, exported):
    table = write_table(tmp_path)
    fabricate_run(tmp_path / "supervised-s0", "supervised", "test_resnet", [0.5, 0.9], 10.0, exported["supervised"])
    (tmp_path / "supervised-s0" / "summary.json").unlink()
    with pytest.raises(compare.CompareError, match=r"supervised-s0/summary.json is missing"):
        compare.report(table, tmp_path, [0])


def test_bad_tables_are_refused_with_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    path = folder / "table.yaml"
    path.write_text("rows:\n  - pair: a\n    runs:\n      - {recipe: nowhere.yaml}\n")
    with pytest.raises(compare.CompareError, match=r"table.yaml: rows\[0\].runs\[0\].recipe 'nowhere.yaml' is not a recipe"):
        compare.load_table(path)
    path.write_text("rows:\n  - pair: a\n    runs:\n      - {recipe: ../t/table.yaml, set: [optim.lr=1]}\n")
    with pytest.raises(compare.CompareError, match=r"overrides its recipe \(`set`\) and needs a `name`"):
        compare.load_table(path)
    path.write_text("rowz: []\n")
    with pytest.raises(compare.CompareError, match=r"unknown key\(s\) rowz"):
        compare.load_table(path)


def test_plan_trains_each_teacher_once_and_points_students_at_it(tmp_path):
    table = compare.load_table(ROOT_DIR / "recipes" / "compare" / "table.yaml")
    teachers, students = compare.plan(table, tmp_path, ["runtime.threads=1"], [0, 1])
    stems = [c.stem for c in table.cells]
    assert len({t.name for t in teachers}) == len(teachers) >= 2
    assert [s.name for s in students][:len(stems)] == [f"{stem}-s0" for stem in stems]  # seed-major
    two = next(s for s in students if s.name.startswith("atsc-2teachers") and s.name.endswith("-s1"))
    assert len(two.depends) == 2
    assert f"teachers.1.checkpoint={tmp_path / two.depends[1] / 'student.safetensors'}" in two.sets
    assert "runtime.seed=1" in two.sets and "runtime.threads=1" in two.sets
    assert len({s.key for s in students}) == len(students)  # every run its own key


def test_an_ablation_row_reuses_a_recipe_with_its_own_overrides_and_shares_the_other_runs(tmp_path):
    main = compare.load_table(ROOT_DIR / "recipes" / "compare" / "table.yaml")
    ablation = compare.load_table(ROOT_DIR / "recipes" / "compare" / "ablation.yaml")
    main_jobs = {j.name: j for j in compare.plan(main, tmp_path, [], [0])[1]}
    ablation_jobs = {j.name: j for j in compare.plan(ablation, tmp_path, [], [0])[1]}
    assert ablation_jobs["atsc-published-s0"].key == main_jobs["atsc-published-s0"].key  # the same run: reused
    assert "method.anchor_weight=0" in ablation_jobs["atsc-w0-s0"].sets
    assert ablation_jobs["atsc-w0-s0"].recipe == main_jobs["atsc-published-s0"].recipe


def test_a_stopped_run_continues_and_a_stale_one_starts_again(tmp_path, monkeypatch):
    """A run whose start marker carries its key continues with --resume; another key trains from scratch."""
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        out = Path(next(s for s in cmd if s.startswith("output=")).split("=", 1)[1])
        (out / "summary.json").write_text(json.dumps({"student": {"top1": 0.5}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    job = compare.Job("atsc-s0", ROOT_DIR / "recipes" / "compare" / "atsc.yaml", tmp_path / "atsc-s0",
                      [f"output={tmp_path / 'atsc-s0'}"], key="k1")
    job.output.mkdir()
    (job.output / "compare-started.txt").write_text("k1\n")
    (job.output / "checkpoints").mkdir()  # what the stopped run left
    compare.run_job(job, tmp_path / "logs")
    assert commands[-1][-1] == "--resume" and (job.output / "checkpoints").is_dir()
    assert json.loads((job.output / "compare-process.json").read_text())["resumed"] == 1

    compare.run_job(job, tmp_path / "logs")  # finished: reused, nothing launched
    assert len(commands) == 1

    stale = compare.Job(job.name, job.recipe, job.output, job.sets, key="k2")
    compare.run_job(stale, tmp_path / "logs")
    assert "--resume" not in commands[-1] and not (job.output / "checkpoints").exists()

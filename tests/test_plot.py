"""`python -m harness.plot` and the TensorBoard files of a real run: ATSC from two teachers on the digits,
2 processes under ZeRO-2, stopped mid-run and resumed; the panels and event files hold metrics.jsonl's numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, launch, records, tiny_recipe
from harness import plot

TEACHERS = ("0:test_resnet", "1:test_resnet")  # one checkpoint twice: two teachers, each adapted on its own
TEACHER = TEACHERS[0]


@pytest.fixture(scope="module")
def real_run(work, digits, teacher) -> Path:
    recipe = tiny_recipe(work, digits, "plotted", teachers=[{"model": "test_resnet", "checkpoint": str(teacher)}] * 2,
                         method={"name": "atsc", "anchor_weight": 1.0, "adapt_after": 1},
                         schedule={"epochs": 3, "name": "cosine"}, runtime={"log_every": 5, "zero_stage": 2})
    first = launch([str(recipe), "--stop-after-steps", "30"], cwd=work, processes=2)
    assert first.returncode == 0
    second = launch([str(recipe), "--resume"], cwd=work, processes=2)
    assert second.returncode == 0
    return work / "plotted"


def last_per_step(run: Path) -> list[dict]:
    by_step = {r["step"]: r for r in records(run, "train")}
    return [by_step[s] for s in sorted(by_step)]


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return list(found.get_xdata()), list(found.get_ydata())


def test_the_train_records_carry_each_teachers_anchor_distance(real_run):
    adapted = [r for r in records(real_run, "train") if "anchor_dist" in r]
    assert adapted and all(r["epoch"] >= 1 for r in adapted)
    for r in adapted:  # w = 1: the anchor term is the sum of the squared distances (each summed over both ranks)
        assert set(r["anchor_dist"]) == set(TEACHERS) and all(d > 0 for d in r["anchor_dist"].values())
        assert r["anchor"] == pytest.approx(sum(d ** 2 for d in r["anchor_dist"].values()), rel=1e-3, abs=1e-6)
    assert adapted[-1]["anchor_dist"][TEACHERS[0]] != adapted[-1]["anchor_dist"][TEACHERS[1]]  # moved apart


def test_the_panels_are_drawn_from_the_runs_files(real_run):
    fig, axes = plot.figure([plot.load_run(real_run)])
    train = last_per_step(real_run)
    steps = [r["step"] for r in train]
    assert line(axes["loss"], "loss") == (steps, [r["loss"] for r in train])
    assert line(axes["loss"], "feature0") == (steps, [r["feature0"] for r in train])
    assert line(axes["lr"], "lr") == (steps, [r["lr"] for r in train])
    assert line(axes["images_per_s"], "images/s") == (steps, [r["images_per_s"] for r in train])
    assert line(axes["data_wait"], "data wait") == (steps, [pytest.approx(100 * r["data_wait"]) for r in train])
    adapted = [r for r in train if "anchor_dist" in r]
    for teacher in TEACHERS:
        assert line(axes["anchor_dist"], teacher) == ([r["step"] for r in adapted],
                                                      [r["anchor_dist"][teacher] for r in adapted])
    watched = [r for r in train if "teacher_train" in r]  # each adapting teacher's own training CE and top-1
    assert watched and [r["step"] for r in watched] == [r["step"] for r in adapted]
    for teacher in TEACHERS:
        for panel, metric in (("teacher_top1", "top1"), ("teacher_ce", "ce")):
            for label, key in ((teacher, metric), (f"{teacher} smoothed", f"{metric}_smoothed"),
                               (f"{teacher} at adaptation start", f"{metric}_start")):
                assert line(axes[panel], label) == ([r["step"] for r in watched],
                                                    [r["teacher_train"][teacher][key] for r in watched]), (panel, label)
    evals = [r for r in records(real_run, "eval") if "student" in r]
    assert line(axes["top1"], "student") == ([r["epoch"] for r in evals], [r["student"]["top1"] for r in evals])
    assert line(axes["top1"], TEACHER) == ([r["epoch"] for r in evals], [r[TEACHER]["top1"] for r in evals])
    (loaded,) = [r for r in records(real_run, "eval") if "teachers_as_loaded" in r]
    assert line(axes["top1"], f"{TEACHER} as loaded")[1] == [loaded["teachers_as_loaded"][TEACHER]["top1"]] * 2
    summary = json.loads((real_run / "summary.json").read_text())
    assert f"student top-1 {summary['student']['top1']:.4f}" in fig.get_suptitle()


def test_the_command_writes_a_png_per_run_and_one_comparing_runs(real_run, work):
    result = subprocess.run([sys.executable, "-m", "harness.plot", str(real_run)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(real_run / "plot.png")
    with Image.open(real_run / "plot.png") as image:
        assert image.format == "PNG" and image.size[0] >= 900 and image.size[1] >= 900
        assert len(image.convert("L").getcolors(1 << 16)) > 50  # drawn, not blank
    out = plot.plot([real_run, work / "teacher"])
    assert out == work / "compare.png" and out.stat().st_size > 10_000
    _, axes = plot.figure([plot.load_run(real_run), plot.load_run(work / "teacher")])
    labels = {ln.get_label() for ln in axes["loss"].get_lines()}
    assert {"plotted: loss", "plotted: feature0", "teacher: loss", "teacher: ce"} <= labels


def test_a_directory_without_metrics_is_refused_by_name(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.plot", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path}: no metrics.jsonl there; give a run's output directory (the recipe's `output`)\n"


def test_the_event_files_hold_the_same_records_across_the_resume(real_run):
    acc = EventAccumulator(str(real_run / "tensorboard"))
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    train = last_per_step(real_run)
    assert (real_run / "tensorboard").is_dir() and len(list((real_run / "tensorboard").iterdir())) == 2  # two runs, one log
    assert 30 in scalars["resume/epoch"]  # the resumed run's own record, at its checkpoint's step
    for key in ("loss", "feature0", "feature1", "bias0", "anchor", "lr", "images_per_s", "data_wait", "memory_gb"):
        assert scalars[f"train/{key}"] == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in train if key in r}, key
    for teacher in TEACHERS:
        for key in ("ce", "top1", "top1_start", "top1_smoothed"):
            assert scalars[f"train/teacher_train/{teacher}/{key}"] == {
                r["step"]: pytest.approx(r["teacher_train"][teacher][key], rel=1e-6) for r in train
                if "teacher_train" in r}, (teacher, key)
        assert scalars[f"train/anchor_dist/{teacher}"] == {
            r["step"]: pytest.approx(r["anchor_dist"][teacher], rel=1e-6) for r in train if "anchor_dist" in r}
    evals = [r for r in records(real_run, "eval") if "student" in r]
    assert scalars["eval/student/top1"] == {r["step"]: pytest.approx(r["student"]["top1"]) for r in evals}
    assert scalars[f"eval/{TEACHER}/top1"] == {r["step"]: pytest.approx(r[TEACHER]["top1"]) for r in evals}
    (loaded,) = [r for r in records(real_run, "eval") if "teachers_as_loaded" in r]
    assert scalars[f"eval_loaded/{TEACHER}/top1"] == {0: pytest.approx(loaded["teachers_as_loaded"][TEACHER]["top1"])}

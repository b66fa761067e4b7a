"""The teacher guard in whole runs: a teacher made to collapse, at 2 processes and ZeRO 0, 2 and 3.

The collapse is forced the way the published settings meet it, only faster: no anchor and the
teacher at 5x the student's lr, so the teacher's own training top-1 falls within the first
epoch. The guard must trip at the same step and with the same values however the run is
split: across ZeRO stages (up to the engines' last bits), and exactly across a stop and resume.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, records, summary, tiny_recipe
from harness import plot

NAME = "0:test_resnet"


def collapse_recipe(work: Path, digits: Path, teacher: Path, name: str, stage: int, action: str) -> Path:
    return tiny_recipe(work, digits, name, teachers=[{"model": "test_resnet", "checkpoint": str(teacher)}],
                       method={"name": "atsc", "anchor_weight": 0.0, "adapt_after": 0,
                               "teacher_guard": {"max_drop": 5.0, "window": 4, "action": action}},
                       optim={"teacher_lr_mult": 5.0}, schedule={"epochs": 2, "name": "cosine"},
                       runtime={"log_every": 4, "zero_stage": stage})


@pytest.fixture(scope="module")
def frozen_runs(work, digits, teacher) -> dict[int, Path]:
    """The guard's `freeze` at ZeRO 0, 2 and 3, 2 processes each."""
    runs = {}
    for stage in (0, 2, 3):
        name = f"guard-freeze{stage}"
        result = launch([str(collapse_recipe(work, digits, teacher, name, stage, "freeze"))], cwd=work, processes=2)
        assert result.returncode == 0, f"ZeRO-{stage}: {result.stderr[-3000:]}"
        runs[stage] = work / name
    return runs


def trip_of(run: Path) -> dict:
    (trip,) = records(run, "teacher_guard")
    return trip


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_freeze_trips_once_and_the_teacher_stops_moving(frozen_runs, stage):
    run = frozen_runs[stage]
    trip = trip_of(run)
    assert trip["teacher"] == NAME and trip["action"] == "freeze" and trip["drop_points"] > 5.0
    train = records(run, "train")
    watched = [r["teacher_train"][NAME] for r in train]
    assert all(set(w) >= {"ce", "top1", "ce_start", "top1_start", "ce_smoothed", "top1_smoothed"} for w in watched)
    start = watched[-1]["top1_start"]
    assert start > 0.8 and all(w["top1_start"] == start for w in watched if w is not watched[0])
    # frozen from the trip on: ||W - W0|| of the teacher never changes again
    after = [r["anchor_dist"][NAME] for r in train if r["step"] > trip["step"]]
    assert len(after) >= 5 and len(set(after)) == 1, after
    # ... and in eval mode: both evaluations after the trip see the same teacher
    evals = [r[NAME]["top1"] for r in records(run, "eval") if NAME in r and r["step"] > trip["step"]]
    assert len(evals) == 2 and evals[0] == evals[1]
    s = summary(run)
    assert s["teachers"][NAME]["top1"] < s["teachers"][NAME]["loaded_top1"]  # it did collapse some way first
    _, axes = plot.figure([plot.load_run(run)])  # the trip is drawn where the teacher's own top-1 is
    (mark,) = [ln for ln in axes["teacher_top1"].get_lines() if "guard" in ln.get_label()]
    assert mark.get_label() == f"{NAME} guard: freeze at step {trip['step']}" and list(mark.get_xdata()) == [trip["step"]] * 2


def test_every_zero_stage_trips_at_the_same_step_with_the_same_values(frozen_runs):
    trips = {stage: trip_of(run) for stage, run in frozen_runs.items()}
    for stage in (2, 3):
        assert trips[stage]["step"] == trips[0]["step"], stage
        for key in ("top1_start", "top1_smoothed"):
            assert trips[stage][key] == pytest.approx(trips[0][key], abs=0.02), (stage, key)


def test_a_resumed_run_trips_exactly_where_the_uninterrupted_one_did(work, digits, teacher, frozen_runs):
    straight = trip_of(frozen_runs[2])
    name = "guard-freeze2-resumed"
    recipe = collapse_recipe(work, digits, teacher, name, 2, "freeze")
    stop_at = straight["step"] - 3  # mid-window: the watch's state must come back from the checkpoint
    assert stop_at > 4, straight
    first = launch([str(recipe), "--stop-after-steps", str(stop_at)], cwd=work, processes=2)
    assert first.returncode == 0 and not records(work / name, "teacher_guard")
    second = launch([str(recipe), "--resume"], cwd=work, processes=2)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = trip_of(work / name)
    assert {k: v for k, v in resumed.items() if k != "time"} == {k: v for k, v in straight.items() if k != "time"}
    a, b = load_file(str(work / name / "student.safetensors")), load_file(str(frozen_runs[2] / "student.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_stop_checkpoints_and_exits_with_the_message_and_a_resume_obeys_the_recipe(work, digits, teacher):
    name = "guard-stop"
    recipe = collapse_recipe(work, digits, teacher, name, 0, "stop")
    result = launch([str(recipe)], cwd=work)
    assert result.returncode != 0  # 2 from the run; the launcher passes on a failure as 1
    trip = trip_of(work / name)
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and NAME in error[0] and f"step {trip['step']}" in error[0] and "--resume" in error[0]
    latest = (work / name / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"step{trip['step']:08d}")
    assert not (work / name / "student.safetensors").exists()
    failure = json.loads((work / name / "failure-rank0.json").read_text())
    assert failure["cause"].startswith("TeacherCollapsed")  # the same cause again: not restarted (harness/restarts.py)
    trained = len(records(work / name, "train"))
    again = launch([str(recipe), "--resume"], cwd=work)  # the recipe still says stop: it stops at once
    assert again.returncode != 0 and "error:" in again.stderr and NAME in again.stderr
    assert len(records(work / name, "train")) == trained  # not one step more
    on = launch([str(recipe), "--resume", "--set", "method.teacher_guard.action=warn"], cwd=work)
    assert on.returncode == 0, on.stderr[-3000:]
    assert summary(work / name)["epochs"] == 2


VARIES = {"time", "images_per_s", "data_wait", "memory_gb"}  # what the clock and the host decide


def deterministic(run: Path, kind: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VARIES} for r in records(run, kind)]


@pytest.mark.parametrize("processes", [1, 2])
def test_one_recipe_and_seed_give_the_same_run_bit_for_bit(work, digits, teacher, frozen_runs, processes):
    """What keeps a documented table reproducible: the same recipe and seed, run again, is the same run.

    The guard's recipe (ATSC, a teacher that collapses and is frozen) at ZeRO-0: every weight,
    every logged value and the trip are equal, at 1 process and at 2.
    """
    runs = [frozen_runs[0]] if processes == 2 else []
    for i in range(2 - len(runs)):
        name = f"guard-again{processes}-{i}"
        result = launch([str(collapse_recipe(work, digits, teacher, name, 0, "freeze"))], cwd=work, processes=processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(work / name)
    a, b = (load_file(str(run / "student.safetensors")) for run in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kind in ("train", "eval", "teacher_guard"):
        assert deterministic(runs[0], kind) == deterministic(runs[1], kind), kind
    assert summary(runs[0])["student"] == summary(runs[1])["student"]


@pytest.mark.parametrize("stage", [0, 3])
def test_drift_says_how_far_each_kind_of_teacher_parameter_moved(frozen_runs, teacher, stage):
    from harness.export import consolidated_state, teacher_drift
    from harness import checkpoint

    drift = teacher_drift(frozen_runs[stage])[NAME]
    assert set(drift) == {"weights", "norm scales", "norm shifts", "biases"} and drift["weights"] > 0
    loaded = load_file(str(teacher))  # the teacher's file: the weights it adapted from (adapt_after 0)
    adapted = consolidated_state(checkpoint.latest(frozen_runs[stage]))
    weights = [k for k, v in loaded.items() if v.dim() > 1]
    by_hand = (sum((adapted[f"teachers.0.{k}"] - loaded[k]).pow(2).sum() for k in weights)
               / sum(loaded[k].pow(2).sum() for k in weights)) ** 0.5
    assert drift["weights"] == pytest.approx(by_hand.item(), rel=1e-5)

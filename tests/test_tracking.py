"""Experiment tracking: TensorBoard event files always (read back), the trackers that are installed,
the refusal of one that is not, and the per-teacher anchor distance the train records carry."""
import json
import struct
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_recipe, wait_for
from harness import run, step_loop, tracking
from harness.metrics import MetricsLog
from harness.recipe import RecipeError
from harness.tracking import Tracking, scalars

TEACHERS = ["0:resnet34", "1:resnet50"]


def loaded_eval() -> dict:
    return {"teachers_as_loaded": {t: {"top1": (0.7, 0.8)[i], "top5": 0.9, "samples": 100} for i, t in enumerate(TEACHERS)}}


def train_record(step: int, loss: float) -> dict:
    return {"epoch": step // 10, "step": step, "lr": 0.1 / step, "images_per_s": 100.0 + step, "data_wait": 0.01,
            "memory_gb": 1.5, "loss": loss, "feature0": loss / 2, "anchor": 0.01 * step,
            "anchor_dist": {t: 0.1 * step * (i + 1) for i, t in enumerate(TEACHERS)}}


def eval_record(step: int) -> dict:
    return {"epoch": step // 10, "step": step, "student": {"top1": 0.5 + step / 100, "top5": 0.9},
            **{t: {"top1": 0.8, "top5": 0.95} for t in TEACHERS}}


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def series(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)]


def test_scalars_are_keyed_by_kind_field_and_model():
    assert scalars("eval", {"epoch": 0, "step": 0, **loaded_eval()}) == {
        "eval/epoch": 0.0, "eval_loaded/0:resnet34/top1": 0.7, "eval_loaded/0:resnet34/top5": 0.9,
        "eval_loaded/0:resnet34/samples": 100.0, "eval_loaded/1:resnet50/top1": 0.8,
        "eval_loaded/1:resnet50/top5": 0.9, "eval_loaded/1:resnet50/samples": 100.0}
    assert scalars("resume", {"checkpoint": "runs/x/checkpoints/epoch0001", "epoch": 1, "step": 22}) == {
        "resume/epoch": 1.0}  # a path is not a scalar; the step is the axis
    got = scalars("train", train_record(10, 2.0))
    assert got["train/loss"] == 2.0 and got["train/anchor_dist/1:resnet50"] == pytest.approx(2.0)


def test_every_record_reaches_tensorboard_at_its_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path))
    log.write("eval", epoch=0, step=0, **loaded_eval())
    for step, loss in ((5, 2.0), (10, 1.5)):
        log.write("train", **train_record(step, loss))
    log.write("eval", **eval_record(10))
    log.close()
    acc = events(tmp_path)
    assert series(acc, "train/loss") == [(5, 2.0), (10, 1.5)]
    assert series(acc, "train/feature0") == [(5, 1.0), (10, 0.75)]
    assert series(acc, "train/lr") == [(5, 0.02), (10, 0.01)]
    assert series(acc, "train/images_per_s") == [(5, 105.0), (10, 110.0)]
    assert series(acc, "train/anchor") == [(5, 0.05), (10, 0.1)]
    assert series(acc, "train/anchor_dist/1:resnet50") == [(5, 1.0), (10, 2.0)]
    assert series(acc, "eval/student/top1") == [(10, 0.6)]
    assert series(acc, "eval/0:resnet34/top1") == [(10, 0.8)]
    assert series(acc, "eval_loaded/1:resnet50/top1") == [(0, 0.8)]
    assert {"train/data_wait", "train/memory_gb", "eval/student/top5"} <= set(acc.Tags()["scalars"])
    # the same records in metrics.jsonl
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["eval", "train", "train", "eval"]


def test_only_the_main_process_writes(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", False, Tracking(tmp_path))
    log.write("train", **train_record(5, 2.0))
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()


def test_a_resumed_run_replaces_what_came_after_its_checkpoint(tmp_path):
    first = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path))
    for step in (5, 10, 15, 20):  # checkpointed at step 10, then stopped (killed) after step 20
        first.write("train", **train_record(step, 10.0 + step))
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path))
    resumed.write("resume", checkpoint="checkpoints/epoch0001", epoch=1, step=10)
    for step in (15, 20, 25):
        resumed.write("train", **train_record(step, float(step)))
    resumed.close()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["tensorboard"]  # one run, not two
    acc = events(tmp_path)
    assert series(acc, "train/loss") == [(5, 15.0), (10, 20.0), (15, 15.0), (20, 20.0), (25, 25.0)]


def test_a_tracker_that_is_not_installed_stops_the_run_before_it_starts(work, digits, tmp_path, monkeypatch, capsys):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    monkeypatch.setattr(run, "init_runtime", lambda *a, **k: pytest.fail("the run started up"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    recipe = tiny_recipe(tmp_path, digits, "tracked", runtime={"trackers": ["mlflow"]})
    assert run.main([str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: ") and "Traceback" not in err
    assert "`runtime.trackers`" in err and "mlflow, which is not installed (`pip install mlflow`)" in err
    assert not (tmp_path / "tracked").exists()


def test_wandb_without_credentials_or_offline_mode_is_refused_with_the_fix(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RecipeError, match="no W&B credentials .*WANDB_MODE=offline"):
        tracking.check_trackers(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracking.check_trackers(["wandb"])  # offline needs none
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    tracking.check_trackers(["wandb"])  # `wandb login` writes this


# ----------------------------------------------------------------------------- trackers, where installed


def _wandb_records(path: Path):
    """The protobuf records of a W&B run file (a leveldb-format log; wandb ships no reader of it)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""  # 7: the file header (":W&B", magic, version)
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = next(run_dir.glob("run-*.wandb"))
    # wandb's service process finishes writing the file after run.finish() returns
    wait_for(lambda: any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path)), 30, f"the end of {path}")
    found: dict[str, list] = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    found.setdefault(key, []).append((items["_step"], value))
    return found


def test_wandb_offline_logs_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["wandb"], "proj", "demo", {"optim": {"lr": 0.1}}))
    first.write("eval", epoch=0, step=0, **loaded_eval())
    first.write("train", **train_record(5, 2.0))
    first.write("eval", **eval_record(5))
    first.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    (offline,) = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}")
    history = _wandb_history(offline)
    assert history["train/loss"] == [(5, 2.0)] and history["eval/student/top1"] == [(5, 0.55)]
    assert history["eval_loaded/1:resnet50/top1"] == [(0, 0.8)]
    assert history["train/anchor_dist/0:resnet34"] == [(5, pytest.approx(0.5))]

    resumed = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["wandb"], "proj", "demo"))
    resumed.write("resume", checkpoint="c", epoch=1, step=5)
    resumed.write("train", **train_record(10, 1.0))
    resumed.close()
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb"] == run_id
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and sorted((tmp_path / "wandb").glob("offline-run-*")) == runs  # the same run id
    assert _wandb_history(runs[-1])["train/loss"] == [(10, 1.0)]


def test_mlflow_logs_to_a_store_in_the_output_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["mlflow"], "proj", "demo", {"optim": {"lr": 0.1}}))
    first.write("train", **train_record(5, 2.0))
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["mlflow"], "proj", "demo"))
    resumed.write("resume", checkpoint="c", epoch=1, step=5)
    resumed.write("train", **train_record(10, 1.0))
    resumed.write("eval", **eval_record(10))
    resumed.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(5, 2.0), (10, 1.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/student/top1")] == [(10, 0.6)]
    assert client.get_run(run_id).data.params["optim.lr"] == "0.1"


def test_aim_logs_to_a_repo_in_the_output_and_a_resume_continues_the_same_run(tmp_path):
    """The run hash is kept and reopened: one run in ``<output>/.aim``. (Aim 3.29 reads back no
    metric of a closed local run, even one tracked by aim.Run directly: the values are not checked.)"""
    aim = pytest.importorskip("aim")
    first = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["aim"], "proj", "demo"))
    first.write("train", **train_record(5, 2.0))
    first.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", True, Tracking(tmp_path, ["aim"], "proj", "demo"))
    resumed.write("resume", checkpoint="c", epoch=1, step=5)
    resumed.write("train", **train_record(10, 1.0))
    resumed.close()
    run_hash = json.loads((tmp_path / "trackers.json").read_text())["aim"]
    assert aim.Repo.from_path(str(tmp_path)).list_all_runs() == [run_hash]


# ----------------------------------------------------------------------------- anchor distance per teacher


def test_each_teachers_anchor_distance_is_tracked_on_its_own():
    from harness.build import build_distiller
    from harness.optim import build_optimizer, set_lr, set_teachers_trainable
    from test_method import STUDENT_PRE, models, recipe

    teachers_models = ("test_resnet", "test_resnet")
    student, teachers = models(teachers=teachers_models)
    d = build_distiller(recipe(teachers=teachers_models), student, teachers, STUDENT_PRE)
    groups = d.param_groups()
    assert [(g["role"], g.get("anchor"), g.get("teacher")) for g in groups] == [
        ("student", None, None), ("teacher", True, 0), ("teacher", False, 0), ("teacher", True, 1), ("teacher", False, 1)]
    opt = build_optimizer(groups, recipe().optim.model_copy(update={"momentum": 0.0, "weight_decay": 0.0}),
                          anchor_weight=2.0)
    set_teachers_trainable(opt, True)
    set_lr(opt.param_groups, 0.0)  # nothing moves: the distances are what the test puts there
    opt.start_adaptation()
    for p in d.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # W0 := the weights now
    with torch.no_grad():
        for k, t in enumerate(teachers):
            for p in t.parameters():
                p.add_(0.1 * (k + 1))
    opt.track_anchor = True
    opt.step()
    sq = {k: sum((0.1 * (k + 1)) ** 2 * p.numel() for p in t.parameters() if p.dim() > 1) for k, t in enumerate(teachers)}
    got = opt.anchor_sq_distances()
    assert sorted(got) == [0, 1]
    for k in (0, 1):
        assert got[k].item() == pytest.approx(sq[k], rel=1e-4)
    assert opt.anchor_value().item() == pytest.approx(2.0 * (sq[0] + sq[1]), rel=1e-4)
    rt = type("Rt", (), {"device": torch.device("cpu"), "zero_stage": 0})()
    assert step_loop.anchor_distances(opt, rt, TEACHERS) == {
        TEACHERS[k]: pytest.approx(sq[k] ** 0.5, rel=1e-4) for k in (0, 1)}

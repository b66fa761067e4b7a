"""Refusals before start-up: what the files decide stops a run before any process group, engine
or output folder exists, in one message naming the recipe, the key and the fix, writing nothing."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from conftest import tiny_recipe
from harness import checkpoint, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_start_up(monkeypatch, tmp_path):
    """harness/run.py's main() in this process, with start-up (process group, engine) forbidden."""
    def started(*args, **kwargs):
        raise AssertionError("the run started up (process group) although the files decide the refusal")

    monkeypatch.setattr(run, "init_runtime", started)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def refused(recipe: Path, capsys, *extra: str) -> str:
    """main()'s exit status must be 2 and its stderr one message about ``recipe``; returns it."""
    assert run.main([str(recipe), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: ") and "Traceback" not in err
    return err


def weights(path: Path, model: str, num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    torch.save(timm.create_model(model, num_classes=num_classes).state_dict(), path)
    return path


def kd(tmp_path: Path, digits: Path, name: str, teacher: Path, model: str = "test_resnet", **sections) -> Path:
    return tiny_recipe(tmp_path, digits, name, teachers=[{"model": model, "checkpoint": str(teacher)}],
                       method={"name": "kd", "kd_weight": 0.9, "ce_weight": 0.1}, **sections)


def test_a_teacher_trained_on_other_classes_is_refused_before_start_up(no_start_up, tmp_path, digits, capsys):
    teacher = weights(tmp_path / "t1000.pth", "test_resnet", num_classes=1000)
    err = refused(kd(tmp_path, digits, "wrong-classes", teacher), capsys)
    assert f"`teachers[0]`: checkpoint {teacher} has a 1000-class classifier (fc.weight) but `data.num_classes` is " \
           f"10; use a teacher trained on this dataset's classes" in err
    assert not (tmp_path / "wrong-classes").exists()  # no output folder, no recipe.yaml


def test_a_zoo_teacher_is_checked_at_its_own_classifier(no_start_up, tmp_path, digits, capsys):
    teacher = weights(tmp_path / "vgg100.pth", "cifar_vgg8", num_classes=100)  # classifier: `classifier`
    err = refused(kd(tmp_path, digits, "zoo", teacher, model="cifar_vgg8"), capsys)
    assert "has a 100-class classifier (classifier.weight) but `data.num_classes` is 10" in err


def test_weights_of_another_architecture_or_no_weights_at_all_are_refused(no_start_up, tmp_path, digits, capsys):
    other = weights(tmp_path / "r18.pth", "resnet18")
    err = refused(kd(tmp_path, digits, "other-arch", other), capsys)
    assert f"`teachers[0]`: checkpoint {other} does not fit test_resnet (weights:" in err
    assert "missing, e.g. conv1.0.weight" in err and "unexpected, e.g. conv1.weight" in err
    assert "of another shape, e.g. bn1.weight (64,) (the model's: (32,))" in err and "set `teachers[0].model`" in err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 64)
    err = refused(kd(tmp_path, digits, "garbage", garbage), capsys)
    assert f"`teachers[0].checkpoint`: {garbage} cannot be read as model weights" in err
    assert not (tmp_path / "other-arch").exists() and not (tmp_path / "garbage").exists()


def test_unknown_models_and_their_keywords_are_refused(no_start_up, tmp_path, digits, capsys):
    err = refused(tiny_recipe(tmp_path, digits, "typo", student={"model": "test_resnett"}), capsys)
    assert "`student`: unknown timm model 'test_resnett'" in err
    err = refused(tiny_recipe(tmp_path, digits, "kwargs", student={"model": "test_resnet",
                                                                   "model_kwargs": {"depth_factor": 2}}), capsys)
    assert "`student.model_kwargs`: test_resnet does not take them" in err and "depth_factor" in err


def test_shards_that_cannot_feed_the_run_are_refused(no_start_up, tmp_path, digits, capsys, monkeypatch):
    same = tiny_recipe(tmp_path, digits, "same", data={"val": str(digits / "train")})
    err = refused(same, capsys)
    assert "`data.train` and `data.val` share 4 shard(s)" in err and "give each its own split's folder" in err
    mixed = tiny_recipe(tmp_path, digits, "mixed", data={"val": str(digits) + "/{train/train-000000,val/val-000000}.tar"})
    err = refused(mixed, capsys)
    assert "`data.val`: " in err and "names the shards of 2 splits: train (1 shard(s)" in err and "and val (" in err
    # samples are dealt, not shards: 4 shards feed 8 ranks; 64 ranks x 32 images outnumber the split
    monkeypatch.setenv("WORLD_SIZE", "64")  # as the launcher sets it for 64 processes
    err = refused(tiny_recipe(tmp_path, digits, "many"), capsys)
    assert "1438 train samples give no full optimizer step on 64 rank(s) (64 x 32 x 1 = 2048 samples)" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    err = refused(tiny_recipe(tmp_path, digits, "big-batch", data={"batch_size": 2048}), capsys)
    assert "1438 train samples give no full optimizer step" in err
    assert not any((tmp_path / name).exists() for name in ("same", "mixed", "many", "big-batch"))


def test_an_existing_run_is_refused_without_resume_and_left_as_it_was(no_start_up, tmp_path, digits, capsys):
    recipe = tiny_recipe(tmp_path, digits, "done")
    ckpt = checkpoint.checkpoint_dir(tmp_path / "done") / "epoch0004"
    ckpt.mkdir(parents=True)
    (ckpt.parent / "latest").write_text("epoch0004")
    for rank in range(2):  # ZeRO-2 optimizer partitions of a 2-process run
        (ckpt / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    def contents() -> list[Path]:
        # the one thing a refusal adds to an existing folder is harness/restarts.py's failure record
        # (a refusal recurs, so a requeued job is not restarted): no recipe.yaml, no metrics, checkpoints as they were
        return sorted(p.relative_to(tmp_path) for p in (tmp_path / "done").rglob("*") if "failure-rank" not in p.name)

    before = contents()
    assert "already holds a run (checkpoint epoch0004); pass --resume" in refused(recipe, capsys)
    assert "partitioned over 2 ranks (ZeRO); resume it with 2 processes" in refused(recipe, capsys, "--resume")
    assert contents() == before


def test_a_refusal_is_one_line_from_the_command(tmp_path, digits):
    teacher = weights(tmp_path / "t1000.pth", "test_resnet", num_classes=1000)
    recipe = kd(tmp_path, digits, "cli", teacher)
    result = subprocess.run([sys.executable, str(ROOT / "harness" / "run.py"), str(recipe)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {recipe}: `teachers[0]`: checkpoint {teacher} has a 1000-class classifier (fc.weight) but "
        f"`data.num_classes` is 10; use a teacher trained on this dataset's classes"]
    assert not (tmp_path / "cli").exists()

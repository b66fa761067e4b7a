"""The shipped recipes: every one validates, and each ImageNet teacher combination runs.

The ImageNet recipes run on CPU with timm's ``test_*`` stand-ins and the digits shards, through
``--set`` overrides only: the recipe's structure (teachers of different families, token
features, per-teacher preprocessing, optimizer, schedule, ZeRO stage) is the file's own.
Models that cannot work are refused before training with a message saying why.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors import safe_open

from conftest import launch, summary
from harness import models
from harness.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "recipes").rglob("*.yaml"))
TABLES = [p for p in FILES if "rows" in yaml.safe_load(p.read_text())]  # bench/compare.py's tables
RECIPES = [p for p in FILES if p not in TABLES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path, check_files=False)
    assert recipe.name == (yaml.safe_load(path.read_text()).get("name") or path.stem)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_table_plans_runs_whose_recipes_validate(path, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compare_tables", ROOT / "bench" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare  # its dataclasses look their module up
    spec.loader.exec_module(compare)
    table = compare.load_table(path)
    teachers, runs = compare.plan(table, tmp_path, [])
    assert len(runs) == len(table.cells) * len(table.seeds)
    for job in [*teachers, *runs]:  # the recipe with the driver's own overrides, as it will run
        load_recipe(job.recipe, overrides=job.sets, check_files=False)


# ----------------------------------------------------------------------------- runs with stand-ins


def random_teacher(tmp: Path, name: str, num_classes: int = 10) -> Path:
    """A random-init timm model's state dict: a teacher checkpoint with the dataset's classes."""
    path = tmp / f"{name}.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(timm.create_model(name, num_classes=num_classes).state_dict(), path)
    return path


# recipe -> (student stand-in, teacher stand-ins, extra overrides), each model of the real one's family
STAND_INS = {
    "imagenet-2teachers": ("test_resnet", ["test_resnet", "test_efficientnet"], []),
    # hub teachers replaced by local stand-ins; RandAugment, Mixup/CutMix and the EMA as the recipe has them
    "imagenet-a1-teachers": ("test_resnet", ["test_resnet", "test_efficientnet"], ["teachers.0.hub=null",
                                                                                   "teachers.1.hub=null"]),
    # the ViT teacher keeps its own view (mean/std 0.5) and sees the crop resized to 48 px
    "imagenet-convnext-vit": ("test_resnet", ["test_convnext", "test_vit"],
                              ["data.image_size=32", "teachers.1.image_size=48"]),
    "imagenet-vitl-vits": ("test_vit", ["test_vit2"], ["data.image_size=32"]),
    # ZeRO-3 with a big ViT teacher (a hub id, here a local stand-in) seeing its own 32 px view
    "imagenet-vith-resnet50-zero3": ("test_resnet", ["test_vit"], ["data.image_size=32", "teachers.0.hub=null",
                                                                  "teachers.0.image_size=32"]),
    # the zoo's own small members: the CIFAR augmentation, a 4 x 4 vgg map beside an 8 x 8 resnet one
    "cifar100/atsc-resnet32x4+vgg13-resnet8x4": ("cifar_resnet8", ["cifar_resnet8", "cifar_vgg8"], ["data.image_size=32"]),
}


def stand_in_overrides(name: str, tmp: Path, digits: Path) -> list[str]:
    student, teachers, extra = STAND_INS[name]
    sets = [f"output={tmp / name}", f"data.train={digits / 'train'}",
            f"data.val={digits / 'val'}", "data.num_classes=10", "data.image_size=16",
            "data.batch_size=16", "data.train_samples=64", "data.workers=1", "data.shuffle_buffer=100",
            f"student.model={student}", "schedule.epochs=1", "runtime.log_every=2", "runtime.threads=1",
            "method.adapt_after=0"]  # one epoch: the teachers adapt in it (the recipes keep them frozen for half a run)
    for k, teacher in enumerate(teachers):
        sets += [f"teachers.{k}.model={teacher}", f"teachers.{k}.checkpoint={random_teacher(tmp, teacher)}"]
    return sets + extra


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_imagenet_teacher_combination_runs_with_stand_ins(name, tmp_path, digits):
    recipe_path = ROOT / "recipes" / f"{name}.yaml"
    original = load_recipe(recipe_path, check_files=False)
    sets = stand_in_overrides(name, tmp_path, digits)
    args = [str(recipe_path)] + [a for s in sets for a in ("--set", s)]
    result = launch(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    run = tmp_path / name
    s = summary(run)
    assert s["method"] == "atsc" and s["student"]["samples"] == 359
    assert len(s["teachers"]) == len(original.teachers)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train, "no training step was logged"
    for k in range(len(original.teachers)):  # every teacher has its own feature loss and bias step
        bias = f"bias{k}" if original.method.bias_step == "fused" else "bias_two_pass"  # the second pass: one term
        assert all(torch.isfinite(torch.tensor([r[f"feature{k}"], r[bias]])).all() for r in train)
    assert train[-1]["anchor"] > 0  # the teachers adapted

    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    # what the stand-ins did not override is the recipe's own
    assert resolved["optim"] == original.model_dump(mode="json")["optim"]
    assert resolved["runtime"]["zero_stage"] == original.runtime.zero_stage
    with safe_open(str(run / "student.safetensors"), framework="pt") as f:
        config = json.loads(f.metadata()["harness"])
    taps = config["shared_classifier"]["taps"]
    if name in ("imagenet-2teachers", "imagenet-a1-teachers", "cifar100/atsc-resnet32x4+vgg13-resnet8x4"):
        assert taps == ["map", "map"]  # two CNN teachers: SimKD's conv projectors on feature maps
    else:
        assert taps == ["vector"] * len(original.teachers)  # ConvNeXt's normed head, ViT tokens: MLP projectors
    if original.runtime.ema is not None:
        assert "student_ema" in s and (run / "student-ema.safetensors").is_file()
    if name == "imagenet-convnext-vit":
        assert resolved["teachers"][1]["mean"] == [0.5, 0.5, 0.5] and resolved["teachers"][1]["image_size"] == 48
        assert resolved["teachers"][0]["mean"] != resolved["teachers"][1]["mean"]


# ----------------------------------------------------------------------------- refusals


def test_model_without_a_linear_classifier_is_refused_with_the_reason():
    with pytest.raises(models.ModelError, match=r"`teachers\[1\]`: .*no final linear classifier .*tuple"):
        models.create("deit_tiny_distilled_patch16_224", 10, where="teachers[1]")  # two heads


def test_model_that_cannot_take_the_input_size_is_refused_with_the_sizes_that_work():
    vit = models.create("test_vit3", 10)  # fixed 160 px position embeddings
    with pytest.raises(models.ModelError, match=r"test_vit3 cannot take 32 x 32 inputs .*built for 160.*dynamic_img_size"):
        models.feature_kind(vit, 32)
    assert models.feature_kind(vit, 160) == "vector"
    assert models.feature_kind(models.create("test_vit3", 10, kwargs={"dynamic_img_size": True}), 32) == "vector"


def test_head_that_changes_the_width_after_pooling_is_a_vector_feature():
    # MobileNetV3 pools, then a 1x1 conv_head widens 288 -> 1024: not SimKD's GAP + linear
    mobilenet = models.create("mobilenetv3_small_050", 10)
    assert models.feature_kind(mobilenet, 64) == "vector"


def test_run_refuses_a_size_the_teacher_cannot_take_in_one_line(tmp_path, digits):
    sets = stand_in_overrides("imagenet-vitl-vits", tmp_path, digits)
    sets += [f"teachers.0.model=test_vit3", f"teachers.0.checkpoint={random_teacher(tmp_path, 'test_vit3')}"]
    args = [str(ROOT / "recipes" / "imagenet-vitl-vits.yaml")] + [a for s in sets for a in ("--set", s)]
    result = subprocess.run([sys.executable, str(ROOT / "harness" / "run.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "test_vit3 cannot take 32 x 32 inputs" in result.stderr
    assert not (tmp_path / "imagenet-vitl-vits").exists()  # refused while building models: nothing written

"""Recipe validation: each user mistake gives one message naming the file, the key and the fix."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from harness.build import build_teachers
from harness.models import ModelError
from harness.recipe import RecipeError, load_recipe, recipe_docs

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, digits: Path, **changes) -> Path:
    tree = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    tree["data"]["train"] = str(digits / "train")
    tree["data"]["val"] = str(digits / "val")
    ckpt = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), ckpt)
    tree["teachers"][0]["checkpoint"] = str(ckpt)
    for path, value in changes.items():
        node = tree
        *parents, last = path.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_shipped_recipes_validate(digits, tmp_path):
    for name in ("imagenet.yaml", "imagenet-2teachers.yaml", "demo.yaml", "demo-teacher.yaml"):
        recipe = load_recipe(ROOT / "recipes" / name, check_files=False)
        assert recipe.name == name.removesuffix(".yaml")
    assert load_recipe(write(tmp_path, digits)).method.name == "atsc"


def test_unknown_key_names_file_key_and_valid_keys(digits, tmp_path):
    path = write(tmp_path, digits)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert str(path) in msg and "`optim.lrr`" in msg and "did you mean `lr`" in msg and "momentum" in msg


def test_wrong_type_names_the_key(digits, tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: `data.batch_size`: .*integer.*'many'"):
        load_recipe(write(tmp_path, digits, data__batch_size="many"))


def test_bad_choice_lists_the_valid_ones(digits, tmp_path):
    with pytest.raises(RecipeError, match=r"`method.name`: .*'supervised', 'kd', 'simkd' or 'atsc'"):
        load_recipe(write(tmp_path, digits, method__name="dkd"))


def test_missing_required_key(digits, tmp_path):
    path = write(tmp_path, digits)
    tree = yaml.safe_load(path.read_text())
    del tree["optim"]["lr"]
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError, match="missing required key `optim.lr`"):
        load_recipe(path)


def test_missing_teacher_checkpoint_names_key_and_fix(digits, tmp_path):
    with pytest.raises(RecipeError, match=r"`teachers\[0\].checkpoint`: file not found: nope.pth; train one"):
        load_recipe(write(tmp_path, digits, teachers__0__checkpoint="nope.pth"))


def test_missing_shards_named(digits, tmp_path):
    with pytest.raises(RecipeError, match=r"`data.val`: shard not found: .*val-000006.tar and 1 more"):
        load_recipe(write(tmp_path, digits, data__val=str(digits / "val" / "val-{000006..000007}.tar")))


def test_teacher_classifier_must_match_dataset_classes(digits, tmp_path):
    ckpt = tmp_path / "t1000.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), ckpt)
    recipe = load_recipe(write(tmp_path, digits), [f"teachers.0.checkpoint={ckpt}"])
    with pytest.raises(ModelError, match=r"`teachers\[0\]`: checkpoint .*t1000.pth has a 1000-class classifier .* `data.num_classes` is 10"):
        build_teachers(recipe)


def test_overrides_apply_and_are_recorded(digits, tmp_path):
    recipe = load_recipe(write(tmp_path, digits), ["optim.lr=0.05", "method.adapt_after=0", "teachers.0.weight=2"])
    assert recipe.optim.lr == 0.05 and recipe.method.adapt_after == 0 and recipe.teachers[0].weight == 2
    assert recipe.overrides == ["optim.lr=0.05", "method.adapt_after=0", "teachers.0.weight=2"]


def test_method_and_teachers_must_agree(digits, tmp_path):
    with pytest.raises(RecipeError, match="supervised` trains the student alone"):
        load_recipe(write(tmp_path, digits, method__name="supervised"))
    with pytest.raises(RecipeError, match="two_pass.*stage 3"):
        load_recipe(write(tmp_path, digits, method__bias_step="two_pass", runtime={"zero_stage": 3}))


def test_run_reports_a_bad_recipe_in_one_line_without_traceback(digits, tmp_path):
    path = write(tmp_path, digits, optim__name="lamb")
    result = subprocess.run([sys.executable, str(ROOT / "harness" / "run.py"), str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: {path}: `optim.name`" in result.stderr


def test_the_docs_key_reference_is_generated_from_the_schema():
    page = (ROOT / "docs" / "recipes.md").read_text()
    start, end = "<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->"
    documented = page.split(start)[1].split(end)[0].strip()
    assert documented == recipe_docs().strip(), "docs/recipes.md is stale: run `make docs`"

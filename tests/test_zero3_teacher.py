"""ZeRO-3 with a big teacher: the benchmark's figures, stage 3 and its variants stepping as stage 0,
and the ViT-H recipe's memory comment, whose parameter counts must be the models' own."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import zero3_teacher as bench  # noqa: E402

# DeepSpeed "leaf" modules on the student's ResNet stages and the projector: each gathered whole
# (one gather, one reduction) instead of per layer, so the per-layer hooks are the teacher's only.
STUDENT_LEAF = {"leaf": ["student.layer1", "student.layer2", "student.layer3", "student.layer4",
                         "shared.projectors.0"]}


@pytest.mark.launches  # bench.run spawns two gloo processes per stage
def test_benchmark_times_each_stage_and_every_stage_steps_as_stage_0():
    """Two gloo processes per run, test_vit (adapted) -> test_resnet: stage 3, and stage 3 with the
    student's blocks as leaf modules, give stage 0's losses on every rank for 4 steps (fp32), hold
    less per rank, and report the weights gathered between forward and backward."""
    cfg = bench.Config(student="test_resnet", teacher="test_vit", size=32, batch=4, steps=2, warmup=1,
                       classes=10, stages=(0, 3), variants={"student-leaf": STUDENT_LEAF})
    result = bench.run(cfg)
    stages = result["stages"]
    assert list(stages) == ["0", "3", "student-leaf"]
    base = stages["0"]["ranks"]
    for name in ("3", "student-leaf"):
        s = stages[name]
        assert s["step_s"] > 0 and s["step_vs_stage0"] > 0 and len(s["ranks"]) == 2
        for rank, record in enumerate(s["ranks"]):
            assert record["stage"] == 3 and len(record["losses"]) == 4  # warm-up, 2 timed, the snapshot's
            assert record["losses"] == pytest.approx(base[rank]["losses"], rel=1e-5), (name, rank)
            assert record["total_bytes"] < base[rank]["total_bytes"]  # partitioned weights
            assert record["gathered_after_forward_bytes"] is not None
        assert s["loss_max_rel_diff_vs_stage0"] < 1e-5
    assert stages["0"]["ranks"][0]["gathered_after_forward_bytes"] is None
    # the per-rank losses differ (each rank its own batches): the agreement above is not vacuous
    assert base[0]["losses"] != base[1]["losses"]
    table = bench.markdown(result)
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "ZeRO" not in line]
    assert rows == ["| 0", "| 3", "| student-leaf"] and "test_vit" in table


def test_cli_flags_reach_the_benchmark():
    cfg, args = bench.parse_args(["--student", "vit_small_patch16_224", "--teacher", "vit_huge_patch14_clip_224",
                                  "--size", "224", "--batch", "64", "--steps", "3", "--stages", "0,3", "--world", "1",
                                  "--precision", "bf16", "--variant", 'leaf={"leaf": ["student.blocks.0"]}',
                                  "--json", "out.json"])
    assert (cfg.student, cfg.teacher, cfg.size, cfg.batch, cfg.steps, cfg.stages, cfg.world, cfg.precision) == (
        "vit_small_patch16_224", "vit_huge_patch14_clip_224", 224, 64, 3, (0, 3), 1, "bf16")
    assert cfg.variants == {"leaf": {"leaf": ["student.blocks.0"]}} and cfg.runs() == ["0", "3", "leaf"]
    assert cfg.teacher_model_kwargs() == {"img_size": 224} and args.json == "out.json"
    assert bench.Config(teacher="resnet152").teacher_model_kwargs() == {}


def test_vith_recipe_comment_counts_the_models_parameters():
    """The memory comment's parameter counts (and so its GiB) are the recipe's models', by name."""
    from harness import models
    from harness.method import MLPProjector
    from harness.recipe import load_recipe

    path = ROOT / "recipes" / "imagenet-vith-resnet50-zero3.yaml"
    recipe = load_recipe(path, check_files=False)
    assert recipe.runtime.zero_stage == 3 and recipe.teachers[0].hub
    teacher = models.skeleton(recipe.teachers[0].model, recipe.data.num_classes)
    student = models.skeleton(recipe.student.model, recipe.data.num_classes)
    projector = MLPProjector(student.num_features, teacher.num_features, recipe.method.projector_factor)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    n_projector = sum(p.numel() for p in projector.parameters())
    anchored = sum(p.numel() for p in teacher.parameters() if p.dim() > 1)
    text = path.read_text()
    total = n_teacher + n_student + n_projector
    assert f"{total / 1e6:.1f} M trainable parameters (teacher {n_teacher / 1e6:.1f} M, student " \
           f"{n_student / 1e6:.1f} M,\n#   projector {n_projector / 1e6:.1f} M)" in text
    assert f"W0 of the {anchored / 1e6:.1f} M anchored teacher weights" in text
    # the states per GPU over 8 at ZeRO-3 (weight, gradient, momentum partitions + W0), as stated
    states = (12 * total + 4 * anchored) / 8 / 2**30
    assert re.search(rf"about [\d.]+ GiB \({states:.1f} states", text), states

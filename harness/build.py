"""Assemble a run's models and method from its recipe."""
from __future__ import annotations

import torch
from torch import nn

from harness import models
from harness.data import Preprocess
from harness.method import KD, Distiller, InputView, SharedClassifier, Supervised
from harness.recipe import Recipe


def build_student(recipe: Recipe, load_weights: bool = True) -> nn.Module:
    s = recipe.student
    return models.create(s.model, recipe.data.num_classes, checkpoint=s.checkpoint if load_weights else None,
                         kwargs=s.model_kwargs, where="student")


def build_teachers(recipe: Recipe, load_weights: bool = True) -> list[nn.Module]:
    return [models.create(t.model, recipe.data.num_classes, checkpoint=t.checkpoint if load_weights else None,
                          hub=t.hub if load_weights else None, kwargs=t.model_kwargs, where=f"teachers[{i}]")
            for i, t in enumerate(recipe.teachers)]


def check_model_files(recipe: Recipe) -> None:
    """Every model the recipe names exists, and every checkpoint it names fits its model.

    Checked on models built on the meta device (no memory, no initialisation) against the
    checkpoints' tensor shapes (no weights read), so ``harness/run.py`` can refuse a wrong
    teacher before any process group, engine or output folder exists. Raises ModelError.
    """
    n = recipe.data.num_classes
    named = [("student", recipe.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(recipe.teachers)]
    for where, spec in named:
        if getattr(spec, "hub", None):  # weights from the network: nothing on disk to check
            continue
        model = models.skeleton(spec.model, n, spec.model_kwargs, where)
        if spec.checkpoint:
            models.check_checkpoint(spec.checkpoint, model, n, where)


def build_method(recipe: Recipe, load_weights: bool = True) -> tuple[Distiller, Preprocess]:
    """The run's method over its student and teachers, and the student's preprocessing.

    ``load_weights=False`` leaves the models randomly initialised, for a caller that loads
    every weight from a checkpoint next (the export of a checkpoint).
    """
    student = build_student(recipe, load_weights)
    d = recipe.data
    pre = models.preprocess_of(student, d.image_size, d.crop_pct, d.mean, d.std)
    return build_distiller(recipe, student, build_teachers(recipe, load_weights), pre), pre


@torch.no_grad()
def _feature_shape(model: nn.Module, kind: str, image_size: int) -> tuple[int, tuple[int, int] | None]:
    """Channels (or width) of the distillation feature, and the map size for 'map' features."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    raw = model.forward_features(x)
    model.train(was_training)
    if kind == "map":
        return raw.shape[1], tuple(raw.shape[-2:])
    return model.forward_head(raw, pre_logits=True).shape[-1], None


def build_distiller(recipe: Recipe, student: nn.Module, teachers: list[nn.Module], pre: Preprocess) -> Distiller:
    """The recipe's method over these models; ``pre`` is the student's preprocessing."""
    m, size = recipe.method, recipe.data.image_size
    if m.name == "supervised":
        return Supervised(student, label_smoothing=m.label_smoothing)
    teacher_pres = [models.teacher_preprocess(t, model, pre) for t, model in zip(recipe.teachers, teachers)]
    views = [InputView(pre, t_pre) for t_pre in teacher_pres]
    if m.name == "kd":
        return KD(student, teachers[0], alpha=m.kd_weight, temperature=m.temperature, ce_weight=m.ce_weight,
                  label_smoothing=m.label_smoothing, view=views[0])
    student_kind = models.feature_kind(student, size)
    taps, student_dims, teacher_dims, teacher_sizes = [], [], [], []
    for teacher, t_pre in zip(teachers, teacher_pres):
        t_size = t_pre.image_size
        teacher_kind = models.feature_kind(teacher, t_size)  # always probed: it refuses a size the teacher cannot take
        kind = "map" if student_kind == "map" and teacher_kind == "map" else "vector"
        t_dim, t_size = _feature_shape(teacher, kind, t_size)
        s_dim, _ = _feature_shape(student, kind, size)
        taps.append(kind)
        teacher_dims.append(t_dim)
        student_dims.append(s_dim)
        teacher_sizes.append(t_size)
    return SharedClassifier(
        student, teachers, taps, student_dims, teacher_dims, teacher_sizes, [t.weight for t in recipe.teachers],
        factor=m.projector_factor, feature_weight=m.feature_weight, ce_weight=m.ce_weight, kd_weight=m.kd_weight,
        temperature=m.temperature, fused_bias=m.bias_step == "fused", adapt=m.name == "atsc",
        label_smoothing=m.label_smoothing, views=views, teacher_bn=m.teacher_bn, anchor_scope=m.anchor_scope)

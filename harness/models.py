"""timm models as students and teachers: creation, weights, preprocessing, classifier access.

Any timm model name works. What the distillation methods need from a model is small:
its features (``forward_features``), its pooled pre-logits (``forward_head(pre_logits=True)``)
and its final linear classifier (``get_classifier()``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import timm
import torch
from torch import nn

from harness import zoo  # noqa: F401  registers the cifar_* models with timm
from harness.data import Preprocess


class ModelError(ValueError):
    """A model the recipe names cannot be used as asked. The message is meant for the user."""


def create(name: str, num_classes: int, checkpoint: Optional[str] = None, hub: Optional[str] = None,
           kwargs: Optional[dict[str, Any]] = None, where: str = "model") -> nn.Module:
    """A timm model with ``num_classes`` outputs, from local weights, the hub, or random init."""
    kwargs = dict(kwargs or {})
    try:
        if hub:
            model = timm.create_model(f"hf-hub:{hub}" if "/" in hub and not hub.startswith("hf-hub:") else hub,
                                      pretrained=True, **kwargs)
        else:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except zoo.NoPretrainedWeights:
        raise ModelError(f"`{where}`: {name} is a CIFAR model of this harness's zoo, which has no hub weights; train it "
                         f"with a `supervised` recipe (recipes/cifar100/teacher-*.yaml) and give its export as "
                         f"`checkpoint`") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"`{where}`: unknown timm model {name!r}; `timm.list_models('*part*')` lists the names") from None
        raise
    if checkpoint:
        check_classifier(checkpoint, model, num_classes, where)
        timm.models.load_checkpoint(model, checkpoint, strict=True)
    classifier = linear_classifier(model, where)
    if classifier.out_features != num_classes:
        raise ModelError(f"`{where}`: the classifier of {name} has {classifier.out_features} classes but "
                         f"`data.num_classes` is {num_classes}; all classifiers must share the dataset's label space")
    return model


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The model weights in a .pth/.pt/.safetensors file (timm's checkpoint layouts understood)."""
    if not os.path.isfile(path):
        raise ModelError(f"checkpoint not found: {path}")
    return timm.models.load_state_dict(path)


def check_classifier(path: str, model: nn.Module, num_classes: int, where: str) -> None:
    """Refuse, before anything runs, a checkpoint whose classifier has the wrong number of classes."""
    key = f"{model.pretrained_cfg.get('classifier', 'fc')}.weight"
    state = load_state_dict(path)
    if key in state and state[key].shape[0] != num_classes:
        raise ModelError(f"`{where}`: checkpoint {path} has a {state[key].shape[0]}-class classifier "
                         f"({key}) but `data.num_classes` is {num_classes}; use a teacher trained on this "
                         f"dataset's classes")


def linear_classifier(model: nn.Module, where: str = "model") -> nn.Linear:
    """The model's final nn.Linear; a model without one cannot share its classifier."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Sequential):  # some timm heads wrap the Linear (e.g. dropout first)
        classifier = next((m for m in reversed(classifier) if isinstance(m, nn.Linear)), None)
    if not isinstance(classifier, nn.Linear):
        raise ModelError(f"`{where}`: {type(model).__name__} has no final linear classifier "
                         f"(get_classifier() gave {type(classifier).__name__}); pick a model with one")
    return classifier


def preprocess_of(model: nn.Module, image_size: int, crop_pct: Optional[float] = None,
                  mean: Optional[tuple] = None, std: Optional[tuple] = None) -> Preprocess:
    """The model's preprocessing (timm's pretrained_cfg), with the recipe's values taking precedence."""
    cfg = model.pretrained_cfg
    return Preprocess(image_size=image_size, crop_pct=crop_pct or cfg.get("crop_pct", 0.875),
                      mean=tuple(mean or cfg.get("mean", (0.485, 0.456, 0.406))),
                      std=tuple(std or cfg.get("std", (0.229, 0.224, 0.225))))


def exported_preprocess(checkpoint: Optional[str]) -> Optional[dict]:
    """The preprocessing recorded in a checkpoint this harness exported, if it is one."""
    if not checkpoint or not checkpoint.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(checkpoint, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["harness"]).get("preprocess") if "harness" in meta else None


def teacher_preprocess(teacher, model: nn.Module, student_pre: Preprocess) -> Preprocess:
    """What the teacher expects: the recipe's values, else its export record, else timm's config."""
    recorded = exported_preprocess(teacher.checkpoint) or {}
    cfg = model.pretrained_cfg
    return Preprocess(image_size=teacher.image_size or student_pre.image_size, crop_pct=student_pre.crop_pct,
                      mean=tuple(teacher.mean or recorded.get("mean") or cfg.get("mean", student_pre.mean)),
                      std=tuple(teacher.std or recorded.get("std") or cfg.get("std", student_pre.std)))


@torch.no_grad()
def feature_kind(model: nn.Module, image_size: int) -> str:
    """'map' when the head is global-average-pool + linear over a 4-D feature map, else 'vector'.

    A 'map' model's last feature map can be projected spatially (SimKD's conv projector and the
    teacher classifier over GAP). Anything else (ViT tokens, heads with a norm) is distilled at
    its pooled pre-logits vector, where the classifier really applies.

    This probe is the first forward of each model at its training resolution, so a model that
    cannot take that input size (a ViT's fixed position embeddings, window sizes) is refused
    here with the sizes that would work.
    """
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, 3, image_size, image_size, device=next(model.parameters()).device)
        try:
            features = model.forward_features(x)
            pooled = model.forward_head(features, pre_logits=True)
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ModelError(_size_message(model, image_size, e)) from None
        if features.dim() != 4:
            return "vector"
        mean = features.mean((2, 3))
        # A head with layers after the pooling (MobileNetV3's conv_head) changes the width.
        if pooled.flatten(1).shape != mean.shape:
            return "vector"
        return "map" if torch.allclose(pooled.flatten(1), mean, atol=1e-5) else "vector"
    finally:
        model.train(was_training)


def _size_message(model: nn.Module, image_size: int, error: Exception) -> str:
    arch = model.pretrained_cfg.get("architecture", type(model).__name__)
    native = model.pretrained_cfg.get("input_size", (3, None, None))[-1]
    return (f"{arch} cannot take {image_size} x {image_size} inputs ({str(error).splitlines()[0]}); set "
            f"`data.image_size` (the student) or `teachers[].image_size` (a teacher) to a size it takes"
            f"{f' (it was built for {native})' if native else ''}, or give it `model_kwargs` for the size "
            f"(ViTs: {{img_size: {image_size}}} or {{dynamic_img_size: true}})")

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


def _timm_model(name: str, where: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with the mistakes a recipe can make turned into one message each."""
    try:
        return timm.create_model(name, **kwargs)
    except zoo.NoPretrainedWeights:
        raise ModelError(f"`{where}`: {name} is a CIFAR model of this harness's zoo, which has no hub weights; train it "
                         f"with a `supervised` recipe (recipes/cifar100/teacher-*.yaml) and give its export as "
                         f"`checkpoint`") from None
    except TypeError as e:  # a keyword the model's constructor does not take
        raise ModelError(f"`{where}.model_kwargs`: {name} does not take them ({e}); remove or rename the key") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ModelError(f"`{where}`: unknown timm model {name!r}; `timm.list_models('*part*')` lists the names") from None
        raise


def create(name: str, num_classes: int, checkpoint: Optional[str] = None, hub: Optional[str] = None,
           kwargs: Optional[dict[str, Any]] = None, where: str = "model") -> nn.Module:
    """A timm model with ``num_classes`` outputs, from local weights, the hub, or random init."""
    kwargs = dict(kwargs or {})
    if hub:
        model = _timm_model(f"hf-hub:{hub}" if "/" in hub and not hub.startswith("hf-hub:") else hub, where,
                            pretrained=True, **kwargs)
    else:
        model = _timm_model(name, where, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint:
        check_checkpoint(checkpoint, model, num_classes, where)
        timm.models.load_checkpoint(model, checkpoint, strict=True)
    classifier = linear_classifier(model, where)
    if classifier.out_features != num_classes:
        raise ModelError(f"`{where}`: the classifier of {name} has {classifier.out_features} classes but "
                         f"`data.num_classes` is {num_classes}; all classifiers must share the dataset's label space")
    return model


def skeleton(name: str, num_classes: int, kwargs: Optional[dict[str, Any]] = None, where: str = "model") -> nn.Module:
    """The model's structure without its memory or initialisation (meta device), for checks before start-up.

    Built on the CPU instead for a model whose constructor computes with tensor values, which
    meta tensors do not have.
    """
    kwargs = {"pretrained": False, "num_classes": num_classes, **(kwargs or {})}
    try:
        with torch.device("meta"):
            return _timm_model(name, where, **kwargs)
    except ModelError:
        raise
    except (RuntimeError, NotImplementedError, ValueError):  # e.g. .item() on a meta tensor in __init__
        return _timm_model(name, where, **kwargs)


def checkpoint_shapes(path: str, where: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file, read without loading the weights.

    safetensors: its header; .pth/.pt: unpickled onto the meta device, with timm's conventions
    (EMA, ``state_dict`` or ``model`` wrappers; DDP's ``module.`` prefixes), as ``create`` loads it.
    """
    if not os.path.isfile(path):
        raise ModelError(f"`{where}.checkpoint`: file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:  # timm's load strips DDP / compile prefixes: so here
                return timm.models.clean_state_dict({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        state = timm.models.load_state_dict(path, device="meta")
    except Exception as e:  # torch.load and safetensors fail in many ways on a file that is not weights
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"`{where}.checkpoint`: {path} cannot be read as model weights ({reason}); give a state dict "
                         f"saved with torch.save or safetensors (a `supervised` run's student.safetensors is one)") \
            from None
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_checkpoint(path: str, model: nn.Module, num_classes: int, where: str) -> None:
    """Refuse a checkpoint that cannot load into ``model``, from its tensor shapes alone.

    First the classifier (a teacher trained on another dataset: the message says so), then what
    strict loading would refuse: weights the model lacks or does not have, or of another shape
    (another architecture, or other ``model_kwargs``).
    """
    shapes = checkpoint_shapes(path, where)
    key = f"{model.pretrained_cfg.get('classifier', 'fc')}.weight"
    if key in shapes and shapes[key][0] != num_classes:
        raise ModelError(f"`{where}`: checkpoint {path} has a {shapes[key][0]}-class classifier "
                         f"({key}) but `data.num_classes` is {num_classes}; use a teacher trained on this "
                         f"dataset's classes")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # torch fills a missing BatchNorm step counter itself (state dicts from before it existed)
    missing = [k for k in expected if k not in shapes and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in shapes if k not in expected]
    resized = [f"{k} {shapes[k]} (the model's: {expected[k]})"
               for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or resized:
        found = [f"{len(names)} {what}, e.g. {names[0]}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", resized)) if names]
        arch = model.pretrained_cfg.get("architecture", type(model).__name__)
        raise ModelError(f"`{where}`: checkpoint {path} does not fit {arch} (weights: {'; '.join(found)}); it holds "
                         f"another model's weights: set `{where}.model` (and `model_kwargs`) to the model it was "
                         f"trained as, or give a checkpoint of this one")


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

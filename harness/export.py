"""The deployed student as one file that loads with torch, timm and safetensors alone.

Inference, three lines::

    from harness.export import load_student
    model = load_student("runs/demo/student.safetensors")    # eval mode, CPU
    logits = model(model.prepare([Image.open("digit.png")]))   # PIL images: resize, crop, normalise

For ``simkd``/``atsc`` the file holds the student backbone, every projector P_k and every
adapted teacher classifier C_k; for ``supervised``/``kd`` it is the plain timm model, whose
weights also load as a teacher ``checkpoint`` in a later recipe.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.data import Preprocess, eval_transform, normalize
from harness.method import ConvProjector, MLPProjector, SharedClassifierStudent

FORMAT = "harness.student/1"


def student_config(distiller: nn.Module, recipe, pre: Preprocess) -> dict[str, Any]:
    """Everything needed to rebuild the deployed module without the harness's training code."""
    config: dict[str, Any] = {
        "format": FORMAT, "recipe": recipe.name, "method": recipe.method.name,
        "model": recipe.student.model, "model_kwargs": recipe.student.model_kwargs,
        "num_classes": recipe.data.num_classes, "preprocess": asdict(pre),
    }
    shared = getattr(distiller, "shared", None)
    if isinstance(shared, SharedClassifierStudent):
        config["shared_classifier"] = {
            "taps": shared.student_taps,
            "teacher_sizes": shared.teacher_sizes,
            "teacher_weights": shared.teacher_weights,
            "projector_factor": recipe.method.projector_factor,
            "projector_dims": [_projector_dims(p) for p in shared.projectors],
            "classifier_bias": [c.bias is not None for c in shared.classifiers],
        }
    return config


def _projector_dims(projector: nn.Module) -> tuple[int, int]:
    layers = [m for m in projector if isinstance(m, (nn.Conv2d, nn.Linear))]
    first, last = layers[0], layers[-1]
    return (getattr(first, "in_channels", None) or first.in_features,
            getattr(last, "out_channels", None) or last.out_features)


def full_state_dict(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """A CPU copy of the module's full weights; gathers ZeRO-3 partitions (a collective)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_student(state: dict[str, torch.Tensor], config: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"harness": json.dumps(config)})
    tmp.replace(path)


def read_config(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "harness" not in meta:
        raise ValueError(f"{path} is not a student exported by this harness (no 'harness' metadata)")
    return json.loads(meta["harness"])


def build_from_config(config: dict[str, Any]) -> nn.Module:
    backbone = timm.create_model(config["model"], pretrained=False, num_classes=config["num_classes"],
                                 **config.get("model_kwargs", {}))
    spec = config.get("shared_classifier")
    if spec is None:
        return backbone
    projectors = nn.ModuleList(
        (ConvProjector if tap == "map" else MLPProjector)(c_in, c_out, spec["projector_factor"])
        for tap, (c_in, c_out) in zip(spec["taps"], spec["projector_dims"]))
    classifiers = nn.ModuleList(nn.Linear(c_out, config["num_classes"], bias=bias)
                                for (_, c_out), bias in zip(spec["projector_dims"], spec["classifier_bias"]))
    return SharedClassifierStudent(backbone, projectors, classifiers, spec["taps"], spec["teacher_sizes"],
                                   spec["teacher_weights"])


def prepare_images(images: list, pre: Preprocess) -> torch.Tensor:
    """PIL images to the model's input batch: the evaluation resize, center crop and normalisation."""
    crop = eval_transform(pre)
    return normalize(torch.stack([crop(image.convert("RGB")) for image in images]), pre)


def load_student(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The exported student in eval mode.

    ``model.preprocess`` gives size, crop and normalisation; ``model.prepare(pil_images)``
    applies them, exactly as the in-training evaluation does.
    """
    config = read_config(path)
    model = build_from_config(config)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["preprocess"].items()})
    model.preprocess = pre
    model.prepare = functools.partial(prepare_images, pre=pre)
    return model.to(device).eval()

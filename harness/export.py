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
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from harness.data import Preprocess, eval_transform, normalize
from harness.files import atomic_path
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
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"harness": json.dumps(config)})


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


# ----------------------------------------------------------------------------- commands


def consolidated_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights and buffers of a checkpoint of any ZeRO stage, in one process."""
    import contextlib
    import io

    if list(checkpoint.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["module"]


def export_checkpoint(run_dir: Path, checkpoint: Path | None, out: Path) -> Path:
    """Rebuild the run's method from its recipe.yaml, load a checkpoint, export the deployed student."""
    from harness import checkpoint as ckpt
    from harness.build import build_method
    from harness.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml", check_files=False)
    checkpoint = checkpoint or ckpt.latest(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (no {ckpt.checkpoint_dir(run_dir) / 'latest'})")
    distiller, pre = build_method(recipe, load_weights=False)  # every weight comes from the checkpoint
    missing, unexpected = distiller.load_state_dict(consolidated_state(checkpoint), strict=False)
    if unexpected or [k for k in missing if not k.startswith("views.")]:
        raise ValueError(f"{checkpoint} does not match {run_dir / 'recipe.yaml'}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    deployed = distiller.deployed()
    save_student({k: v.detach().cpu() for k, v in deployed.state_dict().items()},
                 student_config(distiller, recipe, pre), out)
    return out


PARAMETER_KINDS = ("weights", "norm scales", "norm shifts", "biases")


def parameter_kind(module: nn.Module, name: str, param: torch.Tensor) -> str:
    """What a teacher parameter is, as the anchor sees it: a multi-dimensional weight, a norm's scale or shift, a bias."""
    owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    if isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return "norm scales" if name.endswith("weight") else "norm shifts"
    return "weights" if param.dim() > 1 else "biases"


@torch.no_grad()
def teacher_drift(run_dir: Path, checkpoint: Path | None = None) -> dict[str, dict[str, float]]:
    """How far each teacher of a run moved from the weights it was loaded with, by kind of parameter.

    Relative L2 distance ||W - W_loaded|| / ||W_loaded|| over all parameters of a kind: the
    anchored weights (``anchor_scope: weights`` holds these), the norm layers' scales and shifts
    and the remaining biases. Where a teacher adapts from the start (``adapt_after: 0``) the
    loaded weights are its W0.
    """
    from harness import checkpoint as ckpt
    from harness.build import build_method
    from harness.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml", check_files=False)
    checkpoint = checkpoint or ckpt.latest(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (no {ckpt.checkpoint_dir(run_dir) / 'latest'})")
    distiller, _ = build_method(recipe)  # the teachers as loaded
    adapted = consolidated_state(checkpoint)
    drift = {}
    for k, (teacher_name, teacher) in enumerate(zip(recipe.teacher_names, distiller.teachers)):
        moved = {kind: 0.0 for kind in PARAMETER_KINDS}
        size = {kind: 0.0 for kind in PARAMETER_KINDS}
        for name, loaded in teacher.named_parameters():
            kind = parameter_kind(teacher, name, loaded)
            moved[kind] += (adapted[f"teachers.{k}.{name}"].float() - loaded.float()).pow(2).sum().item()
            size[kind] += loaded.float().pow(2).sum().item()
        drift[teacher_name] = {kind: (moved[kind] / size[kind]) ** 0.5 if size[kind] else 0.0
                               for kind in PARAMETER_KINDS}
    return drift


@torch.no_grad()
def evaluate_file(path: Path, val: str, batch_size: int = 128, workers: int = 2) -> dict[str, float]:
    """Top-1/top-5 of an exported student over validation shards, single process.

    Given a whole split, the evaluation must see every sample its ``_info.json`` counts
    (as in training: :meth:`harness.data.Shards.check_evaluated`); raises DataError otherwise.
    """
    from harness.data import EpochLoader, ShardStream, select_shards

    shards = select_shards(val)
    model = load_student(path)
    num_classes = read_config(path)["num_classes"]
    stream = ShardStream(shards.urls, eval_transform(model.preprocess), num_classes, batch_size, train=False,
                         lengths=shards.lengths)
    correct1 = correct5 = total = 0
    for x, y in EpochLoader(stream, workers, False, model.preprocess).epoch(0):
        top5 = model(x).topk(min(5, num_classes), dim=-1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(-1).sum().item()
        total += len(y)
    shards.check_evaluated(total)
    return {"top1": correct1 / max(total, 1), "top5": correct5 / max(total, 1), "samples": total}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a run's student from a checkpoint, or evaluate an export.")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("checkpoint", help="checkpoint (any ZeRO stage) -> one student .safetensors")
    exp.add_argument("run_dir", type=Path, help="the run's output directory (holds recipe.yaml, checkpoints/)")
    exp.add_argument("--tag", help="checkpoint tag (default: latest)")
    exp.add_argument("--out", type=Path, help="output file (default: <run_dir>/student-<tag>.safetensors)")
    ev = sub.add_parser("evaluate", help="top-1/top-5 of an exported student on validation shards")
    ev.add_argument("student", type=Path)
    ev.add_argument("val", help="validation shards: a split's folder (e.g. data/imagenet/val), a shard or a brace pattern")
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--workers", type=int, default=2)
    dr = sub.add_parser("drift", help="how far each teacher moved from its loaded weights, by kind of parameter")
    dr.add_argument("run_dir", type=Path, help="the run's output directory (holds recipe.yaml, checkpoints/)")
    dr.add_argument("--tag", help="checkpoint tag (default: latest)")
    args = parser.parse_args()
    try:
        if args.command == "checkpoint":
            from harness import checkpoint as ckpt

            path = ckpt.checkpoint_dir(args.run_dir) / args.tag if args.tag else None
            tag = args.tag or (ckpt.latest(args.run_dir).name if ckpt.latest(args.run_dir) else "none")
            out = export_checkpoint(args.run_dir, path, args.out or args.run_dir / f"student-{tag}.safetensors")
            print(f"exported {out}")
        elif args.command == "drift":
            from harness import checkpoint as ckpt

            path = ckpt.checkpoint_dir(args.run_dir) / args.tag if args.tag else None
            for teacher, by_kind in teacher_drift(args.run_dir, path).items():
                print(f"{teacher}: " + ", ".join(f"{kind} {100 * v:.2f}%" for kind, v in by_kind.items()))
        else:
            print(json.dumps(evaluate_file(args.student, args.val, args.batch_size, args.workers)))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

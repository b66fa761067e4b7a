"""The CIFAR benchmark zoo of the KD literature, registered with timm as ``cifar_*``.

Every CIFAR-100 student and teacher of CRD's and SimKD's tables (RepDistiller's and SimKD's
``models/``), with the same architectures (parameter counts match the authors' code exactly)
and the same module names (the authors' checkpoints load unchanged, their ``{'model': ...}``
wrapper included, through ``timm.models.load_checkpoint``). Importing this package registers::

    cifar_resnet{8,14,20,32,44,56,110}, cifar_resnet8x4, cifar_resnet32x4,
    cifar_wrn_16_2, cifar_wrn_40_1, cifar_wrn_40_2, cifar_vgg8, cifar_vgg13 (both with BN),
    cifar_mobilenetv2 (the authors' ``mobile_half``), cifar_shufflev1, cifar_shufflev2

so ``timm.create_model('cifar_resnet8x4', num_classes=100)`` works (100 classes by default).
Each model's ``forward_features`` is its last feature map before global average pooling,
after its final ReLU: what SimKD and ATSC distill and the teacher's classifier reads.

There are no pretrained weights: ``pretrained=True`` raises. Train a teacher with the
``supervised`` method and give it to a run as a checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from harness.zoo.common import CifarNet
from harness.zoo.mobilenetv2 import CifarMobileNetV2
from harness.zoo.resnet import CifarResNet
from harness.zoo.shufflenet import CifarShuffleNetV1, CifarShuffleNetV2
from harness.zoo.vgg import VGG8, VGG13, CifarVGG
from harness.zoo.wrn import CifarWideResNet

__all__ = ["CifarNet", "CifarResNet", "CifarWideResNet", "CifarVGG", "CifarMobileNetV2", "CifarShuffleNetV1",
           "CifarShuffleNetV2", "NoPretrainedWeights", "CIFAR100_MEAN", "CIFAR100_STD"]

# CIFAR-100 training-set channel statistics, as the KD code normalises with them
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class NoPretrainedWeights(ValueError):
    """``pretrained=True`` for a zoo model: there are no weights to download."""


def _cfg(pool: int, classifier: str = "fc", first_conv: str = "conv1") -> dict[str, Any]:
    """timm's pretrained config for a 32 px CIFAR-100 model without weights.

    ``pool_size`` is the final feature map at 32 px; ``classifier`` the final Linear's name.
    """
    return {"url": "", "num_classes": 100, "input_size": (3, 32, 32), "pool_size": (pool, pool),
            "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR100_MEAN, "std": CIFAR100_STD,
            "first_conv": first_conv, "classifier": classifier, "license": "apache-2.0"}


default_cfgs = generate_default_cfgs({
    **{f"cifar_resnet{d}": _cfg(8) for d in (8, 14, 20, 32, 44, 56, 110)},
    "cifar_resnet8x4": _cfg(8),
    "cifar_resnet32x4": _cfg(8),
    "cifar_wrn_16_2": _cfg(8),
    "cifar_wrn_40_1": _cfg(8),
    "cifar_wrn_40_2": _cfg(8),
    "cifar_vgg8": _cfg(4, "classifier", "block0.0"),
    "cifar_vgg13": _cfg(4, "classifier", "block0.0"),
    "cifar_mobilenetv2": _cfg(2, "classifier.0", "conv1.0"),
    "cifar_shufflev1": _cfg(4, "linear"),
    "cifar_shufflev2": _cfg(4, "linear"),
})


def _create(variant: str, builder: Callable[..., CifarNet], pretrained: bool, **kwargs: Any) -> CifarNet:
    if pretrained:
        raise NoPretrainedWeights(
            f"{variant} has no pretrained weights (the CIFAR zoo ships architectures only): create it with "
            f"pretrained=False and load a checkpoint, e.g. a teacher trained with the `supervised` method")
    return build_model_with_cfg(builder, variant, pretrained=False, **kwargs)


def _resnet(depth: int, widths: tuple[int, ...]) -> Callable[..., CifarNet]:
    return lambda **kw: CifarResNet(depth, widths, **kw)


THIN = (16, 16, 32, 64)  # resnet8 ... resnet110
WIDE = (32, 64, 128, 256)  # resnet8x4, resnet32x4: 4x stages, 2x stem


_BLOCKS = {8: 1, 14: 2, 20: 3, 32: 5, 44: 7, 56: 9, 110: 18}  # per stage

# name -> (the model's constructor, its entry point's docstring)
_MODELS: dict[str, tuple[Callable[..., CifarNet], str]] = {
    **{f"cifar_resnet{depth}": (_resnet(depth, THIN),
                                f"ResNet-{depth} ({n} block{'s' if n > 1 else ''} per stage), widths 16-32-64.")
       for depth, n in _BLOCKS.items()},
    "cifar_resnet8x4": (_resnet(8, WIDE),
                        "ResNet-8x4: stem 32, stages 64-128-256, 1 block each (the usual CIFAR-100 student)."),
    "cifar_resnet32x4": (_resnet(32, WIDE),
                         "ResNet-32x4: stem 32, stages 64-128-256, 5 blocks each (the usual CIFAR-100 teacher)."),
    "cifar_wrn_16_2": (lambda **kw: CifarWideResNet(16, 2, **kw),
                       "WRN-16-2: 2 pre-activation blocks per stage, widths 32-64-128."),
    "cifar_wrn_40_1": (lambda **kw: CifarWideResNet(40, 1, **kw),
                       "WRN-40-1: 6 pre-activation blocks per stage, widths 16-32-64."),
    "cifar_wrn_40_2": (lambda **kw: CifarWideResNet(40, 2, **kw),
                       "WRN-40-2: 6 pre-activation blocks per stage, widths 32-64-128."),
    "cifar_vgg8": (lambda **kw: CifarVGG(VGG8, **kw), "VGG-8 with BN (RepDistiller's ``vgg8_bn``): one conv per block."),
    "cifar_vgg13": (lambda **kw: CifarVGG(VGG13, **kw),
                    "VGG-13 with BN (RepDistiller's ``vgg13_bn``): two convs per block."),
    "cifar_mobilenetv2": (lambda **kw: CifarMobileNetV2(0.5, **kw),
                          "MobileNetV2 at width 0.5, expansion 6 (RepDistiller's ``mobile_half``)."),
    "cifar_shufflev1": (CifarShuffleNetV1, "ShuffleNet V1, 3 groups, widths 240-480-960 (RepDistiller's ``ShuffleV1``)."),
    "cifar_shufflev2": (CifarShuffleNetV2,
                        "ShuffleNet V2 1x, widths 116-232-464, 1x1 conv to 1024 (RepDistiller's ``ShuffleV2``)."),
}


def _register(name: str, builder: Callable[..., CifarNet], doc: str) -> None:
    """timm's entry point ``name`` (``timm.create_model(name)``), also this module's attribute ``name``."""
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CifarNet:
        return _create(name, builder, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name  # timm registers the function by its name
    entrypoint.__doc__ = doc
    globals()[name] = register_model(entrypoint)


for _name, (_builder, _doc) in _MODELS.items():
    _register(_name, _builder, _doc)
del _name, _builder, _doc

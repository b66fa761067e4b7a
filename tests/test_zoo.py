"""The CIFAR zoo (harness/zoo): the KD literature's architectures, exactly, usable by the harness."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from harness import models
from harness.build import build_distiller
from harness.data import Preprocess
from harness.recipe import Recipe
from harness.zoo import CIFAR100_MEAN, CIFAR100_STD, NoPretrainedWeights

SIZE = 32
PARTNER = "cifar_resnet8"  # the small model on the other side of each distillation test

# name: (parameters at 100 classes, channels and side of the final feature map at 32 px).
# Counts of resnet8x4, resnet32x4, resnet110, vgg8, vgg13, mobilenetv2 (mobile_half), shufflev1
# and shufflev2 were measured from RepDistiller's models/ code. The others are what the same
# reference architectures give (checked by hand: a thin ResNet-(6n+2) has 464 + 4,672 n +
# 14,528 + 18,560 (n-1) + 57,728 + 73,984 (n-1) + 6,500 parameters; WRN-40-2 sums to 2,255,156)
# and agree with CRD's table (resnet20 0.28M, resnet32 0.47M, resnet56 0.86M, wrn_16_2 0.70M,
# wrn_40_1 0.57M, wrn_40_2 2.26M).
ZOO = {
    "cifar_resnet8": (83_892, 64, 8),
    "cifar_resnet14": (181_108, 64, 8),
    "cifar_resnet20": (278_324, 64, 8),
    "cifar_resnet32": (472_756, 64, 8),
    "cifar_resnet44": (667_188, 64, 8),
    "cifar_resnet56": (861_620, 64, 8),
    "cifar_resnet110": (1_736_564, 64, 8),
    "cifar_resnet8x4": (1_233_540, 256, 8),
    "cifar_resnet32x4": (7_433_860, 256, 8),
    "cifar_wrn_16_2": (703_284, 128, 8),
    "cifar_wrn_40_1": (569_780, 64, 8),
    "cifar_wrn_40_2": (2_255_156, 128, 8),
    "cifar_vgg8": (3_965_028, 512, 4),
    "cifar_vgg13": (9_462_180, 512, 4),
    "cifar_mobilenetv2": (812_836, 1280, 2),
    "cifar_shufflev1": (949_258, 960, 4),
    "cifar_shufflev2": (1_355_528, 1024, 4),
}

# A few state-dict keys of the authors' code per family: their checkpoints load unchanged.
AUTHOR_KEYS = {
    "cifar_resnet8x4": ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"],
    "cifar_wrn_40_2": ["block1.layer.0.convShortcut.weight", "block3.layer.5.bn1.weight", "bn1.weight", "fc.bias"],
    "cifar_vgg13": ["block0.0.bias", "block0.1.running_mean", "block4.3.weight", "classifier.weight"],
    "cifar_mobilenetv2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.weight",
                          "conv2.1.weight", "classifier.0.weight"],
    "cifar_shufflev1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
    "cifar_shufflev2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "bn2.bias", "linear.weight"],
}

CIFAR_PRE = Preprocess(image_size=SIZE, crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def test_all_names_registered():
    assert sorted(timm.list_models("cifar_*")) == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_architecture_parameters_and_feature_map(name):
    params, channels, side = ZOO[name]
    model = timm.create_model(name, num_classes=100).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, channels, side, side)
        assert features.min() >= 0  # after the final ReLU
        assert torch.equal(model.forward_head(features, pre_logits=True), features.mean((2, 3)))
        assert torch.equal(model(x), model.forward_head(features))
    classifier = model.get_classifier()
    assert isinstance(classifier, torch.nn.Linear) and (classifier.in_features, classifier.out_features) == (channels, 100)
    assert model.num_features == channels and model.num_classes == 100
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["pool_size"] == (side, side) and cfg["crop_pct"] == 1.0
    assert tuple(cfg["mean"]) == CIFAR100_MEAN and tuple(cfg["std"]) == CIFAR100_STD
    assert model.get_submodule(cfg["classifier"]) is classifier
    assert f"{cfg['classifier']}.weight" in model.state_dict()
    for key in AUTHOR_KEYS.get(name, []):
        assert key in model.state_dict(), key


def test_timm_interface():
    assert timm.create_model("cifar_resnet8x4").num_classes == 100  # CIFAR-100 by default
    model = timm.create_model("cifar_mobilenetv2", num_classes=10, drop_rate=0.2,
                              pretrained_cfg_overlay={"crop_pct": 0.9})
    assert model.pretrained_cfg["crop_pct"] == 0.9 and model.drop_rate == 0.2
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 7)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, 1280)
    with pytest.raises(NoPretrainedWeights, match="no pretrained weights"):
        timm.create_model("cifar_resnet32x4", pretrained=True)


def _recipe(method: str, student: str, teacher: str) -> Recipe:
    return Recipe.model_validate({
        "output": "unused", "data": {"train": "x", "val": "x", "num_classes": 100, "image_size": SIZE},
        "student": {"model": student}, "teachers": [{"model": teacher, "checkpoint": "unused"}],
        "method": {"name": method}, "optim": {"lr": 0.1}, "schedule": {"epochs": 2},
    })


@pytest.mark.parametrize("role", ["teacher", "student"])
@pytest.mark.parametrize("name", ZOO)
def test_harness_distils_with_every_zoo_model(name, role):
    """SimKD and ATSC each take a training step with the model as teacher, or as student."""
    student_name, teacher_name = (PARTNER, name) if role == "teacher" else (name, PARTNER)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, 100, (2,), generator=g)
    for method in ("simkd", "atsc"):
        torch.manual_seed(0)
        student = models.create(student_name, 100, where="student")
        teacher = models.create(teacher_name, 100, where="teachers[0]")
        assert models.feature_kind(student, SIZE) == models.feature_kind(teacher, SIZE) == "map"
        d = build_distiller(_recipe(method, student_name, teacher_name), student, [teacher], CIFAR_PRE)
        assert d.shared.student_taps == ["map"] and d.shared.classifiers[0] is teacher.get_classifier()
        d.set_adapting(method == "atsc")
        d.train()
        loss, terms = d(x, y)
        assert math.isfinite(loss.item()), terms
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in d.projectors.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        teacher_grads = [p.grad for p in teacher.parameters() if p.grad is not None]
        assert bool(teacher_grads) == (method == "atsc")
        assert all(torch.isfinite(g).all() for g in teacher_grads)
        d.eval()
        with torch.no_grad():
            assert d.deployed()(x).shape == (2, 100)


@pytest.mark.parametrize("name", ["cifar_resnet8x4", "cifar_vgg8", "cifar_mobilenetv2", "cifar_shufflev2"])
def test_checkpoint_round_trip_and_wrong_classes_refused(name, tmp_path):
    source = timm.create_model(name, num_classes=100)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # weights a fresh model does not have
    path = tmp_path / "teacher.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = models.create(name, 100, checkpoint=str(path), where="teachers[0]")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))

    # the authors' layout: torch.save({'model': state_dict, ...}) loads as it is
    authors = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": source.state_dict(), "best_acc": 79.4}, authors)
    loaded = models.create(name, 100, checkpoint=str(authors), where="teachers[0]")
    assert torch.equal(loaded.get_classifier().weight, source.get_classifier().weight)

    ten = tmp_path / "ten.safetensors"
    save_file(timm.create_model(name, num_classes=10).state_dict(), str(ten))
    key = f"{source.pretrained_cfg['classifier']}.weight"
    with pytest.raises(models.ModelError, match=rf"10-class classifier \({key}\) but `data.num_classes` is 100"):
        models.create(name, 100, checkpoint=str(ten), where="teachers[0]")


def test_a_zoo_teacher_from_the_hub_is_refused_with_the_fix():
    with pytest.raises(models.ModelError, match=r"`teachers\[0\]`: cifar_resnet8 .* no hub weights; train it"):
        models.create("cifar_resnet8", 100, hub="cifar_resnet8", where="teachers[0]")

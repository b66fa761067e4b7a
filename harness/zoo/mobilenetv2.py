"""MobileNetV2 for CIFAR at half width: RepDistiller's ``mobile_half`` (CRD's "MobileNetV2").

The ImageNet layout (Sandler et al. 2018) at width 0.5 and expansion 6, on 32 px inputs: a
stride-2 3x3 stem, seven stages of inverted residual blocks with strides 1, 1, 2, 2, 1, 2, 1,
and a 1x1 conv to 1280 channels (not halved: the authors halve it only for widths > 1). The
final map is 1280 x 2 x 2. Unlike torchvision, the first stage (expansion 1) keeps its 1x1
expansion conv, as the authors' code does; the parameter count depends on it.

Module names follow the authors' code (``blocks.1.0.conv.3.weight``, ``classifier.0.weight``),
so their checkpoints load unchanged: hence the one-layer ``classifier`` Sequential.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.zoo.common import CifarNet, kaiming_fan_out_

# expansion t, channels c (before width scaling), blocks n, first stride s
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (with the stride), 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class CifarMobileNetV2(CifarNet):
    """MobileNetV2 (expansion 6, width ``width``) for 32 px inputs; final map 1280 x 2 x 2."""

    classifier_name = "classifier.0"
    linear_init_std = 0.01

    def __init__(self, width: float = 0.5, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        last = int(1280 * width) if width > 1.0 else 1280
        super().__init__(last, num_classes, drop_rate)
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(in_chans, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
            self.blocks.append(nn.Sequential(*stage))
        self.conv2 = conv_bn_relu(channels, last, 1)
        self.classifier = nn.Sequential(nn.Identity())  # its Linear is set by init_head
        kaiming_fan_out_(self)
        self.init_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.conv2(x)

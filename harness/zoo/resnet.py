"""CIFAR ResNets (He et al. 2016, section 4.2) as the KD literature uses them.

Architecture of RepDistiller's ``models/resnet.py`` (also SimKD's): a 3x3 stem, three stages
of basic blocks at strides 1, 2, 2 and depth = 6n + 2. ``resnet8x4`` / ``resnet32x4`` widen
every stage four-fold *and* double the stem (32 channels rather than 4 x 16 = 64): stage
widths [32 | 64, 128, 256]. The shortcut is a 1x1 conv + BN whenever shape changes (option B),
so resnet8x4's first stage has one even though it does not downsample.

Module names follow the authors' code, so their checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from harness.zoo.common import CifarNet, kaiming_fan_out_


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, identity or projection shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(CifarNet):
    """ResNet-(6n+2) for 32 px inputs; the final feature map is 8x8 (stride 4 overall).

    Args:
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...): n basic blocks per stage.
        widths: [stem, stage1, stage2, stage3] channels.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2, not {depth}")
        super().__init__(widths[3], num_classes, drop_rate)
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        kaiming_fan_out_(self)
        self.init_head()  # PyTorch's default Linear init, as the authors leave it

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                             *(BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

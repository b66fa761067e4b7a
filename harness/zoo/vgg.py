"""VGG with BatchNorm for CIFAR, as RepDistiller's ``models/vgg.py`` (``vgg8_bn``, ``vgg13_bn``).

Five conv blocks (3x3 convs *with* bias, then BN and ReLU), 2x2 max-pooling between the first
four, no fully connected layers but the classifier: 512 -> classes after global average
pooling. At 32 px the fourth pooling is skipped, so the final map is 4x4; the authors apply it
only to 64 px inputs (Tiny-ImageNet), and so does this module.

Module names follow the authors' code (``block0.0.weight``, ``classifier.weight``), so their
checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from harness.zoo.common import CifarNet, kaiming_fan_out_

# channels of each conv in blocks 0..4
VGG8 = ((64,), (128,), (256,), (512,), (512,))  # the authors' configuration 'S'
VGG13 = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))  # configuration 'B'


def conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """conv-BN-ReLU per width, without the last ReLU (the network applies it, out of place)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class CifarVGG(CifarNet):
    """VGG-BN over 32 px inputs; the final feature map is 512 x 4 x 4."""

    classifier_name = "classifier"
    linear_init_std = 0.01

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__(config[-1][-1], num_classes, drop_rate)
        in_widths = [in_chans] + [widths[-1] for widths in config[:-1]]
        for i, (in_channels, widths) in enumerate(zip(in_widths, config)):
            self.add_module(f"block{i}", conv_block(in_channels, widths))
        self.pool = nn.MaxPool2d(2, 2)
        kaiming_fan_out_(self)
        self.init_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        x = self.pool(torch.relu(self.block0(x)))
        x = self.pool(torch.relu(self.block1(x)))
        x = self.pool(torch.relu(self.block2(x)))
        x = torch.relu(self.block3(x))
        if side == 64:  # the authors' Tiny-ImageNet case: keeps the final map at 4x4
            x = self.pool(x)
        return torch.relu(self.block4(x))

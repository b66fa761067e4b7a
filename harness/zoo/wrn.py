"""Wide ResNets (Zagoruyko & Komodakis 2016) for CIFAR, as RepDistiller's ``models/wrn.py``.

WRN-d-k: depth d = 6n + 4, widths [16, 16k, 32k, 64k], pre-activation blocks (BN-ReLU before
each conv), a final BN-ReLU before pooling. When a block changes width, its 1x1 shortcut
conv reads the *activated* input (BN-ReLU applied), otherwise the shortcut is the raw input.

Module names follow the authors' code (``block1.layer.0.convShortcut``...), so their
checkpoints load unchanged. Their in-block dropout (``dropRate``, 0 in every KD recipe) is left
out; ``drop_rate`` here is timm's dropout before the classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.zoo.common import CifarNet, kaiming_fan_out_


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.convShortcut = None  # noqa: N815  (the authors' key name)
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))  # in place on BN's output; the raw x stays intact
        out = self.conv2(self.relu2(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
    """n wide blocks; the first one changes width and stride. (A module for the ``.layer`` key.)"""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(WideBlock(in_channels, out_channels, stride),
                                   *(WideBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class CifarWideResNet(CifarNet):
    """WRN-depth-widen for 32 px inputs; the final feature map is 8x8, after the final BN-ReLU."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4, not {depth}")
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        super().__init__(widths[3], num_classes, drop_rate)
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        kaiming_fan_out_(self)
        self.init_head()

    def init_linear(self, linear: nn.Linear) -> None:
        nn.init.zeros_(linear.bias)  # the authors zero the bias, keep PyTorch's default weight

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.relu(self.bn1(x))

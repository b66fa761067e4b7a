"""ShuffleNet V1 and V2 for CIFAR, as RepDistiller's ``models/ShuffleNetv1.py`` / ``ShuffleNetv2.py``.

Both replace the ImageNet stem (stride-2 3x3 conv and max-pool) with a 1x1 conv to 24
channels at full resolution; the three stages then halve 32 -> 16 -> 8 -> 4, so the final map
is 4x4. Both use PyTorch's default initialisation, as the authors' code does.

ShuffleV1 (Zhang et al. 2018): groups 3, stage widths 240 / 480 / 960, 4 / 8 / 4 blocks, no
final 1x1 conv. ShuffleV2 (Ma et al. 2018) at 1x: stage widths 116 / 232 / 464, each stage a
downsampling block followed by 3 / 7 / 3 basic blocks, then a 1x1 conv-BN-ReLU to 1024.

Module names follow the authors' code, so their checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.zoo.common import CifarNet, channel_shuffle

# ----------------------------------------------------------------------------- ShuffleNet V1


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 bottleneck, shuffle, 3x3 depthwise, grouped 1x1; ReLU after the merge.

    A stride-2 block concatenates its output with the 3x3-average-pooled input (so it makes
    ``out_channels - in_channels`` new channels); a stride-1 block adds the identity. The first
    1x1 conv after the 24-channel stem is not grouped (24 channels are too few to split), as in
    the paper and the authors' code.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        made = out_channels - in_channels if stride == 2 else out_channels
        mid = made // 4
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, made, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(made)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class CifarShuffleNetV1(CifarNet):
    """ShuffleNet V1 for 32 px inputs; final map 960 x 4 x 4."""

    classifier_name = "linear"

    def __init__(self, widths: Sequence[int] = (240, 480, 960), blocks: Sequence[int] = (4, 8, 4), groups: int = 3,
                 num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__(widths[-1], num_classes, drop_rate)
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = [ShuffleV1Block(channels, width, 2, groups)]
            stage += [ShuffleV1Block(width, width, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            channels = width
        self.init_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


# ----------------------------------------------------------------------------- ShuffleNet V2


class ShuffleV2Block(nn.Module):
    """Split the channels in half; the second half goes 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU;
    concatenate with the untouched first half and shuffle (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches, each making half the output channels; concatenated and shuffled.

    Left: 3x3 depthwise-BN, 1x1-BN-ReLU. Right: 1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class CifarShuffleNetV2(CifarNet):
    """ShuffleNet V2 1x for 32 px inputs; final map 1024 x 4 x 4 (after the last 1x1 conv-BN-ReLU)."""

    classifier_name = "linear"

    def __init__(self, widths: Sequence[int] = (116, 232, 464, 1024), blocks: Sequence[int] = (3, 7, 3),
                 num_classes: int = 100, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__(widths[-1], num_classes, drop_rate)
        self.conv1 = nn.Conv2d(in_chans, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        for i, (width, n) in enumerate(zip(widths[:3], blocks)):
            self.add_module(f"layer{i + 1}", nn.Sequential(ShuffleV2DownBlock(channels, width),
                                                           *(ShuffleV2Block(width) for _ in range(n))))
            channels = width
        self.conv2 = nn.Conv2d(channels, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.init_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn2(self.conv2(x)))

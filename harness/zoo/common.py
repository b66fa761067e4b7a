"""What every zoo model shares: timm's classification interface over a CIFAR feature trunk.

A subclass builds its trunk, calls :meth:`CifarNet.init_head`, and implements
``forward_features``. The head is always global average pooling, optional dropout and one
``nn.Linear``: exactly the "GAP + linear over a 4-D map" that SimKD and ATSC need to reuse a
teacher's classifier on a projected student map.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CifarNet(nn.Module):
    """Base class: global-average-pool head and the timm classifier methods.

    Attributes:
        classifier_name: dotted path of the final ``nn.Linear``. It is the name the authors'
            code gives it, so their checkpoints' keys (``fc.weight``, ``classifier.0.weight``,
            ...) load unchanged; ``pretrained_cfg['classifier']`` repeats it.
        num_features: channels of the final feature map (= in_features of the classifier).
        num_classes: outputs of the classifier (0: no classifier, ``forward`` gives features).
    """

    classifier_name: str = "fc"
    linear_init_std: Optional[float] = None  # N(0, std) weights and zero bias (VGG, MobileNetV2); None: PyTorch's

    def __init__(self, num_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.drop_rate = drop_rate

    # ------------------------------------------------------------------ classifier

    def init_linear(self, linear: nn.Linear) -> None:
        """How this family initialises its classifier: ``linear_init_std`` if set, else PyTorch's default."""
        if self.linear_init_std is not None:
            nn.init.normal_(linear.weight, 0.0, self.linear_init_std)
            nn.init.zeros_(linear.bias)

    def new_classifier(self, num_classes: int) -> nn.Module:
        """A fresh classifier for ``num_classes`` outputs (``nn.Identity`` for 0, as in timm)."""
        if num_classes <= 0:
            return nn.Identity()
        linear = nn.Linear(self.num_features, num_classes)
        self.init_linear(linear)
        return linear

    def init_head(self) -> None:
        """Create the classifier at ``classifier_name``; called at the end of a subclass ``__init__``."""
        self._set_classifier(self.new_classifier(self.num_classes))

    def _set_classifier(self, module: nn.Module) -> None:
        parent_name, _, leaf = self.classifier_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        setattr(parent, leaf, module)

    def get_classifier(self) -> nn.Module:
        """The final ``nn.Linear`` (``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one for ``num_classes`` outputs.

        ``global_pool`` is accepted for timm's signature; only average pooling exists here.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"{type(self).__name__} only pools by average, not {global_pool!r}")
        self.num_classes = num_classes
        self._set_classifier(self.new_classifier(num_classes))

    # ------------------------------------------------------------------ forward

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before global pooling, (B, num_features, H, W), after its ReLU."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool and flatten; then dropout and the classifier unless ``pre_logits``."""
        x = x.mean((2, 3))
        if pre_logits:
            return x
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def kaiming_fan_out_(module: nn.Module) -> None:
    """He-normal init of every conv by its fan-out, BN to identity: the CIFAR KD code's init.

    ``normal_(0, sqrt(2 / (k * k * out_channels)))``, as the authors' VGG, WRN and MobileNetV2
    write it, is exactly ``kaiming_normal_(mode='fan_out', nonlinearity='relu')``, as their
    ResNet writes it (also for depthwise convs: PyTorch's fan-out is out_channels * k * k).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, g*n, H, W) viewed as (g, n), transposed, flattened back."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)

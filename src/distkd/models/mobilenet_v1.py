"""MobileNet-V1 (width 1.0) for ImageNet, the student of the ResNet-50 -> MobileNet benchmark.

Module names follow the definition used by the DIST authors' image_classification_sota and the
Overhaul/CRD ImageNet code: ``model`` (a Sequential of a conv-BN-ReLU stem, 13 depthwise-separable
blocks ``[dw conv, BN, ReLU, pw conv, BN, ReLU]`` and a global average pool) and ``fc``, so their
checkpoints load strictly. ``(N, 3, 224, 224) -> (N, num_classes)``; 4.23M parameters with 1000 classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distkd.models import MODELS

# (output channels, stride) of the 13 depthwise-separable blocks
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet-V1: ``(N, in_chans, H, W) -> (N, num_classes)``; ``model.13`` gives ``(N, 1024, H/32, W/32)``."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        layers = [_conv_bn(in_chans, 32, 2)]
        cin = 32
        for cout, stride in _BLOCKS:
            layers.append(_conv_dw(cin, cout, stride))
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """TensorFlow-style init as in the reference: He-normal (fan-out) convs, uniform fan-out linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


@MODELS.register("mobilenetv1")
def mobilenetv1(num_classes: int = 1000, in_chans: int = 3) -> MobileNetV1:
    """The standard MobileNet-V1, width 1.0."""
    return MobileNetV1(num_classes=num_classes, in_chans=in_chans)

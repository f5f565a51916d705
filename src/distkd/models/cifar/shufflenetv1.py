"""ShuffleNetV1 (groups 3) for CIFAR, RepDistiller's ``ShuffleV1``.

Names and state_dict keys follow RepDistiller's ``models/ShuffleNetv1.py``: ``conv1``, ``bn1``,
``layer1..3`` of bottlenecks (``conv1, bn1, shuffle1, conv2, bn2, conv3, bn3, shortcut``) and
``linear``. Input ``(N, 3, 32, 32)``; ``layer3`` gives ``(N, 960, 4, 4)``.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``relu``, the stem after its ReLU),
``stage1..3`` (``layer1..3``), ``stage{k}_preact`` (the last bottleneck's sum or concatenation before its ReLU,
an ``nn.Identity`` named ``preact``) and ``penultimate`` (``flatten``, the pooled ``(N, 960)`` feature).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import ChannelShuffle, ready_taps


class ShuffleBottleneck(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1, then add (stride 1) or concat (stride 2).

    ``(N, cin, H, W) -> (N, cout, H, W)`` or ``(N, cout + cin, H/2, W/2)`` when ``stride == 2``.
    The first grouped conv of the network (24 input channels) is not grouped, as in the reference.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 4
        first_groups = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.preact = nn.Identity()  # the sum/concatenation before the last ReLU, for a forward hook (no state)

    def forward(self, x: Tensor) -> Tensor:
        relu = nn.functional.relu
        out = self.shuffle1(relu(self.bn1(self.conv1(x))))
        out = relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return relu(self.preact(torch.cat([out, res], 1) if self.stride == 2 else out + res))


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1: ``(N, 3, 32, 32) -> (N, num_classes)``; ``widths``/``blocks`` per stage."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        stages = []
        for width, count in zip(widths, blocks, strict=True):
            layers = [ShuffleBottleneck(cin, width - cin, stride=2, groups=groups)]
            layers += [ShuffleBottleneck(width, width, stride=1, groups=groups) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.distill_taps = ready_taps(
            "relu",
            ["layer1", "layer2", "layer3"],
            [f"layer{k}.{count - 1}.preact" for k, count in enumerate(blocks, 1)],
            "flatten",
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@MODELS.register("cifar_shufflev1")
def cifar_shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: widths (240, 480, 960), blocks (4, 8, 4), 3 groups."""
    return ShuffleNetV1(num_classes=num_classes)

"""ShuffleNetV2 (1.0x) for CIFAR, RepDistiller's ``ShuffleV2``.

Names and state_dict keys follow RepDistiller's ``models/ShuffleNetv2.py``: ``conv1``, ``bn1``,
``layer1..3`` (a down-sampling block ``conv1..5, bn1..5`` then basic blocks ``conv1..3, bn1..3``),
``conv2``, ``bn2`` and ``linear``. Input ``(N, 3, 32, 32)``; ``layer3`` gives ``(N, 464, 4, 4)``.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``relu``, the stem after its ReLU),
``stage1..3`` (``layer1..3``, before ``conv2``), ``stage{k}_preact`` (the last block's concatenation of the
kept half and the transformed half before its ReLU, not yet channel-shuffled, as RepDistiller returns it: an
``nn.Identity`` named ``preact``) and ``penultimate`` (``flatten``, the pooled ``(N, 1024)`` feature after
``conv2``-``bn2``-ReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import ChannelShuffle, ready_taps


class ShuffleV2Block(nn.Module):
    """Split channels: half passes through, half is transformed; ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.shuffle = ChannelShuffle(2)
        # RepDistiller's pre-activation feature, cat(kept half, bn3 output), for a forward hook (no state).
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        relu = nn.functional.relu
        keep, move = x.chunk(2, dim=1)
        out = relu(self.bn1(self.conv1(move)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        self.preact(torch.cat([keep, out], 1))
        return self.shuffle(torch.cat([keep, relu(out)], 1))


class DownBlock(nn.Module):
    """Two stride-2 branches concatenated: ``(N, cin, H, W) -> (N, cout, H/2, W/2)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, kernel_size=3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        relu = nn.functional.relu
        left = relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = relu(self.bn3(self.conv3(x)))
        right = relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2: ``(N, 3, 32, 32) -> (N, num_classes)``; ``widths`` = three stages + final conv."""

    def __init__(
        self,
        widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
        blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin = 24
        stages = []
        for width, count in zip(widths[:3], blocks, strict=True):
            stages.append(nn.Sequential(DownBlock(cin, width), *(ShuffleV2Block(width) for _ in range(count))))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(widths[3], num_classes)
        self.distill_taps = ready_taps(
            "relu",
            ["layer1", "layer2", "layer3"],
            [f"layer{k}.{count}.preact" for k, count in enumerate(blocks, 1)],
            "flatten",
        )

    def forward(self, x: Tensor) -> Tensor:
        relu = nn.functional.relu
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = relu(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@MODELS.register("cifar_shufflev2")
def cifar_shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net size 1.0): widths (116, 232, 464, 1024), blocks (3, 7, 3)."""
    return ShuffleNetV2(num_classes=num_classes)

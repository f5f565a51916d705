"""CIFAR ResNets with BasicBlocks (resnet8 ... resnet110, resnet8x4, resnet32x4).

Module names and state_dict keys follow RepDistiller's ``models/resnet.py`` (``conv1``, ``bn1``,
``layer1..3``, ``fc``; blocks ``conv1, bn1, conv2, bn2, downsample``), so the CRD/DKD/DIST teacher
checkpoints load strictly. Input ``(N, 3, 32, 32)``; ``layer1``/``layer2``/``layer3`` give
``(N, w1, 32, 32)``, ``(N, w2, 16, 16)``, ``(N, w3, 8, 8)`` after ReLU.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``relu``, the stem after its ReLU),
``stage1..3`` (``layer1..3``), ``stage{k}_preact`` (the last block's sum before its ReLU, an ``nn.Identity``
named ``preact``) and ``penultimate`` (``flatten``, the pooled ``(N, w3)`` feature the ``fc`` takes).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import init_reference, preact_batchnorms, ready_taps


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum: ``(N, cin, H, W) -> (N, cout, H/s, W/s)``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.preact = nn.Identity()  # the sum before the last ReLU, for a forward hook (no state)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return nn.functional.relu(self.preact(out + shortcut))


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for 32x32 images: ``(N, 3, 32, 32) -> (N, num_classes)``.

    ``widths``: channels of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_reference(self)
        self.distill_taps = ready_taps(
            "relu",
            ["layer1", "layer2", "layer3"],
            [f"layer{k}.{blocks - 1}.preact" for k in (1, 2, 3)],
            "flatten",
        )
        # the last block's bn2, before the shortcut is added (OFD's get_bn_before_relu)
        self.distill_preact_bn = preact_batchnorms([f"layer{k}.{blocks - 1}.bn2" for k in (1, 2, 3)])

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride)]
        layers += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
_CONFIGS = {
    "resnet8": (8, _THIN),
    "resnet14": (14, _THIN),
    "resnet20": (20, _THIN),
    "resnet32": (32, _THIN),
    "resnet44": (44, _THIN),
    "resnet56": (56, _THIN),
    "resnet110": (110, _THIN),
    "resnet8x4": (8, _WIDE),
    "resnet32x4": (32, _WIDE),
}
for _name, (_depth, _widths) in _CONFIGS.items():
    MODELS.register(f"cifar_{_name}")(partial(CifarResNet, _depth, _widths))

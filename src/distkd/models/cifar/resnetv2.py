"""The CIFAR ResNet50 (bottleneck ResNet with a 3x3 stride-1 stem and no max-pool).

Names and state_dict keys follow RepDistiller's ``models/resnetv2.py`` (``conv1``, ``bn1``,
``layer1..4``, ``linear``; blocks ``conv1..3, bn1..3, shortcut``). Input ``(N, 3, 32, 32)``;
``layer4`` gives ``(N, 2048, 4, 4)``.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``relu``, the stem after its ReLU),
``stage1..4`` (``layer1..4``), ``stage{k}_preact`` (the last bottleneck's sum before its ReLU, an
``nn.Identity`` named ``preact``) and ``penultimate`` (``flatten``, the pooled ``(N, 2048)`` feature).
"""

from __future__ import annotations

from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import init_reference, preact_batchnorms, ready_taps


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) with a shortcut: ``(N, cin, H, W) -> (N, 4p, H/s, W/s)``."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.preact = nn.Identity()  # the sum before the last ReLU, for a forward hook (no state)

    def forward(self, x: Tensor) -> Tensor:
        relu = nn.functional.relu
        out = relu(self.bn1(self.conv1(x)))
        out = relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return relu(self.preact(out + self.shortcut(x)))


class CifarResNetV2(nn.Module):
    """Bottleneck ResNet for 32x32 images: ``(N, 3, 32, 32) -> (N, num_classes)``.

    ``blocks``: bottlenecks per stage, ``(3, 4, 6, 3)`` for ResNet50.
    """

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        stages = []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (count - 1)
            layers = []
            for stride in strides:
                layers.append(Bottleneck(cin, planes, stride))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(cin, num_classes)
        init_reference(self)
        self.distill_taps = ready_taps(
            "relu",
            [f"layer{k}" for k in (1, 2, 3, 4)],
            [f"layer{k}.{count - 1}.preact" for k, count in enumerate(blocks, 1)],
            "flatten",
        )
        # the last block's bn3, before the shortcut is added (OFD's get_bn_before_relu)
        self.distill_preact_bn = preact_batchnorms([f"layer{k}.{count - 1}.bn3" for k, count in enumerate(blocks, 1)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


@MODELS.register("cifar_resnet50")
def cifar_resnet50(num_classes: int = 100) -> CifarResNetV2:
    """The CIFAR ResNet50 teacher (23.7M parameters with 100 classes)."""
    return CifarResNetV2((3, 4, 6, 3), num_classes=num_classes)

"""MobileNetV2 for CIFAR as used by CRD/DKD/DIST (``mobile_half``: expansion 6, width 0.5).

Names and state_dict keys follow RepDistiller's ``models/mobilenetv2.py``: ``conv1`` (conv-BN-ReLU),
``blocks`` (a ModuleList of 7 stages; each inverted residual holds its layers in ``conv``), ``conv2``
(1x1 conv-BN-ReLU to 1280) and ``classifier`` (a Sequential holding one Linear). Input
``(N, 3, 32, 32)``; the stem has stride 2, so ``blocks.6`` gives ``(N, 160, 2, 2)``.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``conv1``, after its ReLU),
``stage1..4`` (``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``: 16x16, 8x8, 4x4, 2x2 maps; the blocks
end with a linear projection, so no ReLU follows them), ``stage{k}_preact`` (the same modules: RepDistiller's
``preact=True`` returns the same features for this network) and ``penultimate`` (``flatten``, ``(N, 1280)``).
"""

from __future__ import annotations

from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import init_reference, ready_taps

# (expansion or None for the model's T, output channels, repeats, first stride)
_SETTING: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3x3 (stride), linear pointwise project; residual when shapes allow.

    ``(N, cin, H, W) -> (N, cout, H/s, W/s)``.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with expansion ``expansion`` and width multiplier ``width``: ``(N, 3, H, W) -> (N, num_classes)``."""

    def __init__(self, expansion: int = 6, width: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            cout = int(c * width)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, cout, stride, expansion if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_reference(self, linear_std=0.01)
        stages = [f"blocks.{i}" for i in (1, 2, 4, 6)]
        self.distill_taps = ready_taps("conv1", stages, stages, "flatten")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(self.flatten(self.avgpool(x)))


@MODELS.register("cifar_mobilenetv2")
def cifar_mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2, expansion 6, width 0.5 (0.81M parameters)."""
    return MobileNetV2(expansion=6, width=0.5, num_classes=num_classes)


MODELS.register("cifar_mobile_half")(cifar_mobilenetv2)

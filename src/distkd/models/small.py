"""Small CNN and ResNet families for small images (the embedded silhouettes demo and studies).

Names encode depth and base width: ``small_cnn3_w4`` is 3 convolutions with widths (4, 8, 16),
``small_cnn6_w32`` is 6 convolutions with widths (32, 32, 64, 64, 128, 128), ``small_resnet8_w16`` is
a CIFAR-style ResNet with 3 stages of one BasicBlock each and widths (16, 32, 64).
"""

from __future__ import annotations

from torch import Tensor, nn

from distkd.models import MODELS


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Plain conv-BN-ReLU stages with a 2x2 max-pool after each stage, global average pool, linear.

    ``stages`` lists the conv widths of each stage, e.g. ``((4,), (8,), (16,))``.
    Input (N, in_chans, H, W) -> logits (N, num_classes). Ready tap names (``distill_taps``): ``stage{k}`` the
    k-th stage's pooled output, ``penultimate`` the globally pooled feature (N, C, 1, 1).
    """

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int, in_chans: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        self.distill_taps: dict[str, str] = {}
        for k, widths in enumerate(stages, 1):
            for cout in widths:
                layers += _conv_bn_relu(cin, cout)
                cin = cout
            layers.append(nn.MaxPool2d(2))
            self.distill_taps[f"stage{k}"] = f"features.{len(layers) - 1}"
        self.distill_taps["penultimate"] = "pool"
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut. (N, cin, H, W) -> (N, cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: stem conv, 3 stages of ``blocks`` BasicBlocks (widths w, 2w, 4w), GAP, linear.

    Depth = 6 * blocks + 2. Input (N, in_chans, H, W) -> logits (N, num_classes). Ready tap names: ``stem``,
    ``stage1``..``stage3``, ``penultimate`` (N, C, 1, 1).
    """

    distill_taps = {"stem": "conv1", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3",
                    "penultimate": "pool"}

    def __init__(self, blocks: int, width: int, num_classes: int, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_chans, width))
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _register_cnn(depth: int, width: int) -> None:
    per_stage = depth // 3
    stages = tuple((width * 2**i,) * per_stage for i in range(3))

    @MODELS.register(f"small_cnn{depth}_w{width}")
    def build(num_classes: int, in_chans: int = 1) -> SmallCNN:
        return SmallCNN(stages, num_classes, in_chans)


def _register_resnet(depth: int, width: int) -> None:
    @MODELS.register(f"small_resnet{depth}_w{width}")
    def build(num_classes: int, in_chans: int = 1) -> SmallResNet:
        return SmallResNet((depth - 2) // 6, width, num_classes, in_chans)


for _width in (2, 4, 8):
    _register_cnn(3, _width)
for _width in (4, 8, 16, 32, 64):
    _register_cnn(6, _width)
for _depth in (8, 14, 20):
    for _width in (8, 16, 32):
        _register_resnet(_depth, _width)

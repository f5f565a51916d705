"""Wide ResNets WRN-d-k for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Names and state_dict keys follow RepDistiller's ``models/wrn.py``: ``conv1``, ``block1..3`` (each a
``layer`` Sequential of pre-activation blocks with ``bn1, conv1, bn2, conv2`` and ``convShortcut``
where the width changes), final ``bn1`` and ``fc``. Input ``(N, 3, 32, 32)``; ``block3`` gives
``(N, 64k, 8, 8)`` before the final BN-ReLU.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``conv1``, no BN-ReLU yet),
``stage1..3`` (``block1..3``, pre-activation blocks: their outputs are sums, before any BN), ``stage{k}_preact``
(the BN the next block, or the final ``bn1``, applies to ``stage{k}``: ``block2.layer.0.bn1``,
``block3.layer.0.bn1``, ``bn1``) and ``penultimate`` (``flatten``, the pooled ``(N, 64k)`` feature). The ReLUs
after those BNs are not in-place, so a hook on the BN keeps its pre-activation output.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import init_reference, preact_batchnorms, ready_taps


class WideBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3 twice: ``(N, cin, H, W) -> (N, cout, H/s, W/s)``.

    When the width changes, the shortcut is a 1x1 conv of the pre-activated input (as in the reference).
    """

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()  # not in-place: bn1's output is a tap (stage{k}_preact of the previous stage)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = cin == cout
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = nn.functional.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """``count`` WideBlocks, the first one changing width and stride, held as ``layer``."""

    def __init__(self, count: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate) for i in range(count))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: ``(N, 3, 32, 32) -> (N, num_classes)``; ``depth`` is ``6n + 4``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        count = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(count, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(count, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(count, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not in-place: bn1's output is the stage3_preact tap
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_reference(self)
        nn.init.zeros_(self.fc.bias)
        self.distill_taps = ready_taps(
            "conv1", ["block1", "block2", "block3"], ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"], "flatten"
        )
        self.distill_preact_bn = preact_batchnorms(["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"])

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(nn.functional.adaptive_avg_pool2d(x, 1)))


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"cifar_wrn_{_depth}_{_widen}")(partial(WideResNet, _depth, _widen))

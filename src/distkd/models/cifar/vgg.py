"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19), fully-connected layers removed.

Names and state_dict keys follow RepDistiller's ``models/vgg.py``: ``block0..block4`` (conv-BN-ReLU
Sequentials whose last ReLU is dropped, so a hook on ``blockK`` sees pre-activation features),
``pool0..pool4`` and ``classifier``. Input ``(N, 3, 32, 32)``; ``block4`` gives ``(N, 512, 4, 4)``.

Ready tap names (``distill_taps``, RepDistiller's ``feats``): ``stem`` (``relu0``, block0 after its ReLU, before
``pool0``), ``stage1..4`` (``relu1..4``, each block after its ReLU, before its pool), ``stage{k}_preact``
(``block1..4``, before that ReLU) and ``penultimate`` (``flatten``, the pooled ``(N, 512)`` feature).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from distkd.models import MODELS
from distkd.models.cifar.common import init_reference, preact_batchnorms, ready_taps

_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for 32x32 (or 64x64) images: ``(N, 3, H, W) -> (N, num_classes)``.

    ``stages``: conv widths of the five blocks. As in the reference, ``pool3`` only runs for 64x64
    inputs, so ``block4`` sees 4x4 maps at either size.
    """

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int = 100) -> None:
        super().__init__()
        ins = (3,) + tuple(widths[-1] for widths in stages[:-1])
        self.block0, self.block1, self.block2, self.block3, self.block4 = (
            _stage(cin, widths) for cin, widths in zip(ins, stages, strict=True)
        )
        self.pool0, self.pool1, self.pool2, self.pool3 = (nn.MaxPool2d(kernel_size=2, stride=2) for _ in range(4))
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        # Each block's ReLU as a module of its own (no state), so the post-ReLU features can be tapped.
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(stages[-1][-1], num_classes)
        init_reference(self, linear_std=0.01)
        self.distill_taps = ready_taps(
            "relu0", [f"relu{k}" for k in (1, 2, 3, 4)], [f"block{k}" for k in (1, 2, 3, 4)], "flatten"
        )
        blocks = (self.block1, self.block2, self.block3, self.block4)  # each ends with its last BatchNorm
        self.distill_preact_bn = preact_batchnorms([f"block{k}.{len(b) - 1}" for k, b in enumerate(blocks, 1)])

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if height == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


for _name, _stages in _STAGES.items():
    MODELS.register(f"cifar_{_name}")(partial(VGG, _stages))

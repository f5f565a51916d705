"""Dilated ResNet backbones (output stride 8) for semantic segmentation.

Stages 3 and 4 keep stride 1 and dilate their 3x3 convolutions by 2 and 4 instead, so a (N, C, H, W)
input gives stage-3 and stage-4 features at (H/8, W/8). torchvision's BasicBlock refuses dilation, so both
block types are defined here. Module names and state_dict keys match torchvision's ``resnet*`` (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ...), so its ImageNet weights load strictly once
the classifier (``fc.*``) is dropped. ``base_width`` scales every stage (64 = the standard ResNet) for the
narrow demo backbones.

``style="v1b"`` builds the backbone of the DIST authors' segmentation code (CIRKD's ``resnet*_v1s``,
class ``ResNetV1b`` with ``deep_stem=True``): a stem of three 3x3 convolutions (3 -> 64 stride 2, 64 -> 64,
64 -> 128; keys ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``) before the max-pool, so stage 1 starts
from 128 channels (its first block gets a ``downsample``), and their dilation pattern: in the basic block the
first convolution takes the block's dilation and the second the stage's (stage 3: block 0 dilates (1, 2), the
others (2, 2); stage 4: (2, 4), then (4, 4)); a bottleneck's 3x3 takes the block's dilation (1 then 2 in
stage 3, 2 then 4 in stage 4, as torchvision). Its keys are those of their backbone files, so their
ImageNet-pretrained backbones load strictly (``fc.*`` dropped).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distkd.errors import CheckpointError, ConfigError, UnknownNameError


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; ``dilation`` applies to the first and
    ``second_dilation`` (default: the same) to the second."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, second_dilation: int | None = None) -> None:
        super().__init__()
        second = dilation if second_dilation is None else second_dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, second, second, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, dilated), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, second_dilation: int | None = None) -> None:
        super().__init__()  # second_dilation: unused (one 3x3 convolution), accepted for a common signature
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


STYLES = ("torchvision", "v1b")

ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class DilatedResNet(nn.Module):
    """A ResNet trunk at output stride 8: ``forward(x (N, C_in, H, W)) -> (c3, c4)``.

    ``c3`` is stage 3, (N, 4 * base_width * expansion, H/8, W/8); ``c4`` is stage 4,
    (N, 8 * base_width * expansion, H/8, W/8). In the dilated stages the first block keeps the previous
    dilation and the others use the new one (torchvision's ``replace_stride_with_dilation`` rule).
    ``output_stride`` 4 drops the stem's max-pool and 2 also the stem conv's stride, for small images;
    neither changes the parameters, so the same weights load. ``style``: ``"torchvision"`` (7x7 stem) or
    ``"v1b"`` (the authors' 3x3 deep stem and dilation pattern, see the module docstring).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 in_chans: int = 3, base_width: int = 64, output_stride: int = 8,
                 style: str = "torchvision") -> None:
        super().__init__()
        if output_stride not in (2, 4, 8):
            raise ConfigError(f"output_stride must be 8, 4 or 2, got {output_stride}")
        if style not in STYLES:
            raise ConfigError(f"unknown backbone style {style!r}; choose one of {', '.join(STYLES)}")
        self.style = style
        self.dilation = 1
        stride = 1 if output_stride == 2 else 2
        if style == "v1b":  # 3x3 stem: base -> base (stride 2) -> base -> 2 * base
            self.conv1 = nn.Conv2d(in_chans, base_width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(base_width)
            self.conv2 = nn.Conv2d(base_width, base_width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(base_width)
            self.conv3 = nn.Conv2d(base_width, base_width * 2, 3, 1, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(base_width * 2)
            self.inplanes = base_width * 2
        else:
            self.conv1 = nn.Conv2d(in_chans, base_width, 7, stride, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(base_width)
            self.inplanes = base_width
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if output_stride == 8 else nn.Identity()
        self.layer1 = self._make_stage(block, base_width, layers[0], stride=1, dilate=False)
        self.layer2 = self._make_stage(block, base_width * 2, layers[1], stride=2, dilate=False)
        self.layer3 = self._make_stage(block, base_width * 4, layers[2], stride=2, dilate=True)
        self.layer4 = self._make_stage(block, base_width * 8, layers[3], stride=2, dilate=True)
        self.c3_channels = base_width * 4 * block.expansion
        self.c4_channels = base_width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int, dilate: bool) -> nn.Sequential:
        first_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        if self.style == "v1b" and dilate:  # CIRKD: block 0's second conv already takes the stage's dilation
            first = block(self.inplanes, planes, stride, first_dilation, downsample, second_dilation=self.dilation)
        else:
            first = block(self.inplanes, planes, stride, first_dilation, downsample)
        stage = [first]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.style == "v1b":
            x = self.relu(self.bn3(self.conv3(self.relu(self.bn2(self.conv2(x))))))
        x = self.maxpool(x)
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


def dilated_resnet(arch: str, in_chans: int = 3, base_width: int = 64,
                   layers: tuple[int, int, int, int] | None = None, output_stride: int = 8,
                   style: str = "torchvision") -> DilatedResNet:
    """The dilated ``arch`` (resnet18/34/50/101), optionally with other per-stage block counts."""
    if arch not in ARCHS:
        raise UnknownNameError(f"unknown dilated backbone '{arch}'; known: {', '.join(ARCHS)}")
    block, default_layers = ARCHS[arch]
    return DilatedResNet(block, layers or default_layers, in_chans, base_width, output_stride, style)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Turn a stem kernel (O, 3, k, k) into (O, in_chans, k, k): summed for 1 channel, else tiled.

    Tiling repeats the RGB filters and rescales by ``3 / in_chans`` so activations keep their size.
    """
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``arch`` (from the torch hub cache, or downloaded)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"could not get torchvision's ImageNet weights for {arch} ({type(exc).__name__}: {exc}); "
            f"download them where there is internet and set backbone_weights: PATH"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict saved at ``path`` (plain, or under a ``state_dict``/``model`` key)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file '{path}' does not exist; fix backbone_weights: PATH")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt file
        raise CheckpointError(f"cannot read backbone weights '{path}' ({type(exc).__name__}); "
                              "save them with torch.save(model.state_dict(), PATH)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"backbone weights '{path}' hold no state_dict; save model.state_dict()")
    return state


def load_backbone(backbone: DilatedResNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Load an ImageNet-style ResNet ``state`` into ``backbone`` strictly (``fc.*`` is dropped).

    The stem kernel is adapted to the backbone's input channels (:func:`adapt_input_conv`).
    """
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_input_conv(state["conv1.weight"], backbone.conv1.in_channels)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise CheckpointError(
            f"backbone weights from {source} do not fit this backbone ({first.strip()}); "
            "give a torchvision-layout ResNet state_dict of the same depth"
        ) from None

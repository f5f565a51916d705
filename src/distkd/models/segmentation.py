"""Semantic-segmentation models: DeepLabV3 and PSPNet on dilated ResNets, and torchvision's own.

Output contract (every model here): ``forward(x (N, C_in, H, W)) -> {"out": (N, K, h, w), "aux": ...}``.
Our models return logits at the head's resolution, h, w = ceil(H/8), ceil(W/8), NOT upsampled: DIST is
computed on these per-pixel logits (as in the authors' code); the task upsamples them for the
cross-entropy and evaluation. ``"aux"`` is the FCN head on stage 3 (same shape as ``"out"``) and is
absent when ``aux=False``. ``tvseg_<name>`` models (torchvision's segmentation zoo) upsample
internally, so they return (N, K, H, W).

Head details follow the CIRKD/DIST segmentation code: ASPP rates 12/24/36 (output stride 8) with image
pooling, 0.5 dropout after the projection; PSP bins 1/2/3/6 with in/4 channels per bin; head width 128
on 512-channel trunks and 256 on 2048-channel trunks; an auxiliary FCN head with in/4 channels and 0.1
dropout.

``seg_<head>_resnet{18,50,101}v1b`` use the authors' backbone (3x3 deep stem and CIRKD's dilation pattern,
see :mod:`distkd.models.dilated_resnet`); their weight files load as they are: a backbone file (the
authors' ImageNet-pretrained ``resnet18-imagenet.pth``) through ``backbone_weights``, and a whole
checkpoint of their ``DeepLabV3``/``PSPNet`` classes (``pretrained.*``, ``head.aspp.*``/``head.psp.*``,
``auxlayer.*`` keys, e.g. their Cityscapes teacher) through ``model.checkpoint``/``teacher.checkpoint``:
:meth:`SegmentationNet.convert_state_dict` renames their keys to ours, one for one, and the load stays strict.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from distkd.errors import CheckpointError, ConfigError, UnknownNameError
from distkd.models import MODELS
from distkd.models.dilated_resnet import (
    DilatedResNet,
    adapt_input_conv,
    dilated_resnet,
    imagenet_state_dict,
    load_backbone,
    read_state_dict,
)
from distkd.registry import nearest


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BatchNorm + ReLU."""
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PooledBranch(nn.Module):
    """Average-pool to ``bins`` x ``bins``, 1x1 conv-BN-ReLU, upsample back: (N, C, h, w) -> (N, D, h, w)."""

    def __init__(self, cin: int, cout: int, bins: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.conv = conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and an image-pooling branch, projected."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (12, 24, 36)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout)]
            + [conv_bn_relu(cin, cout, 3, rate) for rate in rates]
            + [PooledBranch(cin, cout, 1)]
        )
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


class PyramidPooling(nn.Module):
    """PSP module: the input concatenated with pooled branches at ``bins``, each of in/4 channels."""

    def __init__(self, cin: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList([PooledBranch(cin, cin // 4, b) for b in bins])
        self.out_channels = cin + len(bins) * (cin // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [branch(x) for branch in self.branches], dim=1)


class DeepLabHead(nn.Module):
    """ASPP, then 3x3 conv-BN-ReLU, dropout 0.1 and a 1x1 classifier: (N, C, h, w) -> (N, K, h, w)."""

    def __init__(self, cin: int, width: int, num_classes: int, rates: tuple[int, ...] = (12, 24, 36)) -> None:
        super().__init__()
        self.context = ASPP(cin, width, rates)
        self.fuse = nn.Sequential(conv_bn_relu(width, width, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(self.context(x)))


class PSPHead(nn.Module):
    """Pyramid pooling, then 3x3 conv-BN-ReLU, dropout 0.1 and a 1x1 classifier."""

    def __init__(self, cin: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.context = PyramidPooling(cin)
        self.fuse = nn.Sequential(conv_bn_relu(self.context.out_channels, width, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fuse(self.context(x)))


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv-BN-ReLU to in/4 channels, dropout 0.1, 1x1 classifier."""

    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn_relu(cin, cin // 4, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(cin // 4, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(x))


class SegmentationNet(nn.Module):
    """A dilated backbone with a main head on stage 4 and an optional FCN head on stage 3.

    ``forward(x (N, C_in, H, W)) -> {"out": (N, K, H/8, W/8), "aux": (N, K, H/8, W/8)}`` (see the module
    docstring; ``"aux"`` only when built with ``aux=True``).
    """

    def __init__(self, backbone: DilatedResNet, head: nn.Module, aux_head: nn.Module | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head

    @staticmethod
    def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with the keys of the authors' (CIRKD-based) DeepLabV3/PSPNet renamed to ours; a state in
        our layout (no ``pretrained.*`` key) is returned as it is. Keys no rule renames are kept, so a strict
        load still reports them."""
        if not any(k.startswith("pretrained.") for k in state):
            return state
        out = {}
        for key, value in state.items():
            for pattern, replace in _AUTHOR_KEYS:
                key, hits = pattern.subn(replace, key, count=1)
                if hits:
                    break
            out[key] = value
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c3, c4 = self.backbone(x)
        out = {"out": self.head(c4)}
        if self.aux_head is not None:
            out["aux"] = self.aux_head(c3)
        return out


# (their key prefix, ours) for the authors' segmentation classes (hunto/DIST_KD segmentation/models, after CIRKD)
_AUTHOR_KEYS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^pretrained\.", "backbone."),
    (r"^head\.aspp\.b0\.", "head.context.branches.0."),
    (r"^head\.aspp\.b([123])\.block\.", r"head.context.branches.\1."),
    (r"^head\.aspp\.b4\.gap\.1\.", "head.context.branches.4.conv.0."),
    (r"^head\.aspp\.b4\.gap\.2\.", "head.context.branches.4.conv.1."),
    (r"^head\.aspp\.project\.", "head.context.project.0."),
    (r"^head\.psp\.conv1\.", "head.context.branches.0.conv."),
    (r"^head\.psp\.conv2\.", "head.context.branches.1.conv."),
    (r"^head\.psp\.conv3\.", "head.context.branches.2.conv."),
    (r"^head\.psp\.conv4\.", "head.context.branches.3.conv."),
    (r"^head\.block\.([01])\.", r"head.fuse.0.\1."),
    (r"^head\.block\.4\.", "head.classifier."),
    (r"^auxlayer\.block\.([01])\.", r"aux_head.block.0.\1."),
    (r"^auxlayer\.block\.4\.", "aux_head.classifier."),
))

HEADS: dict[str, type[DeepLabHead] | type[PSPHead]] = {"deeplabv3": DeepLabHead, "pspnet": PSPHead}


def build_segmentation_net(head: str, arch: str, num_classes: int, in_chans: int = 3, aux: bool = True,
                           pretrained_backbone: bool = False, backbone_weights: str | None = None,
                           base_width: int = 64, layers: tuple[int, int, int, int] | None = None,
                           head_width: int | None = None, output_stride: int = 8,
                           aspp_rates: tuple[int, ...] = (12, 24, 36), style: str = "torchvision") -> SegmentationNet:
    """Assemble ``head`` ("deeplabv3" | "pspnet") on the dilated ``arch`` backbone.

    ``backbone_weights`` (a local state_dict file) wins over ``pretrained_backbone`` (torchvision's
    ImageNet weights); both load the backbone strictly. ``head_width`` defaults to c4/4 for basic-block
    trunks (128 on ResNet-18) and c4/8 for bottleneck trunks (256 on ResNet-50/101). ``output_stride``
    (8, 4 or 2) sets the logits' resolution H/os; ``aspp_rates`` (DeepLabV3 only) suit stride 8 on
    large images by default. ``style``: ``"torchvision"`` (7x7 stem) or ``"v1b"`` (the authors' deep stem;
    torchvision's ImageNet weights do not fit it, so ``pretrained_backbone`` is refused: give their backbone
    file as ``backbone_weights``).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if head not in HEADS:
        raise UnknownNameError(f"unknown segmentation head '{head}'; known: {', '.join(HEADS)}")
    layers = tuple(layers) if layers is not None else None  # type: ignore[assignment]
    backbone = dilated_resnet(arch, in_chans, base_width, layers, output_stride, style)
    if backbone_weights is not None:
        load_backbone(backbone, read_state_dict(backbone_weights), f"'{backbone_weights}'")
    elif pretrained_backbone:
        if style == "v1b":
            raise ConfigError("torchvision's ImageNet weights have a 7x7 stem and do not fit the v1b (deep-stem) "
                              "backbone; give the authors' ImageNet backbone file as backbone_weights: PATH")
        if base_width != 64 or layers is not None:
            raise ConfigError("ImageNet weights exist only for the standard widths and depths; "
                              "set pretrained_backbone: false for narrow backbones")
        load_backbone(backbone, imagenet_state_dict(arch), f"torchvision {arch}")
    c4 = backbone.c4_channels
    width = head_width or (c4 // 4 if c4 == 8 * base_width else c4 // 8)
    aux_head = FCNHead(backbone.c3_channels, num_classes) if aux else None
    context = {"rates": tuple(aspp_rates)} if head == "deeplabv3" else {}
    return SegmentationNet(backbone, HEADS[head](c4, width, num_classes, **context), aux_head)


def _register_dilated() -> None:
    """``seg_<head>_resnet{18,50,101}`` (7x7 stem), ``seg_<head>_resnet{18,50,101}v1b`` (the authors') and the
    narrow ``seg_<head>_tiny`` (base width 4, one block per stage).

    The tiny defaults make a ~30k-parameter student; ``base_width=16, layers=(2, 2, 2, 2)`` makes a
    ~0.85M-parameter teacher for the same 64x64 demo scenes. Their ASPP rates are 1/2/3: on the 8x8
    maps of 64x64 inputs, rates 12/24/36 would only ever see the centre tap.
    """
    for head in HEADS:
        for depth in (18, 50, 101):
            MODELS.register(f"seg_{head}_resnet{depth}")(
                functools.partial(build_segmentation_net, head, f"resnet{depth}")
            )
            MODELS.register(f"seg_{head}_resnet{depth}v1b")(
                functools.partial(build_segmentation_net, head, f"resnet{depth}", style="v1b")
            )
        MODELS.register(f"seg_{head}_tiny")(
            functools.partial(build_segmentation_net, head, "resnet18", base_width=4, layers=(1, 1, 1, 1),
                              aspp_rates=(1, 2, 3))
        )


def tvseg_model(name: str, num_classes: int, in_chans: int = 3, aux: bool = True,
                pretrained_backbone: bool = False, **kw: object) -> nn.Module:
    """torchvision's segmentation model ``name`` (e.g. ``deeplabv3_resnet50``), randomly initialised.

    Returns ``{"out": (N, K, H, W)[, "aux": (N, K, H, W)]}`` at the INPUT resolution (torchvision
    upsamples inside). ``pretrained_backbone`` loads torchvision's ImageNet backbone weights; a stem
    for ``in_chans`` != 3 is adapted from the RGB one.
    """
    import torchvision
    from torchvision.models import segmentation

    known = torchvision.models.list_models(module=segmentation)
    if name not in known:
        raise UnknownNameError(
            f"unknown torchvision segmentation model '{name}'{nearest(name, known)}; known: {', '.join(known)}"
        )
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, aux_loss=aux,
                                             weights_backbone="DEFAULT" if pretrained_backbone else None, **kw)
    except NotImplementedError:
        raise ConfigError(f"tvseg_{name} has no auxiliary head; set aux: false") from None
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"could not get ImageNet backbone weights for tvseg_{name} ({type(exc).__name__}); "
            "set pretrained_backbone: false or put torchvision's weights in the torch hub cache"
        ) from None
    if in_chans != 3:
        _adapt_first_conv(model.backbone, in_chans)
    return model


def _adapt_first_conv(module: nn.Module, in_chans: int) -> None:
    """Replace the first Conv2d of ``module`` by one taking ``in_chans`` channels (weights adapted)."""
    for parent in module.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                conv = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride, child.padding,
                                 child.dilation, child.groups, child.bias is not None)
                with torch.no_grad():
                    conv.weight.copy_(adapt_input_conv(child.weight, in_chans))
                    if child.bias is not None:
                        conv.bias.copy_(child.bias)
                setattr(parent, child_name, conv)
                return


def _register_torchvision() -> None:
    import torchvision
    from torchvision.models import segmentation

    for name in torchvision.models.list_models(module=segmentation):
        MODELS.register(f"tvseg_{name}")(functools.partial(tvseg_model, name))


_register_dilated()
_register_torchvision()

"""Detectors: torchvision's RetinaNet, FCOS and Faster R-CNN (``tvdet_<name>``) and tiny ones for the demo.

``num_classes`` is always the number of object classes K: RetinaNet and FCOS predict K logits (labels
0..K-1), Faster R-CNN K + 1 (background at 0, objects 1..K); each model says which by ``label_offset``
(0 or 1), so data and metrics stay family-agnostic. Without pretrained weights every model has real
``BatchNorm2d`` and every layer trainable: torchvision's ``resnet_fpn_backbone`` defaults to
``FrozenBatchNorm2d`` (constant statistics, no normalisation from scratch) and frozen early blocks even
without weights. ``pretrained_backbone=True`` loads ImageNet backbone weights (frozen BN and the first
block frozen, torchvision's fine-tuning setting; needs network access or a filled torch hub cache).

Every detector names its distillation taps (``distill_taps``): ``cls_logits`` (RetinaNet/FCOS: the
classification head's last conv, called once per FPN level, output ``(N, A*K, H_l, W_l)``) and ``fpn`` (the
FPN, output an ordered dict of ``(N, 256, H_l, W_l)`` levels).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from distkd.errors import CheckpointError, ConfigError, first_line
from distkd.models import MODELS
from distkd.models.small import BasicBlock

FAMILIES = {"retinanet": RetinaNet, "fcos": FCOS, "fasterrcnn": FasterRCNN}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
TAPS = {"cls_logits": "head.classification_head.cls_logits", "fpn": "backbone.fpn"}
T = TypeVar("T")


def label_offset(model: nn.Module) -> int:
    """1 for detectors with a background logit (Faster R-CNN: objects are 1..K), else 0 (objects 0..K-1); a
    model may say so itself (``model.label_offset``)."""
    return int(getattr(model, "label_offset", 1 if isinstance(model, FasterRCNN) else 0))


def _finish(model: nn.Module) -> nn.Module:
    model.label_offset = 1 if isinstance(model, FasterRCNN) else 0
    taps = dict(TAPS) if not isinstance(model, FasterRCNN) else {"fpn": TAPS["fpn"]}
    model.distill_taps = taps
    return model


def _anchors(family: str, sizes: Sequence[Sequence[int]] | None, ratios: Sequence[float] | None,
             levels: int) -> AnchorGenerator | None:
    """The anchor generator for ``sizes`` (one tuple per level) and ``ratios``; None keeps the family default."""
    if sizes is None and ratios is None:
        return None
    if sizes is None:
        raise ConfigError(f"{family}: anchor_ratios needs anchor_sizes (one list per FPN level, {levels} levels)")
    sizes = tuple(tuple(int(s) for s in level) for level in sizes)
    if len(sizes) != levels:
        raise ConfigError(f"{family}: anchor_sizes has {len(sizes)} levels but the FPN has {levels}; give one list "
                          "per level")
    ratios = tuple(float(r) for r in (ratios or (0.5, 1.0, 2.0)))
    return AnchorGenerator(sizes, (ratios,) * levels)


def build_detector(family: str, backbone: nn.Module, num_classes: int, *, min_size: int | Sequence[int] = 800,
                   max_size: int = 1333, anchor_sizes: Sequence[Sequence[int]] | None = None,
                   anchor_ratios: Sequence[float] | None = None, image_mean: Sequence[float] | None = None,
                   image_std: Sequence[float] | None = None, **kwargs: object) -> nn.Module:
    """A ``family`` detector on ``backbone`` (a ``BackboneWithFPN``); ``kwargs`` go to torchvision's class."""
    levels = len(backbone.fpn.layer_blocks) + (
        2 if isinstance(backbone.fpn.extra_blocks, LastLevelP6P7) else
        1 if isinstance(backbone.fpn.extra_blocks, LastLevelMaxPool) else 0)
    anchors = _anchors(family, anchor_sizes, anchor_ratios, levels)
    if family == "fcos" and anchors is not None:
        raise ConfigError("fcos is anchor-free (one point per position); remove anchor_sizes/anchor_ratios")
    if family == "fcos":  # one point per position and level, torchvision's sizes 8 * 2**level
        anchors = AnchorGenerator(tuple((8 * 2**i,) for i in range(levels)), ((1.0,),) * levels)
    common = {"min_size": min_size, "max_size": max_size, "image_mean": image_mean, "image_std": image_std}
    if anchors is not None:  # None: torchvision's default for the family (5 levels)
        common["rpn_anchor_generator" if family == "fasterrcnn" else "anchor_generator"] = anchors
    classes = num_classes + (1 if family == "fasterrcnn" else 0)
    if "box_predictor" in kwargs:  # torchvision takes the class count from the given predictor
        classes = None
    try:
        model = FAMILIES[family](backbone, classes, **common, **kwargs)
    except TypeError as err:
        raise ConfigError(f"{family} does not accept these arguments: {err}") from None
    return _finish(model)


def resnet_fpn(name: str, family: str, pretrained_backbone: bool = False) -> BackboneWithFPN:
    """torchvision's ResNet(-X) FPN backbone, real BatchNorm and all layers trainable unless pretrained.

    RetinaNet/FCOS: C3-C5 + P6/P7 from P5 (5 levels, strides 8-128); Faster R-CNN: C2-C5 + max-pool P6.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown detection backbone '{name}'; use one of {', '.join(BACKBONES)}")
    weights = None
    if pretrained_backbone:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
    dense = family in ("retinanet", "fcos")
    return _fetching(name, lambda: resnet_fpn_backbone(
        backbone_name=name, weights=weights,
        norm_layer=misc_ops.FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d,
        trainable_layers=3 if pretrained_backbone else 5,
        returned_layers=[2, 3, 4] if dense else None,
        extra_blocks=LastLevelP6P7(256, 256) if dense else None,
    ))


def _fetching(what: str, build: Callable[[], T]) -> T:
    """``build()``, whose download of ImageNet backbone weights failing (offline, a damaged file) is a one-line
    CheckpointError saying where torchvision looks for the file and how to train without it."""
    try:
        return build()
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        import torch

        raise CheckpointError(f"cannot fetch torchvision's ImageNet weights for the {what} backbone (offline? "
                              f"{type(err).__name__}: {first_line(err)}); download them where there is internet "
                              f"into the torch hub cache ({torch.hub.get_dir()}/checkpoints), or set "
                              "model.kwargs.pretrained_backbone=false to train from scratch") from None


def tvdet_model(family: str, backbone: str, num_classes: int, pretrained_backbone: bool = False,
                **kwargs: object) -> nn.Module:
    """``tvdet_<family>_<backbone>_fpn``: a torchvision detector on a ResNet(-X) FPN (no detector weights)."""
    return build_detector(family, resnet_fpn(backbone, family, pretrained_backbone), num_classes, **kwargs)


def tvdet_builder(name: str, num_classes: int, pretrained_backbone: bool = False, **kwargs: object) -> nn.Module:
    """One of torchvision's detector builders (``retinanet_resnet50_fpn_v2``, ...), without detector weights.

    torchvision already builds these with real BatchNorm and all layers trainable when given no weights."""
    import torchvision.models.detection as tvd

    builder = getattr(tvd, name)
    weights_backbone = "DEFAULT" if pretrained_backbone else None
    classes = num_classes + (1 if name.startswith("fasterrcnn") else 0)
    sizes, ratios = kwargs.pop("anchor_sizes", None), kwargs.pop("anchor_ratios", None)
    if sizes is not None or ratios is not None:
        key = "rpn_anchor_generator" if name.startswith("fasterrcnn") else "anchor_generator"
        kwargs[key] = _anchors(name, sizes, ratios, len(sizes) if sizes is not None else 0)
    try:
        model = _fetching(f"tvdet_{name}", lambda: builder(weights=None, weights_backbone=weights_backbone,
                                                            num_classes=classes, **kwargs))
    except TypeError as err:
        raise ConfigError(f"tvdet_{name} does not accept these arguments: {err}") from None
    return _finish(model)


# ---------------------------------------------------------------------------------------------- tiny detectors


class NarrowResNet(nn.Sequential):
    """A narrow ResNet: stem (3x3 stride 2), then ``len(widths)`` stages of one block each, each stride 2.

    Input (N, 3, H, W); stage ``layer{i}`` (1-based) outputs (N, widths[i-1], H / 2**(i+1), W / 2**(i+1)).
    """

    def __init__(self, widths: Sequence[int], in_chans: int = 3) -> None:
        stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                             nn.ReLU(inplace=True))
        stages: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
        cin = widths[0]
        for i, width in enumerate(widths, 1):
            stages[f"layer{i}"] = BasicBlock(cin, width, 2)
            cin = width
        super().__init__(stages)


def tiny_backbone(widths: Sequence[int], fpn_channels: int) -> BackboneWithFPN:
    """A narrow ResNet with an FPN on its last three stages (strides 8, 16, 32) and a max-pool P6 (stride 64)."""
    if len(widths) != 3:
        raise ConfigError(f"tiny detectors take 3 stage widths (strides 8, 16, 32), got {list(widths)}")
    body = NarrowResNet([widths[0], *widths])  # stem/2, layer1/4, layer2/8, layer3/16, layer4/32
    return BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, list(widths), fpn_channels,
                           extra_blocks=LastLevelMaxPool())


TINY_DEFAULTS = {"min_size": 96, "max_size": 96, "anchor_sizes": ((16,), (32,), (48,), (64,)),
                 "anchor_ratios": (0.5, 1.0, 2.0)}


def tiny_detector(family: str, num_classes: int, widths: Sequence[int] = (16, 32, 64), fpn_channels: int = 32,
                  **kwargs: object) -> nn.Module:
    """``det_<family>_tiny``: a demo detector for ~96 px images (4 FPN levels, 3 anchors per position)."""
    options = dict(TINY_DEFAULTS) | kwargs
    if family == "fcos":
        options.pop("anchor_sizes", None)
        options.pop("anchor_ratios", None)
    if family == "retinanet":  # GroupNorm in the head's convs, as torchvision's v2 RetinaNet
        from torchvision.models.detection.retinanet import RetinaNetHead

        anchors = len(options["anchor_sizes"][0]) * len(options["anchor_ratios"])
        options.setdefault("head", RetinaNetHead(fpn_channels, anchors, num_classes,
                                                 norm_layer=functools.partial(nn.GroupNorm, 8)))
    if family == "fcos":  # GroupNorm(8): torchvision's GroupNorm(32) needs 32-channel multiples
        from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead

        head = FCOSHead(fpn_channels, 1, num_classes, num_convs=0)  # its sub-heads are replaced below
        norm = functools.partial(nn.GroupNorm, 8)
        head.classification_head = FCOSClassificationHead(fpn_channels, 1, num_classes, norm_layer=norm)
        head.regression_head = FCOSRegressionHead(fpn_channels, 1, norm_layer=norm)
        options.setdefault("head", head)
    if family == "fasterrcnn":
        options = {"rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32, "rpn_pre_nms_top_n_train": 300,
                   "rpn_post_nms_top_n_train": 100, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100,
                   **_tiny_box_head(fpn_channels, num_classes + 1)} | options
    return build_detector(family, tiny_backbone(widths, fpn_channels), num_classes, **options)


def _tiny_box_head(channels: int, classes: int) -> dict[str, nn.Module]:
    """A small RoI box head: 4x4 RoIAlign with one sample per bin, a 128-wide two-layer MLP, ``classes`` logits."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    return {"box_roi_pool": MultiScaleRoIAlign(["0", "1", "2", "pool"], 4, sampling_ratio=1),
            "box_head": TwoMLPHead(channels * 16, 128), "box_predictor": FastRCNNPredictor(128, classes)}


def _register() -> None:
    for family in FAMILIES:
        for backbone in BACKBONES:
            MODELS.register(f"tvdet_{family}_{backbone}_fpn")(functools.partial(tvdet_model, family, backbone))
        MODELS.register(f"det_{family}_tiny")(functools.partial(tiny_detector, family))
    for name in ("retinanet_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn"):
        MODELS.register(f"tvdet_{name}")(functools.partial(tvdet_builder, name))


_register()

"""The authors' segmentation backbone (``seg_*_resnet*v1b``): 3x3 deep stem, CIRKD's dilation pattern, and their
weight files (an ImageNet backbone, a whole DeepLabV3/PSPNet checkpoint) loading strictly.

Their layout is written out here from their model definitions (hunto/DIST_KD segmentation/models/deeplabv3.py,
winycg/CIRKD models/pspnet.py, models/segbase.py, models/base_models/resnetv1b.py: ``resnet18_v1s`` =
``ResNetV1b(deep_stem=True)``); every key gets a distinct random tensor so a misplaced one is caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distkd.errors import CheckpointError, ConfigError
from distkd.models import create_model
from distkd.models.dilated_resnet import dilated_resnet
from distkd.models.weights import load_weights

CLASSES = 19


def conv(shape: tuple[int, ...], bias: bool = False) -> dict[str, tuple[int, ...]]:
    return {"weight": shape, **({"bias": (shape[0],)} if bias else {})}


def bn(c: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()}


def keys(prefix: str, params: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": v for k, v in params.items()}


def their_resnet18_backbone(prefix: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of their ``resnet18_v1s``: 3x3 stem 3-64-64-128, then basic blocks from 128 channels."""
    out = {**keys(f"{prefix}conv1", conv((64, 3, 3, 3))), **keys(f"{prefix}bn1", bn(64)),
           **keys(f"{prefix}conv2", conv((64, 64, 3, 3))), **keys(f"{prefix}bn2", bn(64)),
           **keys(f"{prefix}conv3", conv((128, 64, 3, 3))), **keys(f"{prefix}bn3", bn(128))}
    inplanes = 128
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"{prefix}layer{stage}.{block}"
            cin = inplanes if block == 0 else planes
            out |= keys(f"{p}.conv1", conv((planes, cin, 3, 3))) | keys(f"{p}.bn1", bn(planes))
            out |= keys(f"{p}.conv2", conv((planes, planes, 3, 3))) | keys(f"{p}.bn2", bn(planes))
            if block == 0 and cin != planes:  # stage 1 too: 128 -> 64 channels
                out |= keys(f"{p}.downsample.0", conv((planes, cin, 1, 1))) | keys(f"{p}.downsample.1", bn(planes))
        inplanes = planes
    return out


def their_head(head: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of their DeepLabV3 / PSPNet head on the 512-channel trunk, with the FCN aux layer on stage 3."""
    out = keys("auxlayer.block.0", conv((64, 256, 3, 3))) | keys("auxlayer.block.1", bn(64))
    out |= keys("auxlayer.block.4", conv((CLASSES, 64, 1, 1), bias=True))
    if head == "deeplabv3":
        out |= keys("head.aspp.b0.0", conv((128, 512, 1, 1))) | keys("head.aspp.b0.1", bn(128))
        for b in (1, 2, 3):
            out |= keys(f"head.aspp.b{b}.block.0", conv((128, 512, 3, 3))) | keys(f"head.aspp.b{b}.block.1", bn(128))
        out |= keys("head.aspp.b4.gap.1", conv((128, 512, 1, 1))) | keys("head.aspp.b4.gap.2", bn(128))
        out |= keys("head.aspp.project.0", conv((128, 640, 1, 1))) | keys("head.aspp.project.1", bn(128))
        out |= keys("head.block.0", conv((128, 128, 3, 3))) | keys("head.block.1", bn(128))
        out |= keys("head.block.4", conv((CLASSES, 128, 1, 1), bias=True))
    else:
        for k in (1, 2, 3, 4):
            out |= keys(f"head.psp.conv{k}.0", conv((128, 512, 1, 1))) | keys(f"head.psp.conv{k}.1", bn(128))
        out |= keys("head.block.0", conv((128, 1024, 3, 3))) | keys("head.block.1", bn(128))
        out |= keys("head.classifier", conv((CLASSES, 128, 1, 1), bias=True))
    return out


def random_state(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randint(0, 100, s, generator=gen) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=gen)) for k, s in layout.items()}


@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_the_authors_cityscapes_checkpoint_loads_strictly_with_every_tensor_in_place(head: str, tmp_path: Path) -> None:
    theirs = random_state(their_resnet18_backbone("pretrained.") | their_head(head))
    torch.save(theirs, tmp_path / "citys_best_model.pth")
    model = create_model(f"seg_{head}_resnet18v1b", num_classes=CLASSES)
    assert len(model.state_dict()) == len(theirs)
    load_weights(model, tmp_path / "citys_best_model.pth")  # strict
    ours = model.state_dict()
    assert torch.equal(ours["backbone.conv3.weight"], theirs["pretrained.conv3.weight"])
    assert torch.equal(ours["backbone.layer1.0.downsample.0.weight"], theirs["pretrained.layer1.0.downsample.0.weight"])
    assert torch.equal(ours["aux_head.classifier.weight"], theirs["auxlayer.block.4.weight"])
    assert torch.equal(ours["head.fuse.0.1.running_var"], theirs["head.block.1.running_var"])
    if head == "deeplabv3":
        assert torch.equal(ours["head.classifier.bias"], theirs["head.block.4.bias"])
        assert torch.equal(ours["head.context.branches.4.conv.0.weight"], theirs["head.aspp.b4.gap.1.weight"])
        assert torch.equal(ours["head.context.branches.2.1.weight"], theirs["head.aspp.b2.block.1.weight"])
        assert torch.equal(ours["head.context.project.0.0.weight"], theirs["head.aspp.project.0.weight"])
    else:
        assert torch.equal(ours["head.context.branches.3.conv.1.bias"], theirs["head.psp.conv4.1.bias"])
    # a checkpoint of another depth is still refused in one line
    wrong = dict(theirs)
    wrong["pretrained.layer4.2.conv1.weight"] = torch.zeros(512, 512, 3, 3)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_weights(create_model(f"seg_{head}_resnet18v1b", num_classes=CLASSES), wrong)


def test_the_authors_imagenet_backbone_file_loads_strictly_and_torchvision_weights_are_refused(tmp_path: Path) -> None:
    backbone = random_state(their_resnet18_backbone("") | {"fc.weight": (1000, 512), "fc.bias": (1000,)})
    torch.save(backbone, tmp_path / "resnet18-imagenet.pth")
    model = create_model("seg_deeplabv3_resnet18v1b", num_classes=CLASSES,
                         backbone_weights=str(tmp_path / "resnet18-imagenet.pth"))
    assert torch.equal(model.backbone.conv2.weight, backbone["conv2.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, backbone["layer4.1.bn2.running_mean"])
    with pytest.raises(ConfigError, match="do not fit the v1b"):
        create_model("seg_pspnet_resnet18v1b", num_classes=CLASSES, pretrained_backbone=True)
    seven = dilated_resnet("resnet18").state_dict()  # torchvision's 7x7-stem layout
    torch.save(seven, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="do not fit this backbone"):
        create_model("seg_deeplabv3_resnet18v1b", num_classes=CLASSES, backbone_weights=str(tmp_path / "tv.pth"))


def test_deep_stem_and_the_cirkd_dilation_pattern() -> None:
    r18 = dilated_resnet("resnet18", style="v1b")
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in (r18.conv1, r18.conv2, r18.conv3)] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    # basic blocks: (first conv, second conv) dilation per block; stage 3 starts (1, 2), stage 4 (2, 4)
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in (*r18.layer3, *r18.layer4)] == [
        (1, 2), (2, 2), (2, 4), (4, 4)]
    assert all(b.conv1.stride == (1, 1) for b in (*r18.layer3, *r18.layer4))
    r50 = dilated_resnet("resnet50", style="v1b")
    assert [b.conv2.dilation[0] for b in r50.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in r50.layer4] == [2, 4, 4]
    c3, c4 = r18.eval()(torch.randn(1, 3, 64, 96))
    assert c3.shape == (1, 256, 8, 12) and c4.shape == (1, 512, 8, 12)  # output stride 8
    seven = dilated_resnet("resnet18")  # the 7x7 stem stays available, its blocks undilated at stage starts
    assert seven.conv1.kernel_size == (7, 7) and not hasattr(seven, "conv3")
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in (*seven.layer3, *seven.layer4)] == [
        (1, 1), (2, 2), (2, 2), (4, 4)]
    with pytest.raises(ConfigError, match="unknown backbone style 'v1c'"):
        dilated_resnet("resnet18", style="v1c")

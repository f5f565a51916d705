"""Detectors by name: real BatchNorm and every layer trainable from scratch, label conventions, per-level taps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from distkd.models import create_model, list_models
from distkd.models.detection import resnet_fpn


def test_detector_names_are_registered() -> None:
    names = set(list_models())
    for family in ("retinanet", "fcos", "fasterrcnn"):
        assert {f"det_{family}_tiny", f"tvdet_{family}_resnet50_fpn", f"tvdet_{family}_resnext101_32x8d_fpn"} <= names
    assert {"tvdet_retinanet_resnet50_fpn_v2", "tvdet_fasterrcnn_resnet50_fpn_v2",
            "tvdet_fasterrcnn_mobilenet_v3_large_fpn"} <= names


@pytest.mark.parametrize("family", ["retinanet", "fasterrcnn"])
def test_from_scratch_fpn_backbones_have_real_batchnorm_and_train_every_layer(family: str) -> None:
    backbone = resnet_fpn("resnet50", family)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == 53
    assert all(p.requires_grad for p in backbone.parameters())
    before = backbone.body.bn1.running_mean.clone()
    backbone.train()(torch.rand(2, 3, 64, 64))
    assert not torch.equal(before, backbone.body.bn1.running_mean)  # normalises with batch statistics


def test_resnext101_teacher_and_kwargs_reach_the_detector() -> None:
    model = create_model("tvdet_retinanet_resnext101_32x8d_fpn", num_classes=5, min_size=64, max_size=96,
                         anchor_sizes=[[16], [32], [64], [128], [256]], anchor_ratios=[1.0])
    assert model.backbone.body.layer1[0].conv2.groups == 32
    authors_teacher = create_model("tvdet_fasterrcnn_resnext101_64x4d_fpn", num_classes=5)
    assert authors_teacher.backbone.body.layer1[0].conv2.groups == 64
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    assert model.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert model.head.classification_head.cls_logits.out_channels == 1 * 5


@pytest.mark.parametrize(("name", "offset", "logits"), [("det_retinanet_tiny", 0, 3 * 7), ("det_fcos_tiny", 0, 7),
                                                         ("det_fasterrcnn_tiny", 1, 8)])
def test_tiny_detectors_train_and_predict_with_their_label_convention(name: str, offset: int, logits: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    assert model.label_offset == offset
    out = (model.roi_heads.box_predictor.cls_score.out_features if offset
           else model.head.classification_head.cls_logits.out_channels)
    assert out == logits
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([6 + offset])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    detections = model.eval()(images)
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4


def test_cls_logits_tap_is_called_once_per_level_with_anchor_class_channels() -> None:
    model = create_model("det_retinanet_tiny", num_classes=4).eval()
    calls = []
    model.get_submodule(model.distill_taps["cls_logits"]).register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model([torch.rand(3, 96, 96)])
    assert calls == [(1, 12, 12, 12), (1, 12, 6, 6), (1, 12, 3, 3), (1, 12, 2, 2)]


@pytest.mark.parametrize("name", ["tvdet_retinanet_resnet50_fpn", "tvdet_fasterrcnn_mobilenet_v3_large_fpn"])
def test_backbone_weights_that_cannot_be_fetched_are_a_one_line_error(name: str, monkeypatch) -> None:  # noqa: ANN001
    import urllib.error

    import torchvision.models._api as api

    from distkd.errors import CheckpointError

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError) as caught:
        create_model(name, num_classes=3, pretrained_backbone=True)
    message = str(caught.value)
    assert "\n" not in message and "cannot fetch torchvision's ImageNet weights" in message
    assert "hub" in message and "model.kwargs.pretrained_backbone=false" in message

"""Segmentation models: output contract, dilated backbones, weight loading, torchvision adapter."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from distkd.errors import CheckpointError, ConfigError, UnknownNameError
from distkd.models import MODELS, create_model
from distkd.models import segmentation as seg
from distkd.models.dilated_resnet import dilated_resnet

OUR_NAMES = [f"seg_{head}_{arch}" for head in ("deeplabv3", "pspnet")
             for arch in ("resnet18", "resnet50", "resnet101", "tiny")]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_segmentation_name_is_registered() -> None:
    for name in OUR_NAMES:
        assert name in MODELS
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        assert f"tvseg_{name}" in MODELS


@pytest.mark.parametrize("name", ["seg_deeplabv3_tiny", "seg_pspnet_tiny"])
def test_tiny_models_return_head_resolution_logits_with_and_without_aux(name: str) -> None:
    x = torch.randn(2, 1, 64, 48)
    out = create_model(name, num_classes=11, in_chans=1)(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 11, 8, 6)
    out = create_model(name, num_classes=5, in_chans=1, aux=False)(x)
    assert set(out) == {"out"} and out["out"].shape == (2, 5, 8, 6)


def test_tiny_student_and_teacher_sizes_fit_the_demo() -> None:
    student = create_model("seg_deeplabv3_tiny", num_classes=11, in_chans=1)
    teacher = create_model("seg_deeplabv3_tiny", num_classes=11, in_chans=1, base_width=16, layers=(2, 2, 2, 2))
    assert 10_000 <= n_params(student) <= 50_000
    assert 500_000 <= n_params(teacher) <= 2_000_000


@pytest.mark.parametrize("name", ["seg_deeplabv3_resnet18", "seg_pspnet_resnet18"])
def test_resnet18_models_follow_the_output_contract_and_paper_head_widths(name: str) -> None:
    model = create_model(name, num_classes=19).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["out"].shape == out["aux"].shape == (1, 19, 8, 12)
    assert model.head.classifier.in_channels == 128  # head width on a 512-channel trunk
    assert model.aux_head.classifier.in_channels == 64  # FCN aux head: stage-3 channels / 4
    assert 12e6 < n_params(model) < 14e6


def test_aspp_rates_and_psp_bins_match_the_reference_heads() -> None:
    deeplab = create_model("seg_deeplabv3_resnet18", num_classes=3)
    assert [b[0].dilation[0] for b in deeplab.head.context.branches[1:4]] == [12, 24, 36]
    tiny = create_model("seg_deeplabv3_tiny", num_classes=3)
    assert [b[0].dilation[0] for b in tiny.head.context.branches[1:4]] == [1, 2, 3]
    psp = create_model("seg_pspnet_tiny", num_classes=3)
    assert [b.pool.output_size for b in psp.head.context.branches] == [1, 2, 3, 6]


def test_dilated_bottleneck_trunk_equals_torchvision_dilated_resnet50() -> None:
    ours = dilated_resnet("resnet50").eval()
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    missing = ours.load_state_dict(ref.state_dict(), strict=False)
    assert missing.missing_keys == [] and set(missing.unexpected_keys) == {"fc.weight", "fc.bias"}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        c3, c4 = ours(x)
        body = torch.nn.Sequential(*list(ref.children())[:-2])
        torch.testing.assert_close(c4, body(x))
        assert c3.shape == (1, 1024, 4, 4)


def test_basic_block_trunk_keeps_output_stride_8_and_torchvision_keys() -> None:
    ours = dilated_resnet("resnet18")
    keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(ours.state_dict()) == keys
    dilations = [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in (*ours.layer3, *ours.layer4)]
    assert dilations == [(1, 1), (2, 2), (2, 2), (4, 4)]
    c3, c4 = ours(torch.randn(1, 3, 40, 40))
    assert c3.shape == (1, 256, 5, 5) and c4.shape == (1, 512, 5, 5)


def test_backbone_weights_file_loads_strictly_and_adapts_the_stem(tmp_path) -> None:
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = create_model("seg_pspnet_resnet18", num_classes=4, in_chans=1, backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.save({"state_dict": ref.state_dict()}, path)
    wrapped = create_model("seg_deeplabv3_resnet18", num_classes=4, backbone_weights=str(path))
    torch.testing.assert_close(wrapped.backbone.conv1.weight, ref.conv1.weight)


def test_bad_backbone_weights_raise_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("seg_deeplabv3_resnet18", num_classes=4, backbone_weights=str(tmp_path / "nope.pth"))
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit") as info:
        create_model("seg_deeplabv3_resnet18", num_classes=4, backbone_weights=str(path))
    assert "\n" not in str(info.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_model("seg_deeplabv3_resnet18", num_classes=4, backbone_weights=str(tmp_path / "junk.pth"))


def test_pretrained_backbone_offline_suggests_backbone_weights(monkeypatch, tmp_path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="backbone_weights: PATH") as info:
        create_model("seg_deeplabv3_resnet18", num_classes=4, pretrained_backbone=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="narrow"):
        create_model("seg_pspnet_tiny", num_classes=4, pretrained_backbone=True)


def test_tvseg_models_return_input_resolution_and_adapt_channels() -> None:
    model = create_model("tvseg_deeplabv3_mobilenet_v3_large", num_classes=6, in_chans=1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert out["out"].shape == out["aux"].shape == (1, 6, 64, 64)
    model = create_model("tvseg_lraspp_mobilenet_v3_large", num_classes=6, aux=False).eval()
    with torch.no_grad():
        assert set(model(torch.randn(1, 3, 64, 64))) == {"out"}
    with pytest.raises(ConfigError, match="aux: false"):
        create_model("tvseg_lraspp_mobilenet_v3_large", num_classes=6, aux=True)
    with pytest.raises(UnknownNameError, match="deeplabv3_resnet50"):
        seg.tvseg_model("deeplabv3_resnet5", num_classes=6)


def test_tiny_model_fits_a_batch_when_trained() -> None:
    torch.manual_seed(0)
    model = create_model("seg_deeplabv3_tiny", num_classes=3, in_chans=1, aux=True)
    x = torch.randn(4, 1, 32, 32)
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.2).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        out = model(x)
        return sum(F.cross_entropy(F.interpolate(v, size=(32, 32), mode="bilinear"), y) for v in out.values())

    first = float(loss_fn().detach())
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert float(loss_fn().detach()) < 0.8 * first


@pytest.mark.parametrize("stride", [4, 2])
def test_smaller_output_strides_keep_parameters_and_raise_resolution(stride: int) -> None:
    base = create_model("seg_pspnet_tiny", num_classes=3, in_chans=1)
    fine = create_model("seg_pspnet_tiny", num_classes=3, in_chans=1, output_stride=stride)
    fine.load_state_dict(base.state_dict())  # same keys and shapes
    out = fine(torch.randn(2, 1, 32, 32))
    assert out["out"].shape == out["aux"].shape == (2, 3, 32 // stride, 32 // stride)
    with pytest.raises(ConfigError, match="output_stride"):
        create_model("seg_pspnet_tiny", num_classes=3, output_stride=16)


def test_aspp_rates_are_configurable() -> None:
    model = create_model("seg_deeplabv3_tiny", num_classes=3, aspp_rates=(2, 4, 6))
    assert [b[0].dilation[0] for b in model.head.context.branches[1:4]] == [2, 4, 6]
    assert model(torch.randn(2, 3, 32, 32))["out"].shape == (2, 3, 4, 4)


def test_unknown_head_or_backbone_names_raise_unknown_name_errors() -> None:
    with pytest.raises(UnknownNameError, match="deeplabv3, pspnet"):
        seg.build_segmentation_net("fcn", "resnet18", num_classes=3)
    with pytest.raises(UnknownNameError, match="resnet101"):
        seg.build_segmentation_net("pspnet", "resnet7", num_classes=3)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("seg_pspnet_tiny", num_classes=0)

"""timm_/tv_ adapters (offline: hub caches point at tmp_path), input_stats, and MobileNet-V1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from distkd.errors import CheckpointError, ConfigError, UnknownNameError
from distkd.models import create_model
from distkd.models.adapters import IMAGENET_MEAN, IMAGENET_STD, input_stats

HUB_REVISION = "0" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No network and empty hub caches under ``tmp_path`` (huggingface_hub reads its env at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits_of(model: nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["timm_resnet18", "tv_resnet18"])
def test_hub_model_is_created_with_given_classes(name: str) -> None:
    model = create_model(name, num_classes=7)
    assert logits_of(model).shape == (2, 7)
    assert model.distkd_name == name


@pytest.mark.parametrize("name", ["timm_resnet18", "tv_resnet18"])
def test_local_weights_file_loads_strictly(name: str, tmp_path: Path) -> None:
    source = create_model(name, num_classes=5)
    path = tmp_path / "local.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    assert same_weights(source, create_model(name, num_classes=5, weights=path))


def test_local_weights_for_another_head_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "local.pth"
    torch.save(create_model("tv_resnet18", num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"fc\.weight: checkpoint \[5, 512\] vs model \[9, 512\]"):
        create_model("tv_resnet18", num_classes=9, weights=path)


@pytest.mark.parametrize("name", ["timm_resnet18", "tv_resnet18"])
def test_pretrained_offline_suggests_a_local_file(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(CheckpointError, match=rf"cannot fetch the pretrained weights of '{name}'.*weights: PATH"):
        create_model(name, num_classes=10, pretrained=True)


def test_timm_pretrained_from_hub_cache_resets_a_different_head(tmp_path: Path) -> None:
    hub = timm.create_model("resnet18")
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_REVISION)
    (repo / "snapshots" / HUB_REVISION).mkdir(parents=True)
    save_file(hub.state_dict(), str(repo / "snapshots" / HUB_REVISION / "model.safetensors"))
    model = create_model("timm_resnet18", num_classes=10, pretrained=True)
    assert torch.equal(model.conv1.weight, hub.conv1.weight)
    assert model.fc.out_features == 10


def test_tv_pretrained_from_hub_cache_replaces_the_final_layer(tmp_path: Path) -> None:
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    hub = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(hub.state_dict(), cache / Path(weights.url).name)
    full = create_model("tv_resnet18", num_classes=1000, pretrained=True)
    assert same_weights(full, hub)
    resized = create_model("tv_resnet18", num_classes=10, pretrained=True)
    assert torch.equal(resized.layer4[1].conv2.weight, hub.layer4[1].conv2.weight)
    assert (resized.fc.in_features, resized.fc.out_features) == (512, 10)
    assert logits_of(resized).shape == (2, 10)


def test_pretrained_and_weights_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either pretrained=True or weights=PATH"):
        create_model("timm_resnet18", num_classes=10, pretrained=True, weights=tmp_path / "w.pth")


@pytest.mark.parametrize(("name", "hint"), [("timm_resnet181", "resnet18"), ("tv_resnt18", "resnet18")])
def test_unknown_hub_name_suggests_a_close_one(name: str, hint: str) -> None:
    with pytest.raises(UnknownNameError, match=rf"did you mean '{hint}'\?"):
        create_model(name, num_classes=10)


def test_unknown_constructor_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not accept these arguments"):
        create_model("tv_resnet18", num_classes=10, not_an_option=3)


def test_input_stats_by_model_kind() -> None:
    timm_model = create_model("timm_resnet18", num_classes=3)
    cfg = timm_model.pretrained_cfg
    assert input_stats(timm_model) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert input_stats(create_model("tv_resnet18", num_classes=3)) == (IMAGENET_MEAN, IMAGENET_STD)
    assert input_stats(create_model("cifar_resnet8", num_classes=3)) is None


def test_timm_stats_follow_the_pretrained_config() -> None:
    model = create_model("timm_vit_tiny_patch16_224", num_classes=3)
    assert input_stats(model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_mobilenetv1_has_standard_size_and_reference_keys() -> None:
    model = create_model("mobilenetv1", num_classes=1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 4) == 4.2320
    keys = model.state_dict()
    assert {"model.0.0.weight", "model.1.0.weight", "model.13.3.weight", "model.13.4.running_var"} <= keys.keys()
    assert keys["fc.weight"].shape == (1000, 1024)
    assert logits_of(model, size=64).shape == (2, 1000)

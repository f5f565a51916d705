"""The CIFAR-100 zoo: reference parameter counts, logits shape, hookable stages, reference key names."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import pytest
import torch
from torch import nn

from distkd.models import create_model, list_models
from distkd.models.weights import WRAPPER_KEYS, load_weights

ZOO = [
    "cifar_resnet8", "cifar_resnet14", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
    "cifar_resnet56", "cifar_resnet110", "cifar_resnet8x4", "cifar_resnet32x4",
    "cifar_wrn_16_1", "cifar_wrn_16_2", "cifar_wrn_40_1", "cifar_wrn_40_2",
    "cifar_vgg8", "cifar_vgg11", "cifar_vgg13", "cifar_vgg16", "cifar_vgg19",
    "cifar_mobilenetv2", "cifar_mobile_half", "cifar_shufflev1", "cifar_shufflev2", "cifar_resnet50",
]  # fmt: skip

# Millions of parameters with 100 classes, as reported for the CRD/RepDistiller definitions.
PARAMS_M = {
    "cifar_resnet20": 0.2783, "cifar_resnet56": 0.8616, "cifar_resnet110": 1.7366,
    "cifar_resnet8x4": 1.2335, "cifar_resnet32x4": 7.4339, "cifar_wrn_40_1": 0.5698,
    "cifar_wrn_40_2": 2.2552, "cifar_wrn_16_2": 0.7033, "cifar_vgg8": 3.9650, "cifar_vgg13": 9.4622,
    "cifar_mobilenetv2": 0.8128, "cifar_shufflev1": 0.9493, "cifar_shufflev2": 1.3555,
    "cifar_resnet50": 23.7053,
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny CPU forwards run fastest on one thread, especially on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    zoo_model.cache_clear()


@cache
def zoo_model(name: str) -> nn.Module:
    """One shared eval-mode instance per name (the tests below only read it)."""
    torch.manual_seed(0)
    return create_model(name, num_classes=100).eval()


def test_every_zoo_name_is_registered() -> None:
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_parameter_count_matches_reference(name: str) -> None:
    count = sum(p.numel() for p in zoo_model(name).parameters())
    assert round(count / 1e6, 4) == PARAMS_M[name]


@pytest.mark.parametrize("name", ZOO)
def test_forward_gives_logits_for_each_class(name: str) -> None:
    with torch.no_grad():
        logits = zoo_model(name)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert torch.isfinite(logits).all()


def test_num_classes_sets_the_output_width() -> None:
    model = create_model("cifar_resnet8", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize(
    ("name", "path", "shape"),
    [
        ("cifar_resnet56", "layer3", (2, 64, 8, 8)),
        ("cifar_resnet32x4", "layer2", (2, 128, 16, 16)),
        ("cifar_resnet50", "layer4", (2, 2048, 4, 4)),
        ("cifar_wrn_40_2", "block3", (2, 128, 8, 8)),
        ("cifar_vgg13", "block4", (2, 512, 4, 4)),
        ("cifar_mobilenetv2", "blocks.6", (2, 160, 2, 2)),
        ("cifar_shufflev1", "layer3", (2, 960, 4, 4)),
        ("cifar_shufflev2", "layer3", (2, 464, 4, 4)),
    ],
)
def test_stage_outputs_can_be_tapped_by_module_path(name: str, path: str, shape: tuple[int, ...]) -> None:
    model = zoo_model(name)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == shape


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("cifar_resnet8x4", "layer1.0.downsample.1.running_var"),
        ("cifar_resnet110", "layer3.17.bn2.weight"),
        ("cifar_wrn_40_2", "block1.layer.0.convShortcut.weight"),
        ("cifar_wrn_40_1", "block3.layer.5.conv2.weight"),
        ("cifar_vgg8", "block0.1.running_mean"),
        ("cifar_vgg13", "block1.3.bias"),
        ("cifar_mobilenetv2", "blocks.6.0.conv.7.weight"),
        ("cifar_mobilenetv2", "classifier.0.weight"),
        ("cifar_shufflev1", "layer2.7.conv3.weight"),
        ("cifar_shufflev2", "layer1.0.conv5.weight"),
        ("cifar_resnet50", "layer1.0.shortcut.0.weight"),
        ("cifar_resnet50", "linear.bias"),
    ],
)
def test_state_dict_uses_reference_key_names(name: str, key: str) -> None:
    assert key in zoo_model(name).state_dict()


@pytest.mark.parametrize("index_name", list(enumerate(ZOO)), ids=ZOO)
def test_saved_state_dict_loads_strictly_into_a_fresh_instance(index_name: tuple[int, str]) -> None:
    index, name = index_name
    wrapper = WRAPPER_KEYS[index % len(WRAPPER_KEYS)]
    saved = {key: value.clone() for key, value in zoo_model(name).state_dict().items()}
    fresh = create_model(name, num_classes=100)
    load_weights(fresh, {wrapper: saved, "epoch": 240}, strict=True)
    loaded = fresh.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)

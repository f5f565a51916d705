"""The BatchNorm a zoo model declares before each pre-ReLU tap (``distill_preact_bn``, the authors'
``get_bn_before_relu``), and OFD's margins read from it through the Distiller's shape probe."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distkd.data.batch import Batch
from distkd.distill import Distiller
from distkd.distill.distiller import Term
from distkd.distill.taps import FeatureTaps, preact_batchnorm
from distkd.losses import build_loss
from distkd.models import create_model

DECLARING = ["cifar_resnet8", "cifar_resnet8x4", "cifar_resnet50", "cifar_wrn_16_2", "cifar_vgg8", "cifar_vgg13"]
EXPECTED = {  # the authors' choice (mdistiller/overhaul-distillation get_bn_before_relu), spelled out per family
    "cifar_resnet8": ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"],
    "cifar_wrn_16_2": ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"],
    "cifar_vgg13": ["block1.4", "block2.4", "block3.4", "block4.4"],
}


@pytest.mark.parametrize("name", DECLARING)
def test_each_declared_batchnorm_normalises_its_taps_channels(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    declared = model.distill_preact_bn
    assert sorted(declared) == sorted(k for k in model.distill_taps if k.endswith("_preact"))
    taps = FeatureTaps(model, list(declared), "the model")
    with taps.recording(), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        for key, path in declared.items():
            bn = preact_batchnorm(model, key)
            assert isinstance(bn, nn.BatchNorm2d) and bn is model.get_submodule(path)
            assert bn.num_features == taps.outputs[key][0].shape[1]
            assert preact_batchnorm(model, model.distill_taps[key]) is bn  # by module path too
    if name in EXPECTED:
        assert [declared[f"stage{k}_preact"] for k in range(1, len(EXPECTED[name]) + 1)] == EXPECTED[name]


def test_models_without_a_declaration_give_none() -> None:
    model = create_model("cifar_mobile_half", num_classes=10)
    assert preact_batchnorm(model, "stage1_preact") is None


def _reference_margin(beta: float, gamma: float) -> float:
    """E[x | x < 0] for x ~ N(beta, gamma^2), -3|gamma| when P(x < 0) <= 0.001 (the authors' get_margin)."""
    s, m = abs(gamma), beta
    below = 0.5 * math.erfc(m / s / math.sqrt(2))
    if below <= 0.001:
        return -3 * s
    return m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below


def test_ofd_margins_come_from_the_teachers_batchnorms_through_the_probe() -> None:
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", num_classes=10)
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial affine parameters, some channels far from zero
            module.weight.data = torch.randn_like(module.weight) * 2
            module.bias.data = torch.randn_like(module.bias) * 3
    keys = ["stage1_preact", "stage2_preact", "stage3_preact"]
    term = Term("ofd", build_loss("ofd"), 1.0, keys, keys)
    distiller = Distiller(create_model("cifar_resnet8", num_classes=10), teacher, [term])
    distiller.probe(Batch(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)))
    levels = distiller.term_losses[0][0].levels
    for level, key in zip(levels, keys, strict=True):
        bn = teacher.get_submodule(teacher.distill_preact_bn[key])
        expected = [_reference_margin(b, g) for b, g in zip(bn.bias.tolist(), bn.weight.tolist(), strict=True)]
        torch.testing.assert_close(level.margin.double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-6)

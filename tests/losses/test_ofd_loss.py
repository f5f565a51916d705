"""OFD: margins from BatchNorm parameters or batch statistics, and the partial L2 loss, against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

import distkd.losses.ofd  # noqa: F401  (registers "ofd")
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def expected_margin(mean: float, std: float) -> float:
    """The authors' ``get_margin_from_BN`` for one channel, with Phi from math.erfc."""
    s, m = abs(std), mean
    below = 0.5 * math.erfc((m / s) / math.sqrt(2))  # Phi(-m / s)
    if below > 0.001:
        return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below + m
    return -3 * s


def conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free convolution with 'same' zero padding (odd kernel), as a sum of shifted 1x1 products."""
    k = weight.shape[-1]
    h, w = x.shape[2:]
    x = torch.nn.functional.pad(x, ((k - 1) // 2,) * 4)
    return sum(torch.einsum("oc,nchw->nohw", weight[:, :, i, j], x[:, :, i:i + h, j:j + w])
               for i in range(k) for j in range(k))


def batch_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(dim=(3, 5))


def partial_l2(source: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
    keep = ((source > target) | (target > 0)).double()
    return ((source - target) ** 2 * keep).sum() / source.shape[0]


def test_margins_from_the_teachers_batchnorm_follow_the_authors_formula() -> None:
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 2.0, 1.0]))  # a negative gamma counts by its absolute value
        bn.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 5.0]))  # the last: P(x < 0) <= 0.001 -> -3 sigma
    student, teacher = seeded((3, 2, 4, 4), 0), seeded((3, 4, 4, 4), 1)
    loss = build_loss("ofd")
    loss.probe(student, teacher, teacher_bn=bn, target=None)
    got = loss.state_dict()["levels.0.margin"].double()
    want = torch.tensor([expected_margin(m, s) for m, s in zip(bn.bias.tolist(), bn.weight.tolist(), strict=True)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert want[3] == -3.0 and bool((want < 0).all())


def test_without_teacher_bn_the_margins_come_from_the_probe_batchs_channel_statistics() -> None:
    student, teacher = seeded((6, 2, 4, 4), 0), seeded((6, 3, 4, 4), 1) * 0.7 + 0.2
    loss = build_loss("ofd")
    loss.probe([student], [teacher])
    want = []
    for c in range(3):
        values = teacher[:, c].reshape(-1).tolist()
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        want.append(expected_margin(mean, std))
    torch.testing.assert_close(loss.state_dict()["levels.0.margin"].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-6, atol=1e-7)


def test_the_connector_starts_as_the_authors_he_normal_conv_and_unit_batchnorm() -> None:
    loss = build_loss("ofd")
    torch.manual_seed(0)
    loss.probe(torch.randn(2, 64, 2, 2), torch.randn(2, 32, 2, 2))
    conv_layer, bn = loss.levels[0].connector
    assert conv_layer.bias is None and conv_layer.kernel_size == (1, 1)
    assert abs(conv_layer.weight.std().item() - math.sqrt(2 / 32)) < 0.02
    assert bool((bn.weight == 1).all()) and bool((bn.bias == 0).all())


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_ofd_equals_the_float64_partial_l2_with_level_weights_and_pooled_teacher(kernel_size) -> None:
    student = [seeded((5, 3, 8, 8), 0), seeded((5, 4, 4, 4), 1)]
    teacher = [seeded((5, 5, 16, 16), 2), seeded((5, 6, 4, 4), 3)]
    loss = build_loss("ofd", kernel_size=kernel_size)
    loss.probe(student, teacher)
    loss.double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        for level in loss.levels:
            level.margin.copy_(-torch.rand(level.margin.shape, generator=gen, dtype=torch.float64))
    sd = loss.state_dict()
    value, parts = loss(student, teacher, return_parts=True)
    expected = []
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        source = batch_norm(conv(s, sd[f"levels.{i}.connector.0.weight"]), sd[f"levels.{i}.connector.1.weight"],
                            sd[f"levels.{i}.connector.1.bias"])
        pooled = block_mean(t, source.shape[2]) if t.shape[2] != source.shape[2] else t
        expected.append(partial_l2(source, pooled, sd[f"levels.{i}.margin"]) / 2 ** (1 - i))
    torch.testing.assert_close(value, sum(expected), rtol=1e-10, atol=1e-10)
    for i, e in enumerate(expected):
        torch.testing.assert_close(parts[f"level{i}"], e, rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_student_and_the_connector_never_the_teacher() -> None:
    student = seeded((4, 3, 4, 4), 0).float().requires_grad_()
    teacher = seeded((4, 5, 4, 4), 1).float().requires_grad_()
    loss = build_loss("ofd")
    loss.probe(student.detach(), teacher.detach())
    value, parts = loss(student, teacher, return_parts=True)
    value.backward()
    assert parts == {} and teacher.grad is None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert [name for name, _ in loss.named_buffers() if name.endswith("margin")] == ["levels.0.margin"]


def test_half_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = seeded((4, 3, 4, 4), 0).half(), seeded((4, 5, 4, 4), 1).half()
    loss = build_loss("ofd")
    loss.probe(student, teacher)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(student.float(), teacher.float()))


def test_ofd_errors_are_one_line() -> None:
    loss = build_loss("ofd")
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match=r"teacher_bn has 3 channels but the teacher's map is \(2, 4, 4, 4\)") as err:
        loss.probe(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4), teacher_bn=torch.nn.BatchNorm2d(3))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="must be 2 affine BatchNorm module"):
        loss.probe([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 4, 4, 4)] * 2, teacher_bn=torch.nn.BatchNorm2d(4))
    for bad in (0, 1.5, True, "1"):
        with pytest.raises(ConfigError) as err:
            build_loss("ofd", kernel_size=bad)
        assert "\n" not in str(err.value)

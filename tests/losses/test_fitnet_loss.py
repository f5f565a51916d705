"""FitNet: the hint loss against a float64 re-computation, the regressor RepDistiller builds for each shape pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from distkd.errors import ShapeError
from distkd.losses import build_loss


def reference_hint(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                   transposed: bool, stride: int, padding: int) -> Tensor:
    """``mean((relu(bn(conv(f_s))) - f_t) ** 2)`` in float64, BN with the batch's biased statistics (training)."""
    s, t = student.double(), teacher.double()
    conv = F.conv_transpose2d if transposed else F.conv2d
    z = conv(s, weight.double(), bias.double(), stride=stride, padding=padding)
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    z = (z - mean) / torch.sqrt(var + 1e-5) * gamma.double().view(1, -1, 1, 1) + beta.double().view(1, -1, 1, 1)
    return ((z.clamp(min=0) - t) ** 2).mean()


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "transposed", "stride", "padding", "kernel"),
    [
        ((6, 4, 8, 8), (6, 12, 8, 8), False, 1, 0, (1, 1)),  # equal sizes: a 1x1 conv
        ((6, 4, 8, 8), (6, 12, 4, 4), False, 2, 1, (3, 3)),  # twice the teacher's size: 3x3, stride 2
        ((6, 4, 4, 4), (6, 12, 8, 8), True, 2, 1, (4, 4)),  # half: 4x4 transposed conv, stride 2
        ((6, 4, 9, 7), (6, 12, 8, 5), False, 1, 0, (2, 3)),  # larger by a few: a valid conv that shrinks
    ],
)
def test_hint_loss_equals_the_float64_formula_with_repdistillers_regressor(
    student_shape, teacher_shape, transposed, stride, padding, kernel
) -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(*student_shape, generator=gen), torch.randn(*teacher_shape, generator=gen).relu()
    loss = build_loss("fitnet")
    torch.manual_seed(1)
    loss.probe(student, teacher)
    conv, bn = loss.regressor.conv, loss.regressor.bn
    assert isinstance(conv, torch.nn.ConvTranspose2d) == transposed and conv.kernel_size == kernel
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.2, 0.2, generator=gen)
    value, parts = loss(student, teacher, return_parts=True)
    expected = reference_hint(student, teacher, conv.weight, conv.bias, bn.weight, bn.bias, transposed,
                              stride, padding)
    assert parts == {}
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_regressor_learns_and_the_teacher_gets_no_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(8, 3, 6, 6, generator=gen, requires_grad=True)
    teacher = torch.randn(8, 5, 6, 6, generator=gen, requires_grad=True)
    loss = build_loss("fitnet")
    loss.probe(student.detach(), teacher.detach())
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_fitnet_used_before_its_probe_or_on_vectors_is_a_one_line_error() -> None:
    loss = build_loss("fitnet")
    with pytest.raises(ShapeError, match="sized by a shape probe"):
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match=r"the student's is \(2, 3\): tap a convolutional layer"):
        loss.probe(torch.randn(2, 3), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match="cannot map a student feature map of 3x3 to the teacher's 8x8"):
        loss.probe(torch.randn(2, 3, 3, 3), torch.randn(2, 3, 8, 8))

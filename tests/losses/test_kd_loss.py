"""KD against a float64 loop re-computation, gradients, masks and errors."""

from __future__ import annotations

import pytest
import torch
from loss_inputs import logits, random_mask
from losses_reference import kd_loss

from distkd.errors import ConfigError, ShapeError
from distkd.losses import KD, build_loss


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_loop_reference(shape, masked, tau):
    student, teacher = logits(shape, 0), logits(shape, 1)
    mask = random_mask(shape, 2) if masked else None
    loss, parts = KD(tau=tau)(student, teacher, mask=mask, return_parts=True)
    expected = kd_loss(student, teacher, tau=tau, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert parts["kl"].item() == pytest.approx(expected / tau**2, rel=1e-10, abs=1e-14)


def test_kd_gradcheck_dense_with_mask():
    shape = (2, 4, 3, 2)
    student = logits(shape, 3).requires_grad_()
    teacher, mask = logits(shape, 4), random_mask(shape, 5)
    assert torch.autograd.gradcheck(lambda s: KD(tau=2.0)(s, teacher, mask=mask), (student,))


def test_kd_is_zero_for_equal_logits_and_teacher_gets_no_gradient():
    student = logits((5, 7), 6).requires_grad_()
    teacher = student.detach().clone().requires_grad_()
    loss = KD()(student, teacher)
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert teacher.grad is None


def test_kd_half_precision_is_computed_in_float32():
    student, teacher = logits((8, 6), 7, dtype=torch.bfloat16), logits((8, 6), 8, dtype=torch.bfloat16)
    loss = KD()(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(KD()(student.float(), teacher.float()).item(), rel=1e-6)


def test_kd_masked_positions_change_neither_value_nor_gradient():
    shape = (2, 3, 4)
    mask = random_mask(shape, 9)
    dropped = ~mask[:, None].expand(shape)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = KD()(student, teacher, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(logits(shape, 10), logits(shape, 11))
    changed = value_and_grad(
        logits(shape, 10).masked_fill(dropped, float("nan")), logits(shape, 11).masked_fill(dropped, 1e4)
    )
    assert torch.equal(value, changed[0]) and torch.equal(grad, changed[1])
    assert torch.count_nonzero(grad[dropped]) == 0


def test_kd_mask_keeping_nothing_gives_zero():
    student = logits((2, 3, 4), 12).requires_grad_()
    loss = KD()(student, logits((2, 3, 4), 13), mask=torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_kd_built_by_name_and_validated():
    assert build_loss("kd", tau=2).tau == 2.0
    with pytest.raises(ConfigError, match="tau"):
        KD(tau=0.0)
    with pytest.raises(ShapeError, match=r"\(4, 5\).*\(4, 3\)"):
        KD()(torch.zeros(4, 5), torch.zeros(4, 3))

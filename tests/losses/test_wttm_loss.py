"""WTTM against a float64 loop re-computation, its special cases, masks, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch
from loss_inputs import logits, random_mask
from losses_reference import instances, softmax

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.kd import KD
from distkd.losses.wttm import WTTM


def wttm_terms(student, teacher, *, gamma, mask=None) -> tuple[float, float, float]:
    """(mean U * KL, mean KL, mean U) over the kept instances, U = sum_j p_t[j]**gamma; zeros when none."""
    rows_s, rows_t = instances(student, mask), instances(teacher, mask)
    if not rows_s:
        return 0.0, 0.0, 0.0
    weighted = divergence = weight = 0.0
    for s, t in zip(rows_s, rows_t, strict=True):
        p_s = softmax(s, 1.0)
        powered = [p**gamma for p in softmax(t, 1.0)]
        u = sum(powered)
        q_t = [p / u for p in powered]
        kl = sum(q * (math.log(q) - math.log(p)) for q, p in zip(q_t, p_s, strict=True))
        weighted += u * kl
        divergence += kl
        weight += u
    n = len(rows_s)
    return weighted / n, divergence / n, weight / n


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 2, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("gamma", [0.2, 0.5, 1.7])
def test_wttm_matches_loop_reference(shape, masked, gamma):
    student, teacher = logits(shape, 0), logits(shape, 1)
    mask = random_mask(shape, 2) if masked else None
    loss, parts = WTTM(gamma=gamma)(student, teacher, mask=mask, target=None, return_parts=True)
    weighted, divergence, weight = wttm_terms(student, teacher, gamma=gamma, mask=mask)
    assert loss.item() == pytest.approx(weighted, rel=1e-10, abs=1e-14)
    assert parts["kl"].item() == pytest.approx(divergence, rel=1e-10, abs=1e-14)
    assert parts["weight"].item() == pytest.approx(weight, rel=1e-10, abs=1e-14)


def test_wttm_with_gamma_one_is_kd_at_temperature_one():
    student, teacher = logits((7, 6), 3), logits((7, 6), 4)
    _, parts = WTTM(gamma=1.0)(student, teacher, return_parts=True)
    assert parts["weight"].item() == pytest.approx(1.0, rel=1e-14)
    torch.testing.assert_close(WTTM(gamma=1.0)(student, teacher), KD(tau=1.0)(student, teacher), rtol=1e-12, atol=0)


def test_wttm_weight_grows_with_the_teacher_smoothness():
    student = logits((1, 5), 5)
    sharp, flat = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    _, sharp_parts = WTTM(gamma=0.3)(student, sharp, return_parts=True)
    _, flat_parts = WTTM(gamma=0.3)(student, flat, return_parts=True)
    assert 1.0 < sharp_parts["weight"].item() < flat_parts["weight"].item() <= 5**0.7


def test_wttm_gradcheck_dense_with_mask():
    shape = (2, 4, 3, 2)
    student = logits(shape, 6).requires_grad_()
    teacher, mask = logits(shape, 7), random_mask(shape, 8)
    assert torch.autograd.gradcheck(lambda s: WTTM(gamma=0.3)(s, teacher, mask=mask), (student,))


def test_wttm_teacher_gets_no_gradient_and_half_precision_runs_in_float32():
    student, teacher = logits((5, 7), 9).requires_grad_(), logits((5, 7), 10).requires_grad_()
    WTTM()(student, teacher, epoch=3).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    s16, t16 = logits((8, 6), 11, dtype=torch.bfloat16), logits((8, 6), 12, dtype=torch.bfloat16)
    value = WTTM()(s16, t16)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(WTTM()(s16.float(), t16.float()).item(), rel=1e-6)


def test_wttm_masked_positions_change_neither_value_nor_gradient():
    shape = (2, 3, 4)
    mask = random_mask(shape, 13)
    dropped = ~mask[:, None].expand(shape)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = WTTM()(student, teacher, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(logits(shape, 14), logits(shape, 15))
    changed = value_and_grad(
        logits(shape, 14).masked_fill(dropped, float("nan")), logits(shape, 15).masked_fill(dropped, 1e4)
    )
    assert torch.equal(value, changed[0]) and torch.equal(grad, changed[1])
    assert torch.count_nonzero(grad[dropped]) == 0


def test_wttm_mask_keeping_nothing_gives_zero():
    student = logits((2, 3, 4), 16).requires_grad_()
    loss = WTTM()(student, logits((2, 3, 4), 17), mask=torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_wttm_built_by_name_with_the_readme_exponent():
    assert LOSSES.build("wttm").gamma == 0.2


@pytest.mark.parametrize("gamma", [0, -0.5, float("inf"), "0.2", True])
def test_wttm_invalid_configuration_is_a_one_line_config_error(gamma):
    with pytest.raises(ConfigError, match="gamma") as error:
        WTTM(gamma=gamma)
    assert "\n" not in str(error.value)


def test_wttm_shape_errors():
    with pytest.raises(ShapeError, match=r"\(4, 5\).*\(4, 3\)"):
        WTTM()(logits((4, 5), 18), logits((4, 3), 19))

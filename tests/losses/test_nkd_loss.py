"""NKD against a float64 loop re-computation, targets, masks, gradients and errors."""

from __future__ import annotations

import math

import pytest
import torch
from loss_inputs import labels, logits, random_mask
from losses_reference import instances, softmax, targets_of

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.nkd import NKD


def nkd_terms(student, teacher, target, *, tau, mask=None) -> tuple[float, float]:
    """(mean target term, mean non-target cross-entropy) over the kept instances; (0, 0) when none."""
    rows_s, rows_t = instances(student, mask), instances(teacher, mask)
    gts = targets_of(target, mask)
    if not rows_s:
        return 0.0, 0.0
    target_sum = non_target_sum = 0.0
    for s, t, g in zip(rows_s, rows_t, gts, strict=True):
        target_sum += -softmax(t, 1.0)[g] * math.log(softmax(s, 1.0)[g])
        q_s = softmax([v for j, v in enumerate(s) if j != g], tau)
        q_t = softmax([v for j, v in enumerate(t) if j != g], tau)
        non_target_sum += -sum(a * math.log(b) for a, b in zip(q_t, q_s, strict=True))
    return target_sum / len(rows_s), non_target_sum / len(rows_s)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 2, 2), (5, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"tau": 3.0, "gamma": 3.5}])
def test_nkd_matches_loop_reference(shape, masked, kwargs):
    student, teacher = logits(shape, 0), logits(shape, 1)
    target = labels(shape, shape[1], 2)
    mask = random_mask(shape, 3) if masked else None
    if masked:
        target = target.masked_fill(~mask, 255)
    module = NKD(**kwargs)
    loss, parts = module(student, teacher, target=target, mask=mask, epoch=4, return_parts=True)
    target_part, non_target = nkd_terms(student, teacher, target, tau=module.tau, mask=mask)
    assert loss.item() == pytest.approx(target_part + module.gamma * module.tau**2 * non_target, rel=1e-10, abs=1e-14)
    assert parts["target"].item() == pytest.approx(target_part, rel=1e-10, abs=1e-14)
    assert parts["non_target"].item() == pytest.approx(non_target, rel=1e-10, abs=1e-14)


def test_nkd_with_two_classes_has_no_non_target_term():
    student, teacher, target = logits((5, 2), 4), logits((5, 2), 5), labels((5, 2), 2, 6)
    loss, parts = NKD(tau=2.0, gamma=3.0)(student, teacher, target=target, return_parts=True)
    assert parts["non_target"].item() == 0.0
    assert loss.item() == pytest.approx(nkd_terms(student, teacher, target, tau=2.0)[0], rel=1e-10)


def test_nkd_gradcheck_dense_with_mask():
    shape = (2, 4, 3, 2)
    student = logits(shape, 7).requires_grad_()
    teacher, target, mask = logits(shape, 8), labels(shape, 4, 9), random_mask(shape, 10)
    loss = NKD(tau=2.0, gamma=1.5)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, target=target, mask=mask), (student,))


def test_nkd_teacher_gets_no_gradient_and_half_precision_runs_in_float32():
    student, teacher = logits((5, 7), 11).requires_grad_(), logits((5, 7), 12).requires_grad_()
    target = labels((5, 7), 7, 13)
    NKD()(student, teacher, target=target).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    s16, t16 = logits((8, 6), 14, dtype=torch.bfloat16), logits((8, 6), 15, dtype=torch.bfloat16)
    target = labels((8, 6), 6, 16)
    value = NKD()(s16, t16, target=target)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(NKD()(s16.float(), t16.float(), target=target).item(), rel=1e-6)


def test_nkd_masked_positions_change_neither_value_nor_gradient():
    shape = (2, 3, 4)
    mask = random_mask(shape, 17)
    dropped = ~mask[:, None].expand(shape)
    target = labels(shape, 3, 18).masked_fill(~mask, 255)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = NKD(tau=2.0)(student, teacher, target=target, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(logits(shape, 19), logits(shape, 20))
    changed = value_and_grad(
        logits(shape, 19).masked_fill(dropped, float("nan")), logits(shape, 20).masked_fill(dropped, -1e4)
    )
    assert torch.equal(value, changed[0]) and torch.equal(grad, changed[1])
    assert torch.count_nonzero(grad[dropped]) == 0


def test_nkd_mask_keeping_nothing_gives_zero():
    student = logits((2, 3, 4), 21).requires_grad_()
    loss = NKD()(
        student, logits((2, 3, 4), 22), target=torch.full((2, 4), 255), mask=torch.zeros(2, 4, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_nkd_built_by_name_with_the_released_defaults():
    loss = LOSSES.build("nkd")
    assert (loss.tau, loss.gamma) == (1.0, 1.5)


def test_nkd_missing_or_bad_target():
    student, teacher = logits((4, 5), 23), logits((4, 5), 24)
    with pytest.raises(ConfigError, match="target") as error:
        NKD()(student, teacher, epoch=3)
    assert "\n" not in str(error.value)
    with pytest.raises(ShapeError, match=r"target has shape \(3,\)"):
        NKD()(student, teacher, target=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="outside"):
        NKD()(student, teacher, target=torch.tensor([0, 1, 2, 5]))


@pytest.mark.parametrize("kwargs", [{"tau": 0}, {"tau": float("nan")}, {"gamma": -1}, {"gamma": "1.5"}])
def test_nkd_invalid_configuration_is_a_one_line_config_error(kwargs):
    with pytest.raises(ConfigError) as error:
        NKD(**kwargs)
    assert "\n" not in str(error.value)

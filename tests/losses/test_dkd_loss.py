"""DKD against a float64 loop re-computation, warm-up, targets, masks and errors."""

from __future__ import annotations

import pytest
import torch
from loss_inputs import labels, logits, random_mask
from losses_reference import dkd_terms

from distkd.errors import ConfigError, ShapeError
from distkd.losses import DKD, KD, build_loss


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 4, 5), (5, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"alpha": 0.5, "beta": 2.0, "tau": 1.0}])
def test_dkd_matches_loop_reference(shape, masked, kwargs):
    student, teacher = logits(shape, 0), logits(shape, 1)
    target = labels(shape, shape[1], 2)
    mask = random_mask(shape, 3) if masked else None
    if masked:
        target = target.masked_fill(~mask, 255)
    module = DKD(**kwargs)
    loss, parts = module(student, teacher, target=target, mask=mask, epoch=25, return_parts=True)
    tckd, nckd = dkd_terms(student, teacher, target, tau=module.tau, mask=mask)
    expected = module.alpha * tckd + module.beta * nckd
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert parts["tckd"].item() == pytest.approx(tckd / module.tau**2, rel=1e-10, abs=1e-14)
    assert parts["nckd"].item() == pytest.approx(nckd / module.tau**2, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_kd_decomposes_into_tckd_plus_weighted_nckd(seed):
    # The paper's Eq. (1): KL(p_t || p_s) = TCKD + (1 - p_t[gt]) * NCKD, for one instance.
    student, teacher = logits((1, 6), 20 + seed), logits((1, 6), 30 + seed)
    target = torch.tensor([seed])
    _, parts = DKD(tau=2.0, warmup=0)(student, teacher, target=target, return_parts=True)
    _, kd_parts = KD(tau=2.0)(student, teacher, return_parts=True)
    p_gt = (teacher / 2.0).softmax(1)[0, seed]
    torch.testing.assert_close(kd_parts["kl"], parts["tckd"] + (1 - p_gt) * parts["nckd"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("epoch, factor", [(0, 0.0), (5, 0.25), (20, 1.0), (100, 1.0)])
def test_warmup_ramps_the_loss_linearly(epoch, factor):
    student, teacher, target = logits((4, 5), 6), logits((4, 5), 7), labels((4, 5), 5, 8)
    full = DKD(warmup=0)(student, teacher, target=target)
    ramped = DKD(warmup=20)(student, teacher, target=target, epoch=epoch)
    assert ramped.item() == pytest.approx(factor * full.item(), rel=1e-12, abs=0.0)


def test_dkd_gradcheck_dense_with_mask():
    shape = (2, 4, 3, 2)
    student = logits(shape, 9).requires_grad_()
    teacher, target, mask = logits(shape, 10), labels(shape, 4, 11), random_mask(shape, 12)
    loss = DKD(tau=2.0, warmup=0)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, target=target, mask=mask), (student,))


def test_dkd_stays_finite_when_the_student_target_probability_underflows():
    student = torch.tensor([[-200.0, 50.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[5.0, 0.0, 1.0]])
    loss = DKD(tau=1.0, warmup=0)(student, teacher, target=torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert loss.item() > 100


def test_dkd_masked_positions_change_neither_value_nor_gradient():
    shape = (2, 3, 4)
    mask = random_mask(shape, 13)
    dropped = ~mask[:, None].expand(shape)
    target = labels(shape, 3, 14).masked_fill(~mask, 255)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = DKD(warmup=0)(student, teacher, target=target, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(logits(shape, 15), logits(shape, 16))
    changed = value_and_grad(logits(shape, 15).masked_fill(dropped, 1e4), logits(shape, 16).masked_fill(dropped, -7))
    assert torch.equal(value, changed[0]) and torch.equal(grad, changed[1])
    assert torch.count_nonzero(grad[dropped]) == 0


def test_dkd_mask_keeping_nothing_gives_zero():
    student = logits((2, 3, 4), 17).requires_grad_()
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss = DKD(warmup=0)(student, logits((2, 3, 4), 18), target=torch.full((2, 4), 255), mask=mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_dkd_target_and_epoch_errors():
    student, teacher = torch.zeros(4, 5), torch.zeros(4, 5)
    with pytest.raises(ShapeError, match="target"):
        DKD(warmup=0)(student, teacher)
    with pytest.raises(ShapeError, match=r"target has shape \(3,\).*\(4,\)"):
        DKD(warmup=0)(student, teacher, target=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ShapeError, match="outside"):
        DKD(warmup=0)(student, teacher, target=torch.tensor([0, 1, 2, 255]))
    with pytest.raises(ShapeError, match="integer"):
        DKD(warmup=0)(student, teacher, target=torch.zeros(4))
    with pytest.raises(ConfigError, match="epoch"):
        DKD(warmup=20)(student, teacher, target=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kwargs", [{"alpha": -1}, {"beta": -0.5}, {"tau": 0}, {"warmup": -1}])
def test_dkd_invalid_configuration(kwargs):
    with pytest.raises(ConfigError):
        DKD(**kwargs)


def test_dkd_built_by_name_with_paper_defaults():
    loss = build_loss("dkd")
    assert (loss.alpha, loss.beta, loss.tau, loss.warmup) == (1.0, 8.0, 4.0, 20.0)

"""DIST's plain-autograd reference path: equal to the fast path in value and gradient, and to the loop formula."""

from __future__ import annotations

import pytest
import torch
from loss_inputs import logits, random_mask
from losses_reference import dist_loss

from distkd.errors import ConfigError
from distkd.losses import DIST, _relations

CASES = [
    ((7, 5), {}),
    ((6, 4, 3, 2), {"tau": 4.0, "beta": 2.0, "gamma": 0.5}),
    ((4, 3, 5), {"activation": "sigmoid", "tau": 1.5}),
    ((8, 6), {"intra_group_size": 4, "tau": 2.0}),
    ((4, 3, 2, 2), {"intra_group_size": 2, "activation": "sigmoid"}),
]


def _loss_and_grad(loss: DIST, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    leaf = student.detach().clone().requires_grad_()
    value = loss(leaf, teacher, mask=mask)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("shape", "kwargs"), CASES)
def test_reference_path_equals_the_fast_path_in_value_and_gradient(monkeypatch, shape, kwargs, masked):
    monkeypatch.setattr(_relations, "CPU_CHUNK_ELEMENTS", 8)  # the fast path in several chunks
    student, teacher = logits(shape, 40), logits(shape, 41)
    mask = random_mask(shape, 42, keep_first=2) if masked else None
    fast_value, fast_grad = _loss_and_grad(DIST(**kwargs), student, teacher, mask)
    ref_value, ref_grad = _loss_and_grad(DIST(implementation="reference", **kwargs), student, teacher, mask)
    assert ref_value.item() == pytest.approx(fast_value.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(ref_grad, fast_grad, rtol=1e-9, atol=1e-12)
    if "intra_group_size" not in kwargs:
        assert ref_value.item() == pytest.approx(dist_loss(student, teacher, mask=mask, **kwargs), rel=1e-10)


def test_reference_path_ignores_whatever_masked_positions_hold():
    student, teacher = logits((2, 3, 4), 43), logits((2, 3, 4), 44)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    student[0, :, 1], teacher[0, :, 1] = float("nan"), float("inf")
    value, grad = _loss_and_grad(DIST(implementation="reference"), student, teacher, mask)
    clean_s, clean_t = student.clone(), teacher.clone()
    clean_s[0, :, 1] = clean_t[0, :, 1] = 0.0
    assert value.item() == pytest.approx(dist_loss(clean_s, clean_t, mask=mask), rel=1e-10)
    assert torch.isfinite(grad).all() and torch.equal(grad[0, :, 1], torch.zeros(3, dtype=grad.dtype))


def test_reference_path_with_no_kept_position_is_zero_with_zero_gradient():
    student, teacher = logits((2, 3, 4), 45), logits((2, 3, 4), 46)
    value, grad = _loss_and_grad(DIST(implementation="reference"), student, teacher,
                                 torch.zeros(2, 4, dtype=torch.bool))
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_reference_path_has_second_derivatives():
    student, teacher = logits((5, 4), 47).requires_grad_(), logits((5, 4), 48)
    loss = DIST(implementation="reference", tau=2.0)
    assert torch.autograd.gradgradcheck(lambda s: loss(s, teacher), (student,))


def test_reference_path_rejects_global_intra_and_unknown_names():
    with pytest.raises(ConfigError, match="reference implementation computes the local batch"):
        DIST(implementation="reference", global_intra=True)
    with pytest.raises(ConfigError, match="unknown DIST implementation 'fused'"):
        DIST(implementation="fused")

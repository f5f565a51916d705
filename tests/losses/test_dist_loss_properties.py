"""Property tests (hypothesis) of DIST: zero at equality, shift invariance, bounds, dense = flat, masks."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distkd.losses import DIST

PROPERTY = settings(max_examples=30, deadline=None)
taus = st.sampled_from([1.0, 2.0, 4.0])
weights = st.floats(0.0, 3.0)


@st.composite
def logit_arrays(draw, min_rows=1, dense=False):
    """float64 logits ``(N, C)``, or ``(N, C, H, W)`` when ``dense``."""
    n = draw(st.integers(min_rows, 6))
    c = draw(st.integers(2, 6))
    shape = (n, c, draw(st.integers(1, 3)), draw(st.integers(1, 3))) if dense else (n, c)
    values = draw(arrays("float64", shape, elements=st.floats(-8.0, 8.0)))
    return torch.from_numpy(values)


def centred_sum_of_squares(y, dim):
    return (y - y.mean(dim, keepdim=True)).square().sum(dim)


@PROPERTY
@given(logit_arrays(min_rows=2), taus, weights, weights)
def test_dist_is_zero_when_student_equals_teacher(z, tau, beta, gamma):
    y = (z / tau).softmax(1)
    # With its 1e-8 guard, rho(a, a) = s / (s + 1e-8) for s = ||a - mean a||^2: each term is below
    # 1e-8 / s, so keep vectors that vary (s > 1e-3) and allow 1e-5 per unit weight.
    assume(centred_sum_of_squares(y, 1).min() > 1e-3 and centred_sum_of_squares(y, 0).min() > 1e-3)
    loss = DIST(beta=beta, gamma=gamma, tau=tau)(z, z.clone())
    assert 0.0 <= loss.item() <= 1e-5 * tau**2 * (beta + gamma) + 1e-15


@PROPERTY
@given(logit_arrays(dense=True), st.data(), taus)
def test_dist_is_unchanged_by_a_per_instance_constant(z_s, data, tau):
    z_t = z_s.flip(0)
    shape = (z_s.shape[0], 1, *z_s.shape[2:])
    shift_s = torch.from_numpy(data.draw(arrays("float64", shape, elements=st.floats(-30.0, 30.0))))
    shift_t = torch.from_numpy(data.draw(arrays("float64", shape, elements=st.floats(-30.0, 30.0))))
    loss = DIST(tau=tau)
    torch.testing.assert_close(loss(z_s + shift_s, z_t + shift_t), loss(z_s, z_t), rtol=1e-9, atol=1e-9)


@PROPERTY
@given(logit_arrays(dense=True), taus, weights, weights, st.sampled_from(["softmax", "sigmoid"]))
def test_dist_lies_within_its_bounds(z_s, tau, beta, gamma, activation):
    z_t = z_s.roll(1, dims=1)
    loss = DIST(beta=beta, gamma=gamma, tau=tau, activation=activation)(z_s, z_t).item()
    assert 0.0 <= loss <= 2 * tau**2 * (beta + gamma)


@PROPERTY
@given(logit_arrays(dense=True), st.data(), taus)
def test_dense_call_equals_the_flat_call_on_its_instances(z_s, data, tau):
    z_t = torch.from_numpy(data.draw(arrays("float64", tuple(z_s.shape), elements=st.floats(-8.0, 8.0))))
    mask_shape = (z_s.shape[0], *z_s.shape[2:])
    mask = torch.from_numpy(data.draw(arrays(bool, mask_shape)))
    loss = DIST(tau=tau)
    c = z_s.shape[1]
    rows = mask.reshape(-1)
    flat_s = z_s.permute(0, 2, 3, 1).reshape(-1, c)[rows]
    flat_t = z_t.permute(0, 2, 3, 1).reshape(-1, c)[rows]
    expected = loss(flat_s, flat_t) if rows.any() else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(loss(z_s, z_t, mask=mask), expected, rtol=1e-9, atol=1e-12)


@PROPERTY
@given(logit_arrays(dense=True), st.data(), taus)
def test_masked_positions_change_neither_value_nor_gradient(z_s, data, tau):
    z_t = z_s.roll(1, dims=1)
    mask_shape = (z_s.shape[0], *z_s.shape[2:])
    mask = torch.from_numpy(data.draw(arrays(bool, mask_shape)))
    noise = torch.from_numpy(data.draw(arrays("float64", tuple(z_s.shape), elements=st.floats(-1e3, 1e3))))
    dropped = ~mask[:, None].expand_as(z_s)
    loss = DIST(tau=tau, gamma=2.0)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = loss(student, teacher, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(z_s, z_t)
    value_changed, grad_changed = value_and_grad(torch.where(dropped, noise, z_s), torch.where(dropped, -noise, z_t))
    assert torch.equal(value, value_changed)
    assert torch.equal(grad, grad_changed)
    assert torch.count_nonzero(grad[dropped]) == 0

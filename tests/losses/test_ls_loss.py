"""Logit standardization (ls_kd, ls_dkd, ls_dist) against float64 loops, invariances, gradients and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from loss_inputs import labels, logits, random_mask
from losses_reference import dist_loss, dkd_terms, kd_loss

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.dist import DIST
from distkd.losses.dkd import DKD
from distkd.losses.kd import KD
from distkd.losses.standardize import LSDIST, LSDKD, LSKD, standardize

EPS = 1e-7


def zscore_loop(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Every instance (sample and position) as ``(z - mean) / (std + eps)``, unbiased std, one value at a time."""
    array = x.detach().double().numpy()
    out = np.empty_like(array)
    num_classes = array.shape[1]
    for n in range(array.shape[0]):
        for position in np.ndindex(*array.shape[2:]):
            row = [float(array[(n, c, *position)]) for c in range(num_classes)]
            mean = sum(row) / num_classes
            std = math.sqrt(sum((v - mean) ** 2 for v in row) / (num_classes - 1))
            for c, v in enumerate(row):
                out[(n, c, *position)] = (v - mean) / (std + eps)
    return torch.from_numpy(out)


def affine_per_instance(x: torch.Tensor, seed: int) -> torch.Tensor:
    """``a * x + b`` with a positive scale ``a`` and a shift ``b`` drawn for every instance."""
    generator = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], 1, *x.shape[2:])
    scale = 0.5 + 2.5 * torch.rand(shape, generator=generator, dtype=x.dtype)
    shift = 10 * torch.randn(shape, generator=generator, dtype=x.dtype)
    return scale * x + shift


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4), (5, 2)])
def test_standardize_matches_the_loop_z_score(shape):
    x = logits(shape, 0)
    torch.testing.assert_close(standardize(x, EPS), zscore_loop(x), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(standardize(x, 0.0), zscore_loop(x, 0.0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 2, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("tau", [2.0, 3.0])
def test_ls_kd_matches_loop_reference(shape, masked, tau):
    student, teacher = logits(shape, 1), logits(shape, 2)
    mask = random_mask(shape, 3) if masked else None
    loss, parts = LSKD(tau=tau)(student, teacher, mask=mask, return_parts=True)
    expected = kd_loss(zscore_loop(student), zscore_loop(teacher), tau=tau, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert parts["kl"].item() == pytest.approx(expected / tau**2, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_ls_dkd_matches_loop_reference(shape, masked):
    student, teacher = logits(shape, 4), logits(shape, 5)
    target = labels(shape, shape[1], 6)
    mask = random_mask(shape, 7) if masked else None
    if masked:
        target = target.masked_fill(~mask, 255)
    module = LSDKD(alpha=0.5, beta=4.0)
    loss, parts = module(student, teacher, target=target, mask=mask, epoch=5, return_parts=True)
    tckd, nckd = dkd_terms(zscore_loop(student), zscore_loop(teacher), target, tau=2.0, mask=mask)
    assert loss.item() == pytest.approx(5 / 20 * (0.5 * tckd + 4.0 * nckd), rel=1e-10, abs=1e-14)
    assert parts["tckd"].item() == pytest.approx(tckd / 4.0, rel=1e-10, abs=1e-14)
    assert parts["nckd"].item() == pytest.approx(nckd / 4.0, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_ls_dist_matches_loop_reference(shape, masked):
    student, teacher = logits(shape, 8), logits(shape, 9)
    mask = random_mask(shape, 10) if masked else None
    loss = LSDIST(beta=2.0, gamma=0.5)(student, teacher, mask=mask)
    expected = dist_loss(zscore_loop(student), zscore_loop(teacher), beta=2.0, gamma=0.5, tau=2.0, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize(
    "standardized, plain",
    [(LSKD(tau=3.0), KD(tau=3.0)), (LSDKD(warmup=0), DKD(tau=2.0, warmup=0)), (LSDIST(), DIST(tau=2.0))],
)
def test_standardized_loss_equals_the_wrapped_loss_on_standardized_logits(standardized, plain):
    student, teacher, target = logits((7, 6), 11), logits((7, 6), 12), labels((7, 6), 6, 13)
    z_s, z_t = standardize(student, EPS), standardize(teacher, EPS)
    value, parts = standardized(student, teacher, target=target, return_parts=True)
    expected, expected_parts = plain(z_s, z_t, target=target, return_parts=True)
    torch.testing.assert_close(value, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(parts, expected_parts, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["ls_kd", "ls_dkd", "ls_dist"])
@pytest.mark.parametrize("shape", [(6, 5), (2, 4, 3)])
def test_ls_losses_are_invariant_to_per_instance_shift_and_scale(name, shape):
    student, teacher = logits(shape, 14), logits(shape, 15)
    moved_s, moved_t = affine_per_instance(student, 16), affine_per_instance(teacher, 17)
    context = {"target": labels(shape, shape[1], 18), "epoch": 30}
    exact = LOSSES.build(name, eps=0.0)
    assert exact(moved_s, moved_t, **context).item() == pytest.approx(
        exact(student, teacher, **context).item(), rel=1e-10
    )
    default = LOSSES.build(name)
    assert default(moved_s, moved_t, **context).item() == pytest.approx(
        default(student, teacher, **context).item(), rel=1e-6
    )
    assert abs(KD()(moved_s, moved_t).item() - KD()(student, teacher).item()) > 1e-3  # plain KD is not invariant


@pytest.mark.parametrize("name", ["ls_kd", "ls_dkd", "ls_dist"])
def test_ls_gradcheck_dense_with_mask(name):
    shape = (2, 4, 3, 2)
    student = logits(shape, 19).requires_grad_()
    teacher, mask = logits(shape, 20), random_mask(shape, 21)
    target = labels(shape, 4, 22)
    loss = LOSSES.build(name)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, target=target, mask=mask, epoch=40), (student,))


@pytest.mark.parametrize("name", ["ls_kd", "ls_dkd", "ls_dist"])
def test_ls_teacher_gets_no_gradient_and_half_precision_runs_in_float32(name):
    student = logits((5, 7), 23).requires_grad_()
    teacher = logits((5, 7), 24).requires_grad_()
    context = {"target": labels((5, 7), 7, 25), "epoch": 30}
    LOSSES.build(name)(student, teacher, **context).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    s16, t16 = logits((8, 6), 26, dtype=torch.bfloat16), logits((8, 6), 27, dtype=torch.bfloat16)
    context["target"] = labels((8, 6), 6, 28)
    value = LOSSES.build(name)(s16, t16, **context)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(LOSSES.build(name)(s16.float(), t16.float(), **context).item(), rel=1e-6)


def test_ls_masked_positions_change_neither_value_nor_gradient():
    shape = (2, 3, 4)
    mask = random_mask(shape, 29)
    dropped = ~mask[:, None].expand(shape)

    def value_and_grad(student, teacher):
        student = student.clone().requires_grad_()
        value = LSKD()(student, teacher, mask=mask)
        value.backward()
        return value.detach(), student.grad

    value, grad = value_and_grad(logits(shape, 30), logits(shape, 31))
    changed = value_and_grad(
        logits(shape, 30).masked_fill(dropped, float("nan")), logits(shape, 31).masked_fill(dropped, 1e4)
    )
    assert torch.equal(value, changed[0]) and torch.equal(grad, changed[1])
    assert torch.count_nonzero(grad[dropped]) == 0


def test_ls_built_by_name_with_the_authors_base_temperature():
    kd, dkd, dist = LOSSES.build("ls_kd"), LOSSES.build("ls_dkd"), LOSSES.build("ls_dist")
    assert (kd.tau, kd.eps) == (2.0, 1e-7)
    assert (dkd.alpha, dkd.beta, dkd.tau, dkd.warmup, dkd.eps) == (1.0, 8.0, 2.0, 20.0, 1e-7)
    assert (dist.beta, dist.gamma, dist.tau, dist.eps) == (1.0, 1.0, 2.0, 1e-7)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("ls_kd", {"eps": -1.0}),
        ("ls_kd", {"tau": 0}),
        ("ls_dkd", {"beta": -1}),
        ("ls_dkd", {"eps": float("nan")}),
        ("ls_dist", {"activation": "relu"}),
        ("ls_dist", {"eps": "small"}),
    ],
)
def test_ls_invalid_configuration_is_a_one_line_config_error(name, kwargs):
    with pytest.raises(ConfigError) as error:
        LOSSES.build(name, **kwargs)
    assert "\n" not in str(error.value)


def test_ls_missing_context_and_bad_shapes():
    student, teacher = logits((4, 5), 32), logits((4, 5), 33)
    with pytest.raises(ConfigError, match="target") as error:
        LSDKD(warmup=0)(student, teacher)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="epoch"):
        LSDKD()(student, teacher, target=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(4, 5\).*\(4, 3\)"):
        LSKD()(student, teacher[:, :3])

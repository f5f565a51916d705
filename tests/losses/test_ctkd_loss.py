"""CTKD: the value against a float64 loop, the reversed temperature gradient and its curriculum, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from loss_inputs import logits, random_mask
from losses_reference import kd_loss

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.ctkd import CTKD
from distkd.losses.kd import KD


def released_cosine_decay(epoch: float, decay_max: float, decay_min: float, loops: float) -> float:
    """The released ``CosineDecay.get_value``: the gradient multiplier (minus the reversal strength)."""
    i = min(max(epoch, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (decay_max - decay_min) + decay_min


def loss_at_theta(module: CTKD, theta: float, student, teacher, **context) -> float:
    """The loss value with ``theta`` set to ``theta`` (no gradient)."""
    probe = copy.deepcopy(module)
    with torch.no_grad():
        probe.theta.fill_(theta)
        return probe(student, teacher, **context).item()


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 2, 2)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("theta, t_start, t_range", [(1.0, 1.0, 20.0), (-0.7, 2.0, 5.0)])
def test_ctkd_matches_loop_reference(shape, masked, theta, t_start, t_range):
    student, teacher = logits(shape, 0), logits(shape, 1)
    mask = random_mask(shape, 2) if masked else None
    module = CTKD(t_start=t_start, t_range=t_range).double()
    with torch.no_grad():
        module.theta.fill_(theta)
    loss, parts = module(student, teacher, mask=mask, epoch=3, return_parts=True)
    tau = t_start + t_range / (1.0 + math.exp(-theta))
    expected = kd_loss(student, teacher, tau=tau, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert parts["kl"].item() == pytest.approx(expected / tau**2, rel=1e-10, abs=1e-14)
    assert parts["temperature"].item() == pytest.approx(tau, rel=1e-12)


def test_initial_temperature_is_the_released_one():
    assert CTKD().temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize("epoch", [-3, 0, 1, 2.5, 5, 9, 10, 11, 240])
@pytest.mark.parametrize("start, end, loops", [(0.0, 1.0, 10), (0.2, 0.7, 4)])
def test_reversal_strength_follows_the_released_cosine_curriculum(epoch, start, end, loops):
    module = CTKD(lambda_start=start, lambda_end=end, decay_epochs=loops)
    expected = -released_cosine_decay(epoch, -start, -end, loops)
    assert module.reversal_strength(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_reversal_strength_milestones():
    module = CTKD()
    assert module.reversal_strength(0) == 0.0
    assert module.reversal_strength(5) == pytest.approx(0.5, rel=1e-12)
    assert module.reversal_strength(10) == module.reversal_strength(100) == 1.0


@pytest.mark.parametrize("epoch", [1, 3, 5, 10, 40])
def test_temperature_gets_the_reversed_gradient_scaled_by_the_curriculum(epoch):
    student, teacher, mask = logits((2, 5, 3), 3), logits((2, 5, 3), 4), random_mask((2, 5, 3), 5)
    module = CTKD().double()
    with torch.no_grad():
        module.theta.fill_(-0.4)
    module(student, teacher, mask=mask, epoch=epoch).backward()
    h = 1e-5
    plus = loss_at_theta(module, -0.4 + h, student, teacher, mask=mask, epoch=epoch)
    minus = loss_at_theta(module, -0.4 - h, student, teacher, mask=mask, epoch=epoch)
    numerical = (plus - minus) / (2 * h)  # d loss / d theta, without reversal
    strength = module.reversal_strength(epoch)
    assert strength > 0 and abs(numerical) > 1e-3
    assert module.theta.grad.item() == pytest.approx(-strength * numerical, rel=1e-6)
    # a gradient-descent step on theta raises the distillation loss (the adversarial direction)
    before = loss_at_theta(module, -0.4, student, teacher, mask=mask, epoch=epoch)
    after = loss_at_theta(module, -0.4 - 0.1 * module.theta.grad.item(), student, teacher, mask=mask, epoch=epoch)
    assert after > before


def test_temperature_gets_no_gradient_at_epoch_zero():
    module = CTKD()
    module(logits((4, 5), 6, dtype=torch.float32), logits((4, 5), 7, dtype=torch.float32), epoch=0).backward()
    assert module.theta.grad.item() == 0.0


def test_student_gradient_is_plain_kd_at_the_current_temperature():
    student = logits((6, 5), 8).requires_grad_()
    teacher = logits((6, 5), 9)
    module = CTKD().double()
    module(student, teacher, epoch=7).backward()
    reference = student.detach().clone().requires_grad_()
    KD(tau=module.temperature().item())(reference, teacher).backward()
    torch.testing.assert_close(student.grad, reference.grad, rtol=1e-12, atol=1e-15)


def test_ctkd_gradcheck_dense_with_mask():
    shape = (2, 4, 3, 2)
    student = logits(shape, 10).requires_grad_()
    teacher, mask = logits(shape, 11), random_mask(shape, 12)
    module = CTKD().double()
    assert torch.autograd.gradcheck(lambda s: module(s, teacher, mask=mask, epoch=4), (student,))


def test_ctkd_teacher_gets_no_gradient_and_half_precision_runs_in_float32():
    student, teacher = logits((5, 7), 13).requires_grad_(), logits((5, 7), 14).requires_grad_()
    CTKD()(student, teacher, epoch=2, target=torch.zeros(5, dtype=torch.long)).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    s16, t16 = logits((8, 6), 15, dtype=torch.bfloat16), logits((8, 6), 16, dtype=torch.bfloat16)
    value = CTKD()(s16, t16, epoch=2)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(CTKD()(s16.float(), t16.float(), epoch=2).item(), rel=1e-6)


def test_temperature_is_trainable_state_built_at_construction():
    module = LOSSES.build("ctkd")
    params = dict(module.named_parameters())
    assert list(params) == ["theta"] and params["theta"].requires_grad and params["theta"].item() == 1.0
    assert "theta" in module.state_dict()
    assert (module.t_start, module.t_range, module.lambda_start, module.lambda_end, module.decay_epochs) == (
        1.0,
        20.0,
        0.0,
        1.0,
        10.0,
    )


@pytest.mark.parametrize("epoch", [None, "3", True, float("nan")])
def test_ctkd_without_a_valid_epoch_is_a_one_line_config_error(epoch):
    context = {} if epoch is None else {"epoch": epoch}
    with pytest.raises(ConfigError, match="epoch") as error:
        CTKD()(logits((4, 5), 17), logits((4, 5), 18), **context)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"t_start": 0},
        {"t_range": -1.0},
        {"lambda_start": -0.1},
        {"lambda_end": float("inf")},
        {"decay_epochs": 0},
        {"t_start": "1"},
    ],
)
def test_ctkd_invalid_configuration_is_a_one_line_config_error(kwargs):
    with pytest.raises(ConfigError) as error:
        CTKD(**kwargs)
    assert "\n" not in str(error.value)


def test_ctkd_shape_errors():
    with pytest.raises(ShapeError, match=r"\(4, 5\).*\(4, 3\)"):
        CTKD()(logits((4, 5), 19), logits((4, 3), 20), epoch=1)

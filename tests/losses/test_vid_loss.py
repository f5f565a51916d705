"""VID: the Gaussian negative log-likelihood against a float64 re-computation with the regressors' own weights."""

from __future__ import annotations

import math

import pytest
import torch

import distkd.losses.vid  # noqa: F401  (registers "vid")
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling of a square map (N, C, H, H) to (N, C, size, size), H a multiple of size."""
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(dim=(3, 5))


def conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x)


def reference_vid(student, teacher, state, prefix) -> torch.Tensor:
    """``mean(0.5 * ((mu - t)**2 / var + log var))`` in float64 with the regressor weights of ``state``."""
    s, t = student.double(), teacher.double()
    if s.shape[2] > t.shape[2]:
        s = block_mean(s, t.shape[2])
    elif s.shape[2] < t.shape[2]:
        t = block_mean(t, s.shape[2])
    w0, w1, w2 = (state[f"{prefix}.mean.{i}.weight"].double() for i in (0, 2, 4))
    mu = conv1x1(conv1x1(conv1x1(s, w0).clamp(min=0), w1).clamp(min=0), w2)
    var = torch.log(1.0 + torch.exp(state[f"{prefix}.log_scale"].double())) + 1e-5
    var = var.view(1, -1, 1, 1)
    return (0.5 * ((mu - t) ** 2 / var + torch.log(var))).mean()


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_vid_equals_the_float64_formula_summed_over_levels_with_pooling_both_ways() -> None:
    student = [seeded((5, 4, 8, 8), 0), seeded((5, 6, 4, 4), 1), seeded((5, 3, 4, 4), 2)]
    teacher = [seeded((5, 6, 4, 4), 3), seeded((5, 5, 8, 8), 4), seeded((5, 7, 4, 4), 5)]
    loss = build_loss("vid")
    loss.probe(student, teacher)
    loss.double()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    state = loss.state_dict()
    value, parts = loss(student, teacher, return_parts=True, epoch=3, unknown="ignored")
    expected = [reference_vid(s, t, state, f"regressors.{i}")
                for i, (s, t) in enumerate(zip(student, teacher, strict=True))]
    torch.testing.assert_close(value, sum(expected), rtol=1e-10, atol=1e-12)
    assert set(parts) == {"level0", "level1", "level2"}
    for i, e in enumerate(expected):
        torch.testing.assert_close(parts[f"level{i}"], e, rtol=1e-10, atol=1e-12)


def test_the_variances_start_at_init_pred_var_and_a_single_map_has_no_parts() -> None:
    student, teacher = seeded((3, 4, 4, 4), 0), seeded((3, 6, 4, 4), 1)
    loss = build_loss("vid", init_pred_var=3.0)
    loss.probe(student, teacher)
    head = loss.regressors[0]
    convs = [m for m in head.mean if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(4, 6, (1, 1)), (6, 6, (1, 1)),
                                                                             (6, 6, (1, 1))]
    assert all(c.bias is None for c in convs) and head.log_scale.shape == (6,)
    torch.testing.assert_close(head.variance().double(), torch.full((6,), 3.0, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    torch.testing.assert_close(head.log_scale.double()[0], torch.tensor(math.log(math.exp(3.0 - 1e-5) - 1.0),
                                                                        dtype=torch.float64), rtol=1e-6, atol=0)
    value, parts = loss(student.float(), teacher.float(), return_parts=True)
    assert parts == {} and value.dtype == torch.float32


def test_gradients_reach_the_student_the_regressor_and_the_variances_never_the_teacher() -> None:
    student = seeded((4, 3, 4, 4), 0).float().requires_grad_()
    teacher = seeded((4, 5, 4, 4), 1).float().requires_grad_()
    loss = build_loss("vid")
    loss.probe(student.detach(), teacher.detach())
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert {name for name, _ in loss.named_parameters()} >= {"regressors.0.log_scale"}


def test_half_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = seeded((4, 3, 4, 4), 0).bfloat16(), seeded((4, 5, 4, 4), 1).bfloat16()
    loss = build_loss("vid")
    loss.probe(student, teacher)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(student.float(), teacher.float()))


def test_vid_errors_are_one_line() -> None:
    loss = build_loss("vid")
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match=r"the student's feature 0 is \(2, 3\)"):
        loss.probe(torch.randn(2, 3), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match="got 2 and 1"):
        loss.probe([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 3, 4, 4)])
    loss.probe(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match="probed with 1 feature level"):
        loss([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 3, 4, 4)] * 2)
    for kwargs in ({"eps": 0}, {"init_pred_var": -1.0}, {"init_pred_var": 1e-6}, {"eps": "x"}):
        with pytest.raises(ConfigError) as err:
            build_loss("vid", **kwargs)
        assert "\n" not in str(err.value)

"""FSP: the flow-of-solution-procedure loss against a float64 re-computation with explicit channel loops."""

from __future__ import annotations

import pytest
import torch

import distkd.losses.fsp  # noqa: F401  (registers "fsp")
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(dim=(3, 5))


def gram(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """G[n, j, i] = mean over positions of top[n, j] * bottom[n, i], after pooling the larger map."""
    if bottom.shape[2] > top.shape[2]:
        bottom = block_mean(bottom, top.shape[2])
    elif bottom.shape[2] < top.shape[2]:
        top = block_mean(top, bottom.shape[2])
    g = torch.zeros(bottom.shape[0], top.shape[1], bottom.shape[1], dtype=torch.float64)
    for j in range(top.shape[1]):
        for i in range(bottom.shape[1]):
            g[:, j, i] = (top[:, j] * bottom[:, i]).mean(dim=(1, 2))
    return g


def test_fsp_equals_the_float64_formula_over_consecutive_pairs() -> None:
    shapes = [(4, 3, 8, 8), (4, 5, 8, 8), (4, 6, 4, 4), (4, 2, 8, 8)]  # equal sizes, halving, doubling
    student = [seeded(s, i) for i, s in enumerate(shapes)]
    teacher = [seeded(s, 10 + i) for i, s in enumerate(shapes)]
    loss = build_loss("fsp")
    loss.probe(student, teacher)
    value, parts = loss(student, teacher, return_parts=True, epoch=1)
    expected = [((gram(student[i], student[i + 1]) - gram(teacher[i], teacher[i + 1])) ** 2).mean() for i in range(3)]
    torch.testing.assert_close(value, sum(expected), rtol=1e-10, atol=1e-13)
    assert set(parts) == {"pair0", "pair1", "pair2"}
    for i, e in enumerate(expected):
        torch.testing.assert_close(parts[f"pair{i}"], e, rtol=1e-10, atol=1e-13)


def test_the_student_gets_gradients_the_teacher_none_and_half_inputs_run_in_float32() -> None:
    student = [seeded((3, 2, 4, 4), 0).float().requires_grad_(), seeded((3, 4, 2, 2), 1).float().requires_grad_()]
    teacher = [seeded((3, 2, 4, 4), 2).float().requires_grad_(), seeded((3, 4, 2, 2), 3).float().requires_grad_()]
    loss = build_loss("fsp")
    loss.probe([x.detach() for x in student], [x.detach() for x in teacher])
    value, parts = loss(student, teacher, return_parts=True)
    value.backward()
    assert parts == {}
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    assert all(x.grad is None for x in teacher)
    half = loss([x.detach().half() for x in student], [x.detach().half() for x in teacher])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, loss([x.detach().half().float() for x in student],
                                          [x.detach().half().float() for x in teacher]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the FSP products stay in float32 under autocast
        autocast = loss([x.detach() for x in student], [x.detach() for x in teacher])
    torch.testing.assert_close(autocast, value.detach(), rtol=1e-6, atol=1e-9)


def test_fsp_errors_are_one_line() -> None:
    loss = build_loss("fsp")
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    with pytest.raises(ShapeError, match="checked by a shape probe") as err:
        loss(maps, maps)
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="at least two module paths"):
        loss.probe(maps[0], maps[0])
    with pytest.raises(ShapeError, match=r"at level 1 the student's map is \(2, 3, 4, 4\) and the teacher's "
                                         r"\(2, 5, 4, 4\)") as err:
        loss.probe(maps, [maps[0], torch.randn(2, 5, 4, 4)])
    assert "\n" not in str(err.value)
    loss.probe(maps, maps)
    with pytest.raises(ShapeError, match="probed with 2 feature level"):
        loss(maps * 2, maps * 2)
    with pytest.raises(ConfigError, match="has no argument 'margin'") as err:
        build_loss("fsp", margin=1.0)
    assert "\n" not in str(err.value)

"""AB: the activation-boundary margin loss against a float64 re-computation with the connectors' own weights."""

from __future__ import annotations

import pytest
import torch

import distkd.losses.boundary  # noqa: F401  (registers "ab")
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """A plain convolution as a sum of shifted 1x1 products (float64)."""
    x = torch.nn.functional.pad(x, (padding,) * 4)
    k = weight.shape[-1]
    h_out, w_out = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = sum(torch.einsum("oc,nchw->nohw", weight[:, :, i, j],
                           x[:, :, i:i + stride * h_out:stride, j:j + stride * w_out:stride])
              for i in range(k) for j in range(k))
    return out + bias.view(1, -1, 1, 1)


def batch_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def margin_sum(s: torch.Tensor, t: torch.Tensor, m: float) -> torch.Tensor:
    off = ((s > -m) & (t <= 0)).double()
    on = ((s <= m) & (t > 0)).double()
    return ((s + m) ** 2 * off + (s - m) ** 2 * on).sum()


def test_ab_equals_the_float64_formula_with_level_weights_and_identity_or_convreg_connectors() -> None:
    student = [seeded((6, 4, 8, 8), 0), seeded((6, 3, 4, 4), 1), seeded((6, 3, 8, 8), 2)]
    teacher = [seeded((6, 4, 8, 8), 3), seeded((6, 6, 4, 4), 4), seeded((6, 5, 4, 4), 5)]
    loss = build_loss("ab", margin=0.7)
    loss.probe(student, teacher)
    assert isinstance(loss.connectors[0], torch.nn.Identity)
    assert loss.connectors[1].conv.kernel_size == (1, 1) and loss.connectors[2].conv.kernel_size == (3, 3)
    assert isinstance(loss.connectors[1].relu, torch.nn.Identity)  # RepDistiller's ConvReg(use_relu=False)
    loss.double()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    sd = loss.state_dict()
    value, parts = loss(student, teacher, return_parts=True, target=None)

    def connected(i: int, stride: int, padding: int) -> torch.Tensor:
        z = conv(student[i], sd[f"connectors.{i}.conv.weight"], sd[f"connectors.{i}.conv.bias"], stride, padding)
        return batch_norm(z, sd[f"connectors.{i}.bn.weight"], sd[f"connectors.{i}.bn.bias"])

    sources = [student[0], connected(1, 1, 0), connected(2, 2, 1)]
    n = 6
    expected = [2.0 ** (i - 2) * margin_sum(s, t, 0.7) / n * 3 / 1000
                for i, (s, t) in enumerate(zip(sources, teacher, strict=True))]
    torch.testing.assert_close(value, sum(expected), rtol=1e-10, atol=1e-12)
    for i, e in enumerate(expected):
        torch.testing.assert_close(parts[f"level{i}"], e, rtol=1e-10, atol=1e-12)


def test_a_single_map_has_weight_one_and_no_parts() -> None:
    student, teacher = seeded((4, 3, 4, 4), 0), seeded((4, 3, 4, 4), 1)
    loss = build_loss("ab")
    loss.probe(student, teacher)
    value, parts = loss(student, teacher, return_parts=True)
    assert parts == {}
    torch.testing.assert_close(value, margin_sum(student, teacher, 1.0) / 4 * 3 / 1000, rtol=1e-12, atol=0)


def test_gradients_reach_the_student_and_the_connector_never_the_teacher() -> None:
    student = seeded((4, 3, 4, 4), 0).float().requires_grad_()
    teacher = seeded((4, 5, 4, 4), 1).float().requires_grad_()
    loss = build_loss("ab")
    loss.probe(student.detach(), teacher.detach())
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    params = list(loss.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = seeded((4, 3, 4, 4), 0).half(), seeded((4, 5, 4, 4), 1).half()
    loss = build_loss("ab")
    loss.probe(student, teacher)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(student.float(), teacher.float()))


def test_ab_errors_are_one_line() -> None:
    loss = build_loss("ab")
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match=r"cannot connect a student feature map \(2, 3, 3, 3\) to the teacher's "
                                         r"\(2, 3, 8, 8\)") as err:
        loss.probe(torch.randn(2, 3, 3, 3), torch.randn(2, 3, 8, 8))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="different batch sizes"):
        loss.probe(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ConfigError) as err:
            build_loss("ab", margin=bad)
        assert "\n" not in str(err.value)

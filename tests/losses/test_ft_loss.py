"""FT: the factor-transfer loss (and the paraphraser's reconstruction) against float64 re-computations."""

from __future__ import annotations

import pytest
import torch

import distkd.losses.factor  # noqa: F401  (registers "ft")
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, as a sum of shifted 1x1 products."""
    h, w = x.shape[2:]
    x = torch.nn.functional.pad(x, (1, 1, 1, 1))
    out = sum(torch.einsum("oc,nchw->nohw", weight[:, :, i, j], x[:, :, i:i + h, j:j + w])
              for i in range(3) for j in range(3))
    return out + bias.view(1, -1, 1, 1)


def conv_transpose3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3x3 transposed convolution, stride 1, padding 1: the convolution with the flipped, transposed kernel."""
    return conv3x3(x, weight.transpose(0, 1).flip(2, 3), bias)


def leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.1 * x)


def batch_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(dim=(3, 5))


def translate(x: torch.Tensor, sd: dict) -> torch.Tensor:
    """RepDistiller's Translator: (conv3x3, BN, LeakyReLU(0.1)) x 3; layers at 0, 3, 6 with BN at 1, 4, 7."""
    for conv_i in (0, 3, 6):
        x = conv3x3(x, sd[f"translator.{conv_i}.weight"], sd[f"translator.{conv_i}.bias"])
        x = leaky(batch_norm(x, sd[f"translator.{conv_i + 1}.weight"], sd[f"translator.{conv_i + 1}.bias"]))
    return x


def encode(x: torch.Tensor, sd: dict) -> torch.Tensor:
    """The paraphraser's encoder: (conv3x3, LeakyReLU(0.1)) x 3, layers at 0, 2, 4."""
    for i in (0, 2, 4):
        x = leaky(conv3x3(x, sd[f"paraphraser.encoder.{i}.weight"], sd[f"paraphraser.encoder.{i}.bias"]))
    return x


def decode(x: torch.Tensor, sd: dict) -> torch.Tensor:
    for i in (0, 2, 4):
        x = leaky(conv_transpose3x3(x, sd[f"paraphraser.decoder.{i}.weight"], sd[f"paraphraser.decoder.{i}.bias"]))
    return x


def factor(x: torch.Tensor, p1: float) -> torch.Tensor:
    a = (x ** p1).mean(dim=1).reshape(x.shape[0], -1)
    return a / torch.sqrt((a ** 2).sum(dim=1, keepdim=True)).clamp(min=1e-12)


def randomised(loss: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return loss.state_dict()


@pytest.mark.parametrize(("p1", "p2"), [(2.0, 1.0), (4.0, 2.0)])
def test_ft_equals_the_float64_formula_on_translated_and_paraphrased_factors(p1, p2) -> None:
    student, teacher = seeded((5, 3, 8, 8), 0), seeded((5, 6, 4, 4), 1).relu()
    loss = build_loss("ft", p1=p1, p2=p2)
    loss.probe(student, teacher)
    assert loss.translator[0].out_channels == 3 and loss.translator[3].out_channels == 3  # int(6 * 0.5)
    loss.double()
    sd = randomised(loss, 3)
    value, parts = loss(student, teacher, return_parts=True, index=torch.arange(5))
    factor_s = block_mean(translate(student, sd), 4)  # the larger factor map is pooled to the smaller's size
    factor_t = encode(teacher, sd)
    expected = ((factor(factor_s, p1) - factor(factor_t, p1)).abs() ** p2).mean()
    assert parts == {}
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_the_reconstruction_loss_is_the_paraphrasers_mse_on_the_teacher_map() -> None:
    teacher = seeded((4, 6, 4, 4), 2).relu()
    loss = build_loss("ft")
    loss.probe(seeded((4, 3, 4, 4), 0), teacher)
    loss.double()
    sd = randomised(loss, 5)
    expected = ((decode(encode(teacher, sd), sd) - teacher) ** 2).mean()
    torch.testing.assert_close(loss.reconstruction_loss(teacher), expected, rtol=1e-10, atol=1e-12)


def test_only_the_translator_and_the_student_get_gradients_the_paraphraser_is_frozen() -> None:
    student = seeded((4, 3, 4, 4), 0).float().requires_grad_()
    teacher = seeded((4, 6, 4, 4), 1).float().relu().requires_grad_()
    loss = build_loss("ft")
    loss.probe(student.detach(), teacher.detach())
    assert not any(p.requires_grad for p in loss.paraphraser.parameters())
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.translator.parameters())
    assert all(p.grad is None for p in loss.paraphraser.parameters())


def test_half_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = seeded((4, 3, 4, 4), 0).bfloat16(), seeded((4, 6, 4, 4), 1).relu().bfloat16()
    loss = build_loss("ft")
    loss.probe(student, teacher)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(student.float(), teacher.float()))


def test_ft_errors_are_one_line() -> None:
    loss = build_loss("ft")
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="sized by a shape probe"):
        loss.reconstruction_loss(torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match="compares one feature per side; the student gave a list of 2"):
        loss.probe([torch.randn(2, 3, 4, 4)] * 2, torch.randn(2, 3, 4, 4))
    with pytest.raises(ShapeError, match=r"int\(1 \* 0.5\) = 0 channels .* \(2, 1, 4, 4\) .*raise rate") as err:
        loss.probe(torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4))
    assert "\n" not in str(err.value)
    for kwargs in ({"rate": 0}, {"p1": -2}, {"p2": float("nan")}):
        with pytest.raises(ConfigError) as err:
            build_loss("ft", **kwargs)
        assert "\n" not in str(err.value)


def test_the_pretrain_objective_is_the_reconstruction_and_trains_the_paraphraser_alone() -> None:
    student = seeded((4, 3, 4, 4), 0).float().requires_grad_()
    teacher = seeded((4, 6, 4, 4), 1).float().relu()
    loss = build_loss("ft")
    loss.set_objective("pretrain")
    loss.probe(student.detach(), teacher)
    assert all(p.requires_grad for p in loss.paraphraser.parameters())
    assert not any(p.requires_grad for p in loss.translator.parameters())
    sd = {k: v.double() for k, v in loss.state_dict().items()}
    expected = ((decode(encode(teacher.double(), sd), sd) - teacher.double()) ** 2).mean()
    value = loss(student, teacher)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    value.backward()
    assert student.grad is None  # the student is not part of the objective
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.paraphraser.parameters())

"""ReviewKD: ABF fusion and the HCL loss against a float64 re-computation with the ABFs' own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distkd.losses.reviewkd  # noqa: F401  (registers "reviewkd")
from distkd.data.batch import Batch
from distkd.distill.distiller import Distiller, Term
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x)


def conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[2:]
    x = torch.nn.functional.pad(x, (1, 1, 1, 1))
    return sum(torch.einsum("oc,nchw->nohw", weight[:, :, i, j], x[:, :, i:i + h, j:j + w])
               for i in range(3) for j in range(3))


def batch_norm(z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    mean = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (z - mean) / torch.sqrt(var + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest upsampling of a square map by an integer factor."""
    factor = size // x.shape[2]
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def block_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, _ = x.shape
    k = h // size
    return x.reshape(n, c, size, k, size, k).mean(dim=(3, 5))


def reference_hcl(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    loss, weight, total = ((y - t) ** 2).mean(), 1.0, 1.0
    for size in (4, 2, 1):
        if size < y.shape[2]:
            weight /= 2
            loss = loss + weight * ((block_mean(y, size) - block_mean(t, size)) ** 2).mean()
            total += weight
    return loss / total


def reference_review(student: list, teacher_sizes: list, sd: dict) -> list:
    """The ABF chain from the deepest level to the shallowest, float64, BatchNorm with batch statistics."""
    outputs, residual = [None] * len(student), None
    for level in reversed(range(len(student))):
        x = student[level] if student[level].dim() == 4 else student[level][:, :, None, None]
        p = f"abfs.{level}"
        x = batch_norm(conv1x1(x, sd[f"{p}.conv1.0.weight"]), sd[f"{p}.conv1.1.weight"], sd[f"{p}.conv1.1.bias"])
        if residual is not None:
            residual = nearest(residual, x.shape[2])
            logits = conv1x1(torch.cat([x, residual], dim=1), sd[f"{p}.att_conv.0.weight"])
            attention = 1 / (1 + torch.exp(-(logits + sd[f"{p}.att_conv.0.bias"].view(1, -1, 1, 1))))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if x.shape[2] != teacher_sizes[level]:
            x = nearest(x, teacher_sizes[level])
        outputs[level] = batch_norm(conv3x3(x, sd[f"{p}.conv2.0.weight"]), sd[f"{p}.conv2.1.weight"],
                                    sd[f"{p}.conv2.1.bias"])
        residual = x
    return outputs


CASES = {
    "equal sizes": ([(4, 3, 8, 8), (4, 4, 4, 4), (4, 5, 2, 2), (4, 6)],
                    [(4, 4, 8, 8), (4, 5, 4, 4), (4, 6, 2, 2), (4, 7)]),
    "teacher larger": ([(4, 3, 8, 8), (4, 4, 4, 4), (4, 5)], [(4, 4, 8, 8), (4, 6, 8, 8), (4, 7, 1, 1)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reviewkd_equals_the_float64_abf_and_hcl_formulas(case) -> None:
    s_shapes, t_shapes = CASES[case]
    student = [seeded(s, i) for i, s in enumerate(s_shapes)]
    teacher = [seeded(s, 10 + i) for i, s in enumerate(t_shapes)]
    loss = build_loss("reviewkd", max_mid_channels=4)
    loss.probe(student, teacher)
    assert loss.abfs[0].conv1[0].out_channels == 4 and loss.abfs[-1].att_conv is None  # min(4, C_s of the last)
    loss.double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    sd = loss.state_dict()
    value, parts = loss(student, teacher, return_parts=True, epoch=5, target=None)
    teacher_maps = [t if t.dim() == 4 else t[:, :, None, None] for t in teacher]
    outputs = reference_review(student, [t.shape[2] for t in teacher_maps], sd)
    levels = [reference_hcl(y, t) for y, t in zip(outputs, teacher_maps, strict=True)]
    torch.testing.assert_close(value, 5 / 20 * sum(levels), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["hcl"], sum(levels), rtol=1e-10, atol=1e-12)
    for i, e in enumerate(levels):
        torch.testing.assert_close(parts[f"level{i}"], e, rtol=1e-10, atol=1e-12)


def test_the_warm_up_ramps_from_epoch_one_and_caps_at_one() -> None:
    student, teacher = [seeded((2, 3, 4, 4), 0)], [seeded((2, 3, 4, 4), 1)]
    loss = build_loss("reviewkd")
    loss.probe(student, teacher)
    full = loss(student, teacher, epoch=20)
    torch.testing.assert_close(loss(student, teacher, epoch=1), full / 20)
    torch.testing.assert_close(loss(student, teacher, epoch=50), full)
    no_ramp = build_loss("reviewkd", warmup=0)
    no_ramp.probe(student, teacher)
    no_ramp.load_state_dict(loss.state_dict())
    torch.testing.assert_close(no_ramp(student, teacher), full)


def test_gradients_reach_the_student_and_every_abf_never_the_teacher() -> None:
    student = [seeded((3, 2, 4, 4), 0).float().requires_grad_(), seeded((3, 4), 1).float().requires_grad_()]
    teacher = [seeded((3, 3, 4, 4), 2).float().requires_grad_(), seeded((3, 5), 3).float().requires_grad_()]
    loss = build_loss("reviewkd")
    loss.probe([x.detach() for x in student], [x.detach() for x in teacher])
    loss(student, teacher, epoch=20).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)
    assert all(x.grad is None for x in teacher)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_half_precision_inputs_are_computed_in_float32() -> None:
    student, teacher = [seeded((3, 2, 4, 4), 0).half()], [seeded((3, 3, 4, 4), 1).half()]
    loss = build_loss("reviewkd", warmup=0)
    loss.probe(student, teacher)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss([student[0].float()], [teacher[0].float()]))


def test_reviewkd_runs_through_the_distiller_with_a_list_of_module_paths() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    keys = ["0", "2", "4"]
    distiller = Distiller(student, teacher, [Term("review", build_loss("reviewkd"), 5.0, keys, keys)])
    data = Batch(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    distiller.probe(data)
    review = distiller.term_losses[0][0]
    assert [abf.conv2[0].out_channels for abf in review.abfs] == [8, 8, 8]
    out = distiller(data, epoch=4)
    assert torch.isfinite(out.losses["review"]) and "review/hcl" in out.parts
    torch.testing.assert_close(out.losses["review"], 5.0 * 4 / 20 * out.parts["review/hcl"])


def test_reviewkd_errors_are_one_line() -> None:
    loss = build_loss("reviewkd")
    maps = [torch.randn(2, 3, 4, 4)]
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(maps, maps, epoch=1)
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match=r"compares 2-D or 4-D features; the teacher's feature 0 is \(2, 3, 4\)"):
        loss.probe(maps, [torch.randn(2, 3, 4)])
    loss.probe(maps, maps)
    with pytest.raises(ConfigError, match="needs epoch=") as err:
        loss(maps, maps)
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="got 1 and 2"):
        loss(maps, maps * 2, epoch=1)
    for kwargs in ({"warmup": -1}, {"max_mid_channels": 0}, {"max_mid_channels": 2.0}):
        with pytest.raises(ConfigError) as err:
            build_loss("reviewkd", **kwargs)
        assert "\n" not in str(err.value)

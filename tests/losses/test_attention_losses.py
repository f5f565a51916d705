"""AT and NST against plain float64 re-computations of the published formulas, gradients, invariances, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.attention import AT, NST


def feature_maps(shape: tuple[int, ...], seed: int, relu: bool = True) -> torch.Tensor:
    """Seeded float64 feature maps (post-ReLU by default, as the stage outputs the methods tap)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.relu() if relu else x


def block_mean(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average pooling (N, C, H, W) -> (N, C, h, w) for h | H and w | W (what adaptive pooling does then)."""
    n, c, h, w = x.shape
    fh, fw = h // size[0], w // size[1]
    return x.reshape(n, c, size[0], fh, size[1], fw).mean(axis=(3, 5))


def common_size(student: torch.Tensor, teacher: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as numpy, the larger pooled to the smaller's spatial size."""
    s, t = student.detach().double().numpy(), teacher.detach().double().numpy()
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    return block_mean(s, size), block_mean(t, size)


def reference_at(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> float:
    """Zagoruyko & Komodakis: mean over samples and positions of (a_s - a_t)^2, a = (mean_c f^p) / ||.||_2."""
    s, t = common_size(student, teacher)
    total, count = 0.0, 0
    for n in range(s.shape[0]):
        maps = []
        for f in (s[n], t[n]):
            q = [sum(f[c, y, x] ** p for c in range(f.shape[0])) / f.shape[0]
                 for y in range(f.shape[1]) for x in range(f.shape[2])]
            norm = max(math.sqrt(sum(v * v for v in q)), 1e-12)
            maps.append([v / norm for v in q])
        total += sum((a - b) ** 2 for a, b in zip(*maps, strict=True))
        count += len(maps[0])
    return total / count


def reference_nst(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Squared MMD with k(x, y) = (x.y)^2 between the unit-norm channel maps of each image, averaged."""
    s, t = common_size(student, teacher)

    def unit_channels(f: np.ndarray) -> list[np.ndarray]:
        rows = [f[c].ravel() for c in range(f.shape[0])]
        return [r / max(math.sqrt(float(np.dot(r, r))), 1e-12) for r in rows]

    def kernel_mean(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
        values = [float(np.dot(x, y)) ** 2 for a_n, b_n in zip(a, b, strict=True) for x in a_n for y in b_n]
        return sum(values) / len(values)

    us = [unit_channels(s[n]) for n in range(s.shape[0])]
    ut = [unit_channels(t[n]) for n in range(t.shape[0])]
    return kernel_mean(ut, ut) + kernel_mean(us, us) - 2 * kernel_mean(us, ut)


def one_line_error(kind: type[Exception], match: str, call) -> None:
    with pytest.raises(kind, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [
        ((4, 3, 4, 4), (4, 5, 4, 4)),  # same size, different channels
        ((3, 2, 8, 8), (3, 4, 4, 4)),  # the student's map is pooled
        ((3, 4, 2, 2), (3, 2, 6, 6)),  # the teacher's map is pooled
        ((2, 3, 8, 6), (2, 3, 4, 3)),  # non-square maps
    ],
)
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_equals_the_published_formula(student_shape, teacher_shape, p) -> None:
    student, teacher = feature_maps(student_shape, 0), feature_maps(teacher_shape, 1)
    value, parts = AT(p=p)(student, teacher, return_parts=True)
    assert parts == {}
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(reference_at(student, teacher, p), rel=1e-11, abs=1e-16)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [
        ((3, 4, 4, 4), (3, 6, 4, 4)),
        ((2, 3, 8, 8), (2, 5, 4, 4)),
        ((2, 3, 2, 2), (2, 2, 4, 4)),
        ((2, 2, 6, 4), (2, 3, 3, 2)),
    ],
)
def test_nst_equals_the_published_formula(student_shape, teacher_shape) -> None:
    student, teacher = feature_maps(student_shape, 2), feature_maps(teacher_shape, 3)
    value, parts = NST()(student, teacher, return_parts=True)
    assert parts == {}
    assert value.item() == pytest.approx(reference_nst(student, teacher), rel=1e-11, abs=1e-15)


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("loss", [AT(), NST()], ids=["at", "nst"])
def test_gradient_reaches_the_student_never_the_teacher(loss) -> None:
    student = feature_maps((3, 4, 6, 6), 4).requires_grad_()
    teacher = feature_maps((3, 5, 3, 3), 5).requires_grad_()
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("loss", [AT(), AT(p=3.0), NST()], ids=["at", "at_p3", "nst"])
def test_gradcheck(loss) -> None:
    student = (feature_maps((2, 3, 4, 4), 6, relu=False).abs() + 0.1).requires_grad_()
    teacher = feature_maps((2, 2, 2, 2), 7)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher), (student,))


# ----------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("loss", [AT(), NST()], ids=["at", "nst"])
def test_zero_when_the_student_equals_the_teacher(loss) -> None:
    maps = feature_maps((3, 4, 5, 5), 8)
    assert loss(maps, maps.clone()).item() == pytest.approx(0.0, abs=1e-15)


def test_at_is_invariant_to_positive_per_sample_scaling() -> None:
    student, teacher = feature_maps((4, 3, 4, 4), 9), feature_maps((4, 6, 4, 4), 10)
    scale = torch.tensor([0.1, 1.0, 7.0, 300.0], dtype=torch.float64).view(4, 1, 1, 1)
    torch.testing.assert_close(AT()(student * scale, teacher / scale), AT()(student, teacher), rtol=1e-12, atol=0)


def test_at_ignores_the_channel_order() -> None:
    student, teacher = feature_maps((3, 5, 4, 4), 11), feature_maps((3, 2, 4, 4), 12)
    shuffled = student[:, torch.tensor([3, 0, 4, 1, 2])]
    torch.testing.assert_close(AT()(shuffled, teacher), AT()(student, teacher), rtol=1e-12, atol=0)


def test_nst_is_invariant_to_per_channel_scaling_and_channel_order() -> None:
    # Each channel is one unit-norm sample of the MMD: scaling a channel or reordering them changes nothing.
    student, teacher = feature_maps((2, 4, 4, 4), 13), feature_maps((2, 3, 4, 4), 14)
    scale = torch.rand(2, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10 + 0.1
    changed = (student * scale)[:, torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(NST()(changed, teacher), NST()(student, teacher), rtol=1e-12, atol=0)


def test_the_larger_map_is_average_pooled() -> None:
    student, teacher = feature_maps((2, 3, 8, 8), 15), feature_maps((2, 4, 4, 4), 16)
    pooled = torch.nn.functional.avg_pool2d(student, 2)
    for loss in (AT(), NST()):
        torch.testing.assert_close(loss(student, teacher), loss(pooled, teacher), rtol=1e-12, atol=0)


@pytest.mark.parametrize("loss", [AT(), NST()], ids=["at", "nst"])
def test_low_precision_inputs_and_autocast_are_computed_in_float32(loss) -> None:
    student, teacher = feature_maps((2, 3, 4, 4), 17).float(), feature_maps((2, 5, 4, 4), 18).float()
    exact = loss(student, teacher)
    assert loss(student.bfloat16(), teacher.half()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("loss", [AT(), NST()], ids=["at", "nst"])
def test_unknown_context_is_ignored(loss) -> None:
    student, teacher = feature_maps((3, 2, 4, 4), 19), feature_maps((3, 2, 4, 4), 20)
    with_context = loss(student, teacher, target=torch.tensor([0, 1, 2]), index=torch.arange(3), epoch=4,
                        mask=torch.ones(3, dtype=torch.bool))
    assert with_context.item() == loss(student, teacher).item()


def test_registered_names() -> None:
    assert LOSSES.get("at") is AT and LOSSES.get("nst") is NST
    assert LOSSES.build("at", p=2.0).p == 2.0


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("p", [0, -2.0, float("nan"), float("inf"), "2", True, None])
def test_bad_p_is_a_one_line_config_error(p) -> None:
    one_line_error(ConfigError, "p must be a finite number > 0", lambda: AT(p=p))


@pytest.mark.parametrize("loss", [AT(), NST()], ids=["at", "nst"])
def test_wrong_shapes_are_one_line_shape_errors(loss) -> None:
    maps = feature_maps((2, 3, 4, 4), 21)
    one_line_error(ShapeError, r"float feature maps \(N, C, H, W\); the student's is \(2, 48\)",
                   lambda: loss(maps.flatten(1), maps))
    one_line_error(ShapeError, r"the teacher's is \(2, 3, 4, 4\) torch.int64",
                   lambda: loss(maps, maps.long()))
    one_line_error(ShapeError, "the teacher's is list", lambda: loss(maps, [maps]))
    one_line_error(ShapeError, r"\(2, 3, 4, 4\) and the teacher's \(3, 3, 4, 4\) hold different batch sizes",
                   lambda: loss(maps, feature_maps((3, 3, 4, 4), 22)))

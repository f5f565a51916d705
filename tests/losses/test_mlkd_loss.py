"""MLKD against a float64 loop re-computation of the released formulas, masks, gradients and errors."""

from __future__ import annotations

import pytest
import torch
from loss_inputs import logits
from losses_reference import instances, kl, softmax

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.mlkd import MLKD


def median(values: list[float]) -> float:
    """``numpy.percentile(values, 50)``: the middle value, or the mean of the two middle ones."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def gram(rows: list[list[float]], i: int, j: int) -> float:
    return sum(a * b for a, b in zip(rows[i], rows[j], strict=True))


def mlkd_reference(student, teacher, temperatures) -> tuple[float, float, float]:
    """(instance, batch, class) sums over the temperatures, each scaled by its mask's kept fraction."""
    rows_s, rows_t = instances(student), instances(teacher)
    n, c = len(rows_s), len(rows_s[0])
    p_t1 = [softmax(row, 1.0) for row in rows_t]
    confidence = [max(p) for p in p_t1]
    kept_instances = sum(v <= median(confidence) for v in confidence) / n
    class_confidence = [sum(p[j] for p in p_t1) for j in range(c)]
    kept_classes = sum(v <= median(class_confidence) for v in class_confidence) / c
    kd = bc = cc = 0.0
    for tau in temperatures:
        p_s = [softmax(row, tau) for row in rows_s]
        p_t = [softmax(row, tau) for row in rows_t]
        kd += tau**2 * sum(kl(p_t[i], p_s[i]) for i in range(n)) / n
        bc += sum((gram(p_t, i, j) - gram(p_s, i, j)) ** 2 for i in range(n) for j in range(n)) / n
        cols_s = [[p[k] for p in p_s] for k in range(c)]
        cols_t = [[p[k] for p in p_t] for k in range(c)]
        cc += sum((gram(cols_t, a, b) - gram(cols_s, a, b)) ** 2 for a in range(c) for b in range(c)) / c
    return kept_instances * kd, kept_instances * bc, kept_classes * cc


@pytest.mark.parametrize("shape", [(6, 5), (7, 4), (3, 8), (2, 2)])
@pytest.mark.parametrize("temperatures", [(4.0, 3.0, 5.0, 2.0, 6.0), (1.5,), [2, 3, 5, 2, 6]])
def test_mlkd_matches_loop_reference(shape, temperatures):
    student, teacher = logits(shape, 0), logits(shape, 1)
    loss, parts = MLKD(temperatures=temperatures)(student, teacher, return_parts=True)
    instance, batch, klass = mlkd_reference(student, teacher, [float(t) for t in temperatures])
    assert loss.item() == pytest.approx(instance + batch + klass, rel=1e-10, abs=1e-14)
    assert parts["instance"].item() == pytest.approx(instance, rel=1e-10, abs=1e-14)
    assert parts["batch"].item() == pytest.approx(batch, rel=1e-10, abs=1e-14)
    assert parts["class"].item() == pytest.approx(klass, rel=1e-10, abs=1e-14)


def test_mlkd_masks_scale_by_the_kept_fraction():
    # Odd N: the median is a sample's confidence, so (N + 1) / 2 of the N samples are kept.
    student, teacher = logits((5, 4), 2), logits((5, 4), 3)
    _, parts = MLKD(temperatures=[2.0])(student, teacher, return_parts=True)
    full = mlkd_reference(student, teacher, [2.0])
    assert parts["instance"].item() == pytest.approx(full[0], rel=1e-10)
    rows_s, rows_t = instances(student), instances(teacher)
    unmasked_kd = 4 * sum(kl(softmax(t, 2.0), softmax(s, 2.0)) for s, t in zip(rows_s, rows_t, strict=True)) / 5
    assert parts["instance"].item() == pytest.approx(3 / 5 * unmasked_kd, rel=1e-10)
    # Tied confidences (identical teacher rows) are all <= the median: nothing is masked.
    tied = logits((1, 4), 4).expand(5, 4)
    _, tied_parts = MLKD(temperatures=[2.0])(student, tied, return_parts=True)
    unmasked_kd = 4 * sum(kl(softmax(instances(tied)[0], 2.0), softmax(s, 2.0)) for s in rows_s) / 5
    assert tied_parts["instance"].item() == pytest.approx(unmasked_kd, rel=1e-10)


def test_mlkd_is_zero_for_equal_logits():
    student = logits((6, 5), 5)
    assert MLKD()(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_mlkd_gradcheck():
    student = logits((4, 3), 6).requires_grad_()
    teacher = logits((4, 3), 7)
    assert torch.autograd.gradcheck(lambda s: MLKD()(s, teacher), (student,))


def test_mlkd_teacher_gets_no_gradient_and_half_precision_runs_in_float32():
    student, teacher = logits((6, 5), 8).requires_grad_(), logits((6, 5), 9).requires_grad_()
    MLKD()(student, teacher, target=torch.zeros(6, dtype=torch.long), epoch=3).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    s16, t16 = logits((8, 6), 10, dtype=torch.bfloat16), logits((8, 6), 11, dtype=torch.bfloat16)
    value = MLKD()(s16, t16)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(MLKD()(s16.float(), t16.float()).item(), rel=1e-6)


def test_mlkd_built_by_name_with_the_released_temperatures():
    assert LOSSES.build("mlkd").temperatures == (4.0, 3.0, 5.0, 2.0, 6.0)


@pytest.mark.parametrize("temperatures", [[], [0], [1.0, -2.0], "456", 3.0, [float("inf")], [True]])
def test_mlkd_invalid_temperatures_are_a_one_line_config_error(temperatures):
    with pytest.raises(ConfigError, match="temperatures") as error:
        MLKD(temperatures=temperatures)
    assert "\n" not in str(error.value)


def test_mlkd_rejects_dense_logits_and_masks():
    with pytest.raises(ShapeError, match=r"\(N, C\).*\(2, 3, 4\)") as error:
        MLKD()(logits((2, 3, 4), 12), logits((2, 3, 4), 13))
    assert "\n" not in str(error.value)
    with pytest.raises(ShapeError, match="mask"):
        MLKD()(logits((4, 3), 14), logits((4, 3), 15), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ShapeError, match=r"\(4, 3\).*\(4, 2\)"):
        MLKD()(logits((4, 3), 14), logits((4, 2), 15))

"""DIST against a float64 loop re-computation, gradients, degenerate inputs and errors."""

from __future__ import annotations

import math

import pytest
import torch
from loss_inputs import logits, random_mask
from losses_reference import dist_loss, dist_terms

from distkd.errors import ConfigError, ShapeError, UnknownNameError
from distkd.losses import DIST, _relations, build_loss, list_losses

SHAPES = [(6, 5), (3, 4, 5), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tau": 4.0, "beta": 2.0, "gamma": 0.5},
        {"tau": 2.0, "tau_squared": False},
        {"activation": "sigmoid", "tau": 1.5},
    ],
)
def test_dist_matches_loop_reference(shape, masked, kwargs):
    student, teacher = logits(shape, 0), logits(shape, 1)
    mask = random_mask(shape, 2, keep_first=2) if masked else None
    loss, parts = DIST(**kwargs)(student, teacher, mask=mask, return_parts=True)
    expected = dist_loss(student, teacher, mask=mask, **kwargs)
    inter, intra = dist_terms(
        student, teacher, tau=kwargs.get("tau", 1.0), activation=kwargs.get("activation", "softmax"), mask=mask
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-10, abs=1e-12)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-10, abs=1e-12)


def test_dist_float32_matches_reference():
    student, teacher = logits((32, 10), 3, dtype=torch.float32), logits((32, 10), 4, dtype=torch.float32)
    loss = DIST(tau=4.0)(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(dist_loss(student, teacher, tau=4.0), rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 2, 3)])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_dist_gradcheck(shape, activation):
    student = logits(shape, 5).requires_grad_()
    teacher = logits(shape, 6)
    mask = random_mask(shape, 7, keep_first=2) if len(shape) > 2 else None
    loss = DIST(tau=2.0, gamma=1.5, activation=activation)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask=mask), (student,))


def test_teacher_receives_no_gradient():
    student = logits((4, 5), 8).requires_grad_()
    teacher = logits((4, 5), 9).requires_grad_()
    DIST()(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    student = logits((16, 7), 10, dtype=dtype).requires_grad_()
    teacher = logits((16, 7), 11, dtype=dtype)
    loss = DIST(tau=2.0)(student, teacher)
    assert loss.dtype == torch.float32
    expected = DIST(tau=2.0)(student.detach().float(), teacher.float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad.float()).all()


def finite_loss_and_grad(student, teacher, **kwargs):
    student = student.clone().requires_grad_()
    loss, parts = DIST(**kwargs)(student, teacher, return_parts=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    return loss, parts, student.grad


def test_one_instance_gives_intra_of_exactly_one():
    student, teacher = logits((1, 6), 12), logits((1, 6), 13)
    _, parts, _ = finite_loss_and_grad(student, teacher)
    assert parts["intra"].item() == 1.0
    assert parts["inter"].item() == pytest.approx(dist_terms(student, teacher)[0], rel=1e-10)


def test_identical_rows_and_constant_columns_are_finite():
    row = logits((1, 6), 14)
    loss, parts, _ = finite_loss_and_grad(row.repeat(5, 1), logits((5, 6), 15))
    assert parts["intra"].item() == pytest.approx(dist_terms(row.repeat(5, 1), logits((5, 6), 15))[1])
    uniform = torch.zeros(5, 6, dtype=torch.float64)
    loss, parts, _ = finite_loss_and_grad(uniform, uniform, activation="sigmoid")
    assert parts["inter"].item() == 1.0 and parts["intra"].item() == 1.0


def test_mask_keeping_nothing_gives_zero_loss_and_zero_gradient():
    shape = (2, 3, 4, 4)
    student = logits(shape, 16).requires_grad_()
    loss, parts = DIST(tau=2.0)(
        student, logits(shape, 17), mask=torch.zeros(2, 4, 4, dtype=torch.bool), return_parts=True
    )
    loss.backward()
    assert loss.item() == 0.0 and parts["inter"].item() == 0.0 and parts["intra"].item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


def test_nonfinite_values_at_masked_positions_do_not_leak():
    shape = (2, 3, 4)
    mask = random_mask(shape, 18, keep_first=2)
    student = logits(shape, 19)
    student[:, :, ~mask.any(0)] = float("nan")
    student = student.masked_fill(~mask[:, None], float("inf")).requires_grad_()
    teacher = logits(shape, 20).masked_fill(~mask[:, None], float("nan"))
    loss = DIST()(student, teacher, mask=mask)
    loss.backward()
    assert loss.item() == pytest.approx(dist_loss(student, teacher, mask=mask), rel=1e-10)
    assert torch.isfinite(student.grad).all()
    assert torch.count_nonzero(student.grad[~mask[:, None].expand(shape)]) == 0


def test_context_keys_it_does_not_use_are_ignored():
    student, teacher = logits((4, 5), 21), logits((4, 5), 22)
    plain = DIST()(student, teacher)
    with_context = DIST()(student, teacher, target=torch.zeros(4, dtype=torch.long), epoch=3)
    assert torch.equal(plain, with_context)


def test_build_loss_by_name():
    loss = build_loss("dist", tau=4, beta=2)
    assert isinstance(loss, DIST) and loss.tau == 4.0 and loss.beta == 2.0 and loss.gamma == 1.0
    assert "dist" in list_losses()


def test_unknown_loss_name_lists_known_ones():
    with pytest.raises(UnknownNameError, match="known: .*dist"):
        build_loss("distt")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tau": 0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"beta": -1}, "beta"),
        ({"gamma": "1"}, "gamma"),
        ({"activation": "relu"}, "activation"),
        ({"tau_squared": 1}, "tau_squared"),
        ({"global_intra": "yes"}, "global_intra"),
    ],
)
def test_invalid_configuration_raises_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DIST(**kwargs)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, mask_shape, message",
    [
        ((4, 5), (4, 6), None, r"\(4, 5\).*\(4, 6\)"),
        ((4, 1), (4, 1), None, "C >= 2"),
        ((4,), (4,), None, "at least 2 dims"),
        ((2, 3, 4, 4), (2, 3, 4, 4), (2, 4, 5), r"mask has shape \(2, 4, 5\).*\(2, 4, 4\)"),
        ((2, 3, 4, 4), (2, 3, 4, 4), (2, 3, 4, 4), r"mask has shape \(2, 3, 4, 4\)"),
    ],
)
def test_bad_shapes_raise_shape_error_naming_them(student_shape, teacher_shape, mask_shape, message):
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ShapeError, match=message):
        DIST()(torch.zeros(student_shape), torch.zeros(teacher_shape), mask=mask)
    assert issubclass(ShapeError, ValueError)


def test_non_bool_mask_is_rejected():
    with pytest.raises(ShapeError, match="bool"):
        DIST()(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), mask=torch.ones(2, 4))


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 3)])
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_chunked_cpu_computation_matches_reference(monkeypatch, shape, activation):
    # About 6 elements a chunk: several chunks of rows for (5, 3), of positions for the dense shape.
    monkeypatch.setattr(_relations, "CPU_CHUNK_ELEMENTS", max(1, 6 // torch.get_num_threads()))
    flat = torch.Size((shape[0], shape[1], math.prod(shape[2:])))
    assert len(_relations._chunk_spans(flat, torch.device("cpu"))[1]) >= 3
    student, teacher = logits(shape, 23), logits(shape, 24)
    mask = random_mask(shape, 25, keep_first=2) if len(shape) > 2 else None
    loss = DIST(tau=2.0, beta=0.7, activation=activation)
    expected = dist_loss(student, teacher, tau=2.0, beta=0.7, activation=activation, mask=mask)
    assert loss(student, teacher, mask=mask).item() == pytest.approx(expected, rel=1e-10)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask=mask), (student,))


def test_chunks_without_a_kept_position_add_nothing(monkeypatch):
    # Chunks of 2 positions along the last dim; the mask drops every position of chunks 2 and 3.
    monkeypatch.setattr(_relations, "CPU_CHUNK_ELEMENTS", max(1, 2 * 2 * 3 // torch.get_num_threads()))
    shape = (2, 3, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 2:6] = False
    student, teacher = logits(shape, 28), logits(shape, 29)
    loss = DIST(tau=2.0)
    assert loss(student, teacher, mask=mask).item() == pytest.approx(
        dist_loss(student, teacher, tau=2.0, mask=mask), rel=1e-10
    )
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher, mask=mask), (student,))


def test_rare_class_keeps_its_precision_in_float32(monkeypatch):
    # Class 0 has probability ~1e-4 everywhere, spread about as much: its column must be centred
    # about its own mean. Raw moments about a shift such as 1 / C cancel ~6 digits in float32 here
    # and turn that class's correlation from -0.03 into +0.58.
    monkeypatch.setattr(_relations, "CPU_CHUNK_ELEMENTS", 64)  # several chunks, merged
    student, teacher = logits((512, 5), 30, scale=1.0), logits((512, 5), 31, scale=1.0)
    student[:, 0] -= 9.0
    teacher[:, 0] -= 9.0
    _, exact = DIST()(student, teacher, return_parts=True)
    _, single = DIST()(student.float(), teacher.float(), return_parts=True)
    assert exact["intra"].item() == pytest.approx(dist_terms(student, teacher)[1], rel=1e-10)
    assert single["intra"].item() == pytest.approx(exact["intra"].item(), abs=1e-5)


@pytest.mark.parametrize("name", ["dist", "kd", "dkd"])
def test_losses_inside_cpu_autocast_equal_the_plain_call_in_float32(name):
    student, teacher = logits((16, 10), 26, dtype=torch.bfloat16), logits((16, 10), 27, dtype=torch.bfloat16)
    target = torch.arange(16) % 10
    loss = build_loss(name, tau=4.0)
    plain = loss(student, teacher, target=target, epoch=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(student, teacher, target=target, epoch=40)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, plain)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_chunks_on_worker_threads_equal_the_serial_sweep_bit_for_bit(monkeypatch, activation):
    # Two torch threads, 5 chunks: two workers each running its chunks' ops on one thread, against the same chunks
    # swept in the calling thread (workers switched off): the same ops on the same chunks, so the same bits.
    monkeypatch.setattr(_relations, "CPU_CHUNK_ELEMENTS", 2 * 3 * 4)
    shape = (2, 3, 8, 5)
    student, teacher = logits(shape, 32, dtype=torch.float32), logits(shape, 33, dtype=torch.float32)
    mask = random_mask(shape, 34, keep_first=2)
    loss = DIST(tau=2.0, activation=activation)
    before = torch.get_num_threads()
    results = {}
    try:
        torch.set_num_threads(2)
        assert len(_relations._chunk_spans(torch.Size((2, 3, 40)), torch.device("cpu"))[1]) == 5
        for min_chunks in (2, 10**9):  # workers, then the calling thread
            monkeypatch.setattr(_relations, "WORKER_MIN_CHUNKS", min_chunks)
            leaf = student.clone().requires_grad_()
            value = loss(leaf, teacher, mask=mask)
            value.backward()
            results[min_chunks] = (value.detach(), leaf.grad)
            assert torch.get_num_threads() == 2  # restored after the workers ran
    finally:
        torch.set_num_threads(before)
    (worker_value, worker_grad), (serial_value, serial_grad) = results.values()
    assert torch.equal(worker_value, serial_value)
    assert torch.equal(worker_grad, serial_grad)
    assert worker_value.item() == pytest.approx(dist_loss(student.double(), teacher.double(), tau=2.0,
                                                          activation=activation, mask=mask), rel=1e-5)

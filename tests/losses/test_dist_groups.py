"""DIST's ``intra_group_size``: the intra-class term over consecutive groups of the batch (the authors' per-GPU
batch on one process), against a float64 loop re-computation written here."""

from __future__ import annotations

import math

import pytest
import torch

from distkd.errors import ConfigError
from distkd.losses import DIST, build_loss


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (na * nb + 1e-8)


def _softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    e = [math.exp((v - top) / tau) for v in row]
    return [v / sum(e) for v in e]


def reference(student: torch.Tensor, teacher: torch.Tensor, group: int, tau: float, beta: float, gamma: float,
              keep: torch.Tensor | None = None) -> tuple[float, float, float]:
    """Loop re-computation on ``(N, C, S)`` logits: the instances of sample ``n`` are its ``S`` positions; inter the
    mean over kept instances; intra the mean over the groups with a kept instance of (1 - mean over classes of the
    column correlation inside the group)."""
    n, c, s = student.shape
    rows = []  # (group, student probabilities, teacher probabilities) of every kept instance
    for i in range(n):
        for p in range(s):
            if keep is None or keep[i, p]:
                rows.append((i // group, _softmax(student[i, :, p].tolist(), tau),
                             _softmax(teacher[i, :, p].tolist(), tau)))
    inter = sum(1 - _pearson(ys, yt) for _, ys, yt in rows) / len(rows)
    intras = []
    for g in sorted({g for g, _, _ in rows}):
        members = [(ys, yt) for k, ys, yt in rows if k == g]
        rho = [_pearson([ys[j] for ys, _ in members], [yt[j] for _, yt in members]) for j in range(c)]
        intras.append(1 - sum(rho) / c)
    intra = sum(intras) / len(intras)
    return tau**2 * (beta * inter + gamma * intra), inter, intra


def test_grouped_intra_term_matches_the_loop_recomputation() -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(12, 5, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(12, 5, generator=gen, dtype=torch.float64) * 3
    loss, parts = DIST(beta=2.0, gamma=2.0, tau=4.0, intra_group_size=4)(student, teacher, return_parts=True)
    want, inter, intra = reference(student[..., None], teacher[..., None], 4, 4.0, 2.0, 2.0)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert parts["inter"].item() == pytest.approx(inter, rel=1e-10)
    assert parts["intra"].item() == pytest.approx(intra, rel=1e-10)
    whole = DIST(beta=2.0, gamma=2.0, tau=4.0)(student, teacher, return_parts=True)[1]
    assert parts["inter"].item() == pytest.approx(whole["inter"].item(), rel=1e-12)  # inter does not depend on groups
    assert abs(parts["intra"].item() - whole["intra"].item()) > 1e-3  # intra does


def test_masked_dense_groups_match_the_loop_recomputation_and_skip_an_empty_group() -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(6, 4, 2, 3, generator=gen, dtype=torch.float64)
    teacher = torch.randn(6, 4, 2, 3, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 2, 3, generator=gen) > 0.3
    mask[2:4] = False  # the second group of two samples keeps nothing: it is left out of the intra mean
    loss, parts = DIST(tau=2.0, intra_group_size=2)(student, teacher, mask=mask, return_parts=True)
    want, inter, intra = reference(student.flatten(2), teacher.flatten(2), 2, 2.0, 1.0, 1.0, mask.flatten(1))
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert (parts["inter"].item(), parts["intra"].item()) == pytest.approx((inter, intra), rel=1e-10)


def test_one_process_with_groups_equals_the_mean_of_per_gpu_losses_and_its_gradient() -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(8, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 6, generator=gen, dtype=torch.float64)
    grouped = DIST(tau=1.0, intra_group_size=2)
    (grad,) = torch.autograd.grad(grouped(student, teacher), student)
    per_gpu = torch.stack([DIST(tau=1.0)(student[i : i + 2], teacher[i : i + 2]) for i in range(0, 8, 2)]).mean()
    (want,) = torch.autograd.grad(per_gpu, student)  # what DDP's average of 4 GPUs' gradients gives
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda s: grouped(s, teacher), (student.detach().requires_grad_(),))


def test_bad_group_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="intra_group_size=4 does not divide this process's batch of 6 samples"):
        DIST(intra_group_size=4)(torch.randn(6, 3), torch.randn(6, 3))
    with pytest.raises(ConfigError, match="global_intra .* and intra_group_size .* exclude each other"):
        build_loss("dist", global_intra=True, intra_group_size=32)
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ConfigError, match="intra_group_size must be an integer >= 2"):
            DIST(intra_group_size=bad)

"""CRD: the NCE loss against a float64 re-computation at fixed negatives, the memory-bank update rule, the
normalisation constants, the seeded (and resumable) negative sampler, and the run through the Distiller."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distkd.losses.crd  # noqa: F401  (registers "crd")
from distkd.data.batch import Batch
from distkd.distill.distiller import Distiller, Term
from distkd.errors import ConfigError, ShapeError
from distkd.losses import build_loss

N, D_S, D_T, SIZE, K = 6, 5, 7, 40, 9


def seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    z = x.reshape(x.shape[0], -1) @ weight.T + bias
    return z / torch.sqrt((z ** 2).sum(dim=1, keepdim=True))


def nce(scores: torch.Tensor, z: float, dataset_size: int) -> torch.Tensor:
    """RepDistiller's Eq. 18 with explicit loops: positive in column 0, K negatives after it."""
    p = scores / z
    n, k = p.shape[0], p.shape[1] - 1
    noise = k / dataset_size
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        total = total + torch.log(p[i, 0] / (p[i, 0] + noise + 1e-7))
        for j in range(1, k + 1):
            total = total + torch.log(noise / (p[i, j] + noise + 1e-7))
    return -total / n


def scores(bank: torch.Tensor, rows: torch.Tensor, anchor: torch.Tensor, t: float) -> torch.Tensor:
    out = torch.zeros(rows.shape, dtype=torch.float64)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[i, j] = torch.exp((bank[rows[i, j]] * anchor[i]).sum() / t)
    return out


def probed(**kwargs) -> nn.Module:
    loss = build_loss("crd", nce_k=K, **kwargs)
    loss.probe(seeded((N, D_S), 0), seeded((N, D_T), 1), dataset_size=SIZE)
    return loss


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(SIZE, generator=gen)[:N]
    target = torch.randint(0, 4, (N,), generator=gen)
    return seeded((N, D_S), seed + 1), seeded((N, D_T, 1, 1), seed + 2), index, target


def test_the_loss_and_the_bank_update_equal_the_float64_formulas_at_fixed_negatives() -> None:
    loss = probed(nce_t=0.1, nce_m=0.3)
    loss.double()
    student, teacher, index, target = batch(10)
    rows = torch.cat([index[:, None], torch.randint(0, SIZE, (N, K), generator=torch.Generator().manual_seed(3))], 1)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    value, parts = loss(student, teacher, return_parts=True, index=index, target=target, contrast_index=rows, epoch=2)

    e_s = embed(student, before["embed_student.linear.weight"], before["embed_student.linear.bias"])
    e_t = embed(teacher, before["embed_teacher.linear.weight"], before["embed_teacher.linear.bias"])
    scores_s = scores(before["memory_teacher"], rows, e_s, 0.1)  # the student anchors against the teacher's bank
    scores_t = scores(before["memory_student"], rows, e_t, 0.1)
    z_s, z_t = scores_s.mean().item() * SIZE, scores_t.mean().item() * SIZE  # set at the first training step
    torch.testing.assert_close(parts["student_anchor"], nce(scores_s, z_s, SIZE), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["teacher_anchor"], nce(scores_t, z_t, SIZE), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, nce(scores_s, z_s, SIZE) + nce(scores_t, z_t, SIZE), rtol=1e-10, atol=1e-12)

    after = loss.state_dict()
    torch.testing.assert_close(after["z"], torch.tensor([z_s, z_t], dtype=torch.float64), rtol=1e-12, atol=0)
    others = torch.ones(SIZE, dtype=torch.bool)
    others[index] = False
    for bank, e in (("memory_student", e_s), ("memory_teacher", e_t)):
        mixed = 0.3 * before[bank][index] + 0.7 * e.detach()
        want = mixed / torch.sqrt((mixed ** 2).sum(dim=1, keepdim=True))
        torch.testing.assert_close(after[bank][index], want, rtol=1e-12, atol=1e-14)
        assert torch.equal(after[bank][others], before[bank][others])
    assert torch.equal(after["labels"][index], target) and bool((after["labels"][others] == -1).all())


def test_a_later_step_keeps_the_first_normalisation_constants_and_reads_the_updated_bank() -> None:
    loss = probed()
    loss.double()
    student, teacher, index, target = batch(10)
    loss(student, teacher, index=index, target=target)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    student, teacher, index, target = batch(20)
    rows = torch.cat([index[:, None], torch.randint(0, SIZE, (N, K), generator=torch.Generator().manual_seed(4))], 1)
    value = loss(student, teacher, index=index, target=target, contrast_index=rows)
    e_s = embed(student, state["embed_student.linear.weight"], state["embed_student.linear.bias"])
    e_t = embed(teacher, state["embed_teacher.linear.weight"], state["embed_teacher.linear.bias"])
    z_s, z_t = state["z"].tolist()
    expected = (nce(scores(state["memory_teacher"], rows, e_s, 0.07), z_s, SIZE)
                + nce(scores(state["memory_student"], rows, e_t, 0.07), z_t, SIZE))
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.z, state["z"], rtol=0, atol=0)


def test_the_banks_start_uniform_in_the_repdistiller_range_and_eval_mode_changes_no_state() -> None:
    loss = build_loss("crd", nce_k=K, feat_dim=12)
    loss.probe(seeded((N, D_S), 0), seeded((N, D_T), 1), dataset_size=SIZE)
    bound = 1 / (12 / 3) ** 0.5
    for bank in (loss.memory_student, loss.memory_teacher):
        assert bank.shape == (SIZE, 12) and float(bank.abs().max()) <= bound and float(bank.abs().max()) > bound / 2
    assert not torch.equal(loss.memory_student, loss.memory_teacher)
    assert torch.equal(loss.memory_student, probed_with_feat_dim(12).memory_student)  # seeded, not global RNG
    loss.eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    student, teacher, index, target = batch(10)
    value = loss(student.float(), teacher.float(), index=index, target=target)
    assert torch.isfinite(value)
    assert all(torch.equal(v, loss.state_dict()[k]) for k, v in before.items())


def probed_with_feat_dim(feat_dim: int) -> nn.Module:
    torch.manual_seed(123)  # the global RNG differs; the banks must not
    loss = build_loss("crd", nce_k=K, feat_dim=feat_dim)
    loss.probe(seeded((N, D_S), 0), seeded((N, D_T), 1), dataset_size=SIZE)
    return loss


def test_other_class_negatives_avoid_the_anchors_class_without_replacement_when_possible() -> None:
    loss = probed()
    loss.labels.copy_(torch.arange(SIZE) % 4)
    loss.labels[:4] = -1  # not seen yet: counted as other-class
    index, target = torch.tensor([4, 5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 3, 0, 1])
    negatives = loss.sample_negatives(index, target)
    assert negatives.shape == (N, K) and negatives.dtype == torch.int64
    labels = loss.labels[negatives]
    assert bool((labels != target[:, None]).all()) and bool((negatives != index[:, None]).all())
    assert all(len(set(row.tolist())) == K for row in negatives)  # without replacement: 30+ candidates, K = 9
    many = build_loss("crd", nce_k=35)  # more negatives than the 30 other-class rows: drawn with replacement
    many.probe(seeded((N, D_S), 0), seeded((N, D_T), 1), dataset_size=SIZE)
    many.labels.copy_(torch.arange(SIZE) % 4)
    negatives = many.sample_negatives(index, target)
    assert negatives.shape == (N, 35) and bool((many.labels[negatives] != target[:, None]).all())


def test_draws_are_seeded_count_training_steps_and_resume_exactly_from_the_state_dict() -> None:
    index, target = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 2, 3, 0, 1])
    first, second = probed(seed=7), probed(seed=7)
    draws = [first.sample_negatives(index, target) for _ in range(3)]
    assert int(first.draws) == 3 and not torch.equal(draws[0], draws[1])
    assert torch.equal(second.sample_negatives(index, target), draws[0])  # same seed, same stream
    assert not torch.equal(probed(seed=8).sample_negatives(index, target), draws[0])
    resumed = probed(seed=7)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.sample_negatives(index, target), first.sample_negatives(index, target))
    first.eval()
    peek = first.sample_negatives(index, target)
    assert int(first.draws) == 4 and torch.equal(peek, first.sample_negatives(index, target))


def test_a_forward_without_contrast_index_contrasts_the_positive_with_the_sampled_negatives() -> None:
    loss = probed(negatives="uniform")
    twin = copy.deepcopy(loss)
    student, teacher, index, _ = batch(10)
    value = loss(student.float(), teacher.float(), index=index)
    rows = torch.cat([index[:, None], twin.sample_negatives(index)], dim=1)
    assert rows.shape == (N, K + 1) and int(rows.max()) < SIZE
    torch.testing.assert_close(value, twin(student.float(), teacher.float(), index=index, contrast_index=rows))


def test_gradients_reach_the_student_and_both_heads_never_the_teacher() -> None:
    loss = probed()
    student, teacher, index, target = batch(10)
    student, teacher = student.float().requires_grad_(), teacher.float().requires_grad_()
    loss(student, teacher, index=index, target=target).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert {name for name, _ in loss.named_parameters()} == {
        "embed_student.linear.weight", "embed_student.linear.bias", "embed_teacher.linear.weight",
        "embed_teacher.linear.bias"}


def test_half_precision_inputs_are_computed_in_float32() -> None:
    loss = probed().eval()
    student, teacher, index, target = batch(10)
    value = loss(student.bfloat16(), teacher.bfloat16(), index=index, target=target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, loss(student.bfloat16().float(), teacher.bfloat16().float(), index=index,
                                           target=target))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the heads may run in bf16, the contrast stays float32
        mixed = loss(student.float(), teacher.float(), index=index, target=target)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, value, rtol=0.05, atol=0)


def test_crd_runs_through_the_distillers_probe_and_step_with_batch_indices() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    teacher = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    term = Term("crd", build_loss("crd", nce_k=K), 0.8, student_key="3", teacher_key="3")
    distiller = Distiller(student, teacher, [term])
    images = torch.randn(N, 3, 6, 6)
    data = Batch(images, torch.tensor([0, 1, 2, 3, 4, 0]), index=torch.tensor([3, 9, 12, 20, 31, 39]))
    distiller.probe(data, dataset_size=SIZE)
    crd = distiller.term_losses[0][0]
    assert crd.memory_student.shape == (SIZE, 128) and crd.embed_teacher.linear.in_features == 6
    assert int(crd.draws) == 0 and bool((crd.z < 0).all())  # the probe changes no buffer
    out = distiller(data, epoch=1)
    assert torch.isfinite(out.losses["crd"]) and set(out.parts) == {"crd/student_anchor", "crd/teacher_anchor"}
    assert int(crd.draws) == 1 and bool((crd.z > 0).all()) and torch.equal(crd.labels[data.index], data.target)
    out.losses["crd"].backward()
    assert all(p.grad is not None for _, params in distiller.term_parameters() for p in params)


def test_crd_errors_are_one_line() -> None:
    loss = build_loss("crd")
    with pytest.raises(ShapeError, match="sized by a shape probe") as err:
        loss(torch.randn(2, 3), torch.randn(2, 3), index=torch.arange(2))
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="probe with dataset_size") as err:
        loss.probe(torch.randn(2, 3), torch.randn(2, 3))
    assert "\n" not in str(err.value)
    loss = probed()
    student, teacher, index, target = batch(10)
    with pytest.raises(ShapeError, match=r"needs index=<int tensor \(6,\)>") as err:
        loss(student, teacher, target=target)
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match="outside"):
        loss(student, teacher, index=index + SIZE, target=target)
    with pytest.raises(ShapeError, match="other-class negatives need target") as err:
        loss(student, teacher, index=index)
    assert "\n" not in str(err.value)
    with pytest.raises(ShapeError, match=r"contrast_index must be an int tensor \(6, 10\)"):
        loss(student, teacher, index=index, target=target, contrast_index=torch.zeros(6, 3, dtype=torch.long))
    for kwargs in ({"nce_k": 0}, {"feat_dim": 1.5}, {"nce_t": 0}, {"nce_m": 1.5}, {"nce_m": -0.1},
                   {"negatives": "random"}, {"seed": -1}, {"seed": 2**31}):
        with pytest.raises(ConfigError) as err:
            build_loss("crd", **kwargs)
        assert "\n" not in str(err.value)

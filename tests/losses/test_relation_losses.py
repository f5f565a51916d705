"""SP, CC, RKD, PKT and KDSVD against plain float64 re-computations of the published formulas, gradients,
invariances and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses.relation import CC, KDSVD, PKT, RKD, SP


def features(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded float64 features, normal."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rows(x: torch.Tensor) -> np.ndarray:
    """Each sample's features as one float64 row."""
    return x.detach().double().reshape(x.shape[0], -1).numpy()


def huber(x: float) -> float:
    """smooth L1 with beta = 1."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(math.sqrt(float(np.dot(v, v))), 1e-12)


def reference_sp(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Tung & Mori: ||G_t - G_s||_F^2 / N^2, G = f f^T with each row at unit L2 norm."""
    s, t = rows(student), rows(teacher)
    n = s.shape[0]
    total = 0.0
    for i in range(n):
        g_s = unit(np.array([np.dot(s[i], s[j]) for j in range(n)]))
        g_t = unit(np.array([np.dot(t[i], t[j]) for j in range(n)]))
        total += sum((a - b) ** 2 for a, b in zip(g_t, g_s, strict=True))
    return total / n**2


def reference_cc(student: torch.Tensor, teacher: torch.Tensor, loss: CC) -> float:
    """RepDistiller's CC: mean over neighbouring samples of sum_d |delta_i,d| |delta_i+1,d|, delta = e_s - e_t."""
    w_s, b_s = loss.student_embed.weight.detach().double().numpy(), loss.student_embed.bias.detach().double().numpy()
    w_t, b_t = loss.teacher_embed.weight.detach().double().numpy(), loss.teacher_embed.bias.detach().double().numpy()
    s, t = rows(student), rows(teacher)
    delta = [np.abs((w_s @ s[i] + b_s) - (w_t @ t[i] + b_t)) for i in range(s.shape[0])]
    terms = [sum(a * b for a, b in zip(delta[i], delta[i + 1], strict=True)) for i in range(len(delta) - 1)]
    return sum(terms) / len(terms)


def distances(x: np.ndarray) -> list[list[float]]:
    n = x.shape[0]
    d = [[math.sqrt(sum((x[i] - x[j]) ** 2)) if i != j else 0.0 for j in range(n)] for i in range(n)]
    positive = [v for row in d for v in row if v > 0]
    mean = sum(positive) / len(positive)
    return [[v / mean for v in row] for row in d]


def angles(x: np.ndarray) -> list[float]:
    n = x.shape[0]
    out = []
    for i in range(n):
        directions = [unit(x[j] - x[i]) if j != i else np.zeros_like(x[i]) for j in range(n)]
        out += [float(np.dot(directions[j], directions[k])) for j in range(n) for k in range(n)]
    return out


def reference_rkd(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """Park et al.: mean Huber of the mean-normalised distances, and of the cosines of all triplet angles."""
    s, t = rows(student), rows(teacher)
    d_s, d_t = distances(s), distances(t)
    distance = [huber(a - b) for row_s, row_t in zip(d_s, d_t, strict=True) for a, b in zip(row_s, row_t, strict=True)]
    angle = [huber(a - b) for a, b in zip(angles(s), angles(t), strict=True)]
    return sum(distance) / len(distance), sum(angle) / len(angle)


def reference_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    """Passalis & Tefas: p(j|i) from cosine similarities scaled to [0, 1]; mean of p_t log((p_t + eps)/(p_s + eps))."""
    def conditional(x: np.ndarray) -> list[list[float]]:
        u = [v / (math.sqrt(float(np.dot(v, v))) + eps) for v in x]
        k = [[(float(np.dot(a, b)) + 1) / 2 for b in u] for a in u]
        return [[v / sum(row) for v in row] for row in k]

    p_s, p_t = conditional(rows(student)), conditional(rows(teacher))
    values = [t * math.log((t + eps) / (s + eps))
              for row_s, row_t in zip(p_s, p_t, strict=True) for s, t in zip(row_s, row_t, strict=True)]
    return sum(values) / len(values)


def reference_kdsvd(student: list[torch.Tensor], teacher: list[torch.Tensor], k: int = 1) -> list[float]:
    """Lee et al. as RepDistiller: per consecutive pair of stages, sum (rbf_s - rbf_t)^2 / N.

    The singular vectors come from torch.linalg.svd of each (H*W, C) matrix, one image at a time: the loss depends on
    their signs, so the re-computation must use the same routine as the loss.
    """
    n = student[0].shape[0]

    def right_vectors(f: torch.Tensor, image: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = f[image].detach().double().reshape(f.shape[1], -1).T.contiguous()  # (H*W, C)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v, s = vh.T.numpy()[:, :count], s.numpy()[:count]
        return np.stack([unit(v[:, m]) for m in range(v.shape[1])], 1), unit(s)

    stages = []  # per stage, per image: (student vectors, teacher vectors), each (C, k), scaled
    for f_s, f_t in zip(student, teacher, strict=True):
        per_image = []
        for image in range(n):
            v_t, s_t = right_vectors(f_t, image, k)
            v_s, _ = right_vectors(f_s, image, k + 3)
            aligned = np.zeros_like(v_t)
            for j in range(v_t.shape[1]):
                cosines = [float(np.dot(v_s[:, m], v_t[:, j])) for m in range(v_s.shape[1])]
                best = max(range(len(cosines)), key=lambda m: abs(cosines[m]))  # noqa: B023
                aligned[:, j] = math.copysign(1.0, cosines[best]) * v_s[:, best]
            per_image.append((aligned * s_t, v_t * s_t))
        stages.append(per_image)
    losses = []
    for i in range(1, len(stages)):
        total = 0.0
        for image in range(n):
            (v_s, v_t), (b_s, b_t) = stages[i][image], stages[i - 1][image]
            for a in range(v_s.shape[0]):
                for b in range(b_s.shape[0]):
                    for m in range(v_s.shape[1]):
                        rbf_s = math.exp(-((v_s[a, m] - b_s[b, m]) ** 2) / 8)
                        rbf_t = math.exp(-((v_t[a, m] - b_t[b, m]) ** 2) / 8)
                        total += (rbf_s - rbf_t) ** 2
        losses.append(total / n)
    return losses


def stage_maps(seed: int, n: int = 3, shapes=((4, 4, 4), (6, 2, 2), (8, 2, 2))) -> list[torch.Tensor]:
    return [features((n, *shape), seed + i) for i, shape in enumerate(shapes)]


def probed_cc(student: torch.Tensor, teacher: torch.Tensor, **kwargs) -> CC:
    torch.manual_seed(0)
    loss = CC(**kwargs)
    loss.probe(student, teacher)
    return loss


def one_line_error(kind: type[Exception], match: str, call) -> None:
    with pytest.raises(kind, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [((6, 5), (6, 9)), ((5, 3, 2, 2), (5, 4, 3, 3))])
def test_sp_equals_the_published_formula(student_shape, teacher_shape) -> None:
    student, teacher = features(student_shape, 0), features(teacher_shape, 1)
    value, parts = SP()(student, teacher, return_parts=True)
    assert parts == {} and value.dim() == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(reference_sp(student, teacher), rel=1e-11, abs=1e-16)


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [((7, 5), (7, 9)), ((4, 2, 2, 2), (4, 12))])
@pytest.mark.parametrize("embed_dim", [128, 3])
def test_cc_equals_the_reference_formula(student_shape, teacher_shape, embed_dim) -> None:
    student, teacher = features(student_shape, 2), features(teacher_shape, 3)
    loss = probed_cc(student, teacher, embed_dim=embed_dim)
    assert loss.student_embed.out_features == loss.teacher_embed.out_features == embed_dim
    assert loss.student_embed.in_features == math.prod(student_shape[1:])
    assert loss.teacher_embed.in_features == math.prod(teacher_shape[1:])
    value, parts = loss(student, teacher, return_parts=True)
    assert parts == {}
    assert value.item() == pytest.approx(reference_cc(student, teacher, loss), rel=1e-11)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"), [((6, 4), (6, 7)), ((5, 2, 2, 2), (5, 3)), ((2, 3), (2, 5))]
)
@pytest.mark.parametrize(("distance_weight", "angle_weight"), [(25.0, 50.0), (1.0, 0.0)])
def test_rkd_equals_the_published_formula(student_shape, teacher_shape, distance_weight, angle_weight) -> None:
    student, teacher = features(student_shape, 4), 3 * features(teacher_shape, 5)
    loss = RKD(distance_weight=distance_weight, angle_weight=angle_weight)
    value, parts = loss(student, teacher, return_parts=True)
    distance, angle = reference_rkd(student, teacher)
    assert parts["distance"].item() == pytest.approx(distance, rel=1e-10)
    assert parts["angle"].item() == pytest.approx(angle, rel=1e-10)
    assert value.item() == pytest.approx(distance_weight * distance + angle_weight * angle, rel=1e-10)
    assert not parts["distance"].requires_grad and not parts["angle"].requires_grad


def test_rkd_huber_switches_to_l1_for_large_differences() -> None:
    # a far outlier makes some normalised distances differ by more than 1: the |x| - 0.5 branch is exercised
    student = features((5, 3), 6)
    student[0] += 40.0
    teacher = features((5, 3), 7)
    distance, angle = reference_rkd(student, teacher)
    _, parts = RKD()(student, teacher, return_parts=True)
    assert parts["distance"].item() == pytest.approx(distance, rel=1e-10)
    assert parts["angle"].item() == pytest.approx(angle, rel=1e-10)


@pytest.mark.parametrize(("student_shape", "teacher_shape"), [((6, 5), (6, 8)), ((3, 4), (3, 4))])
@pytest.mark.parametrize("eps", [1e-7, 1e-3])
def test_pkt_equals_the_published_formula(student_shape, teacher_shape, eps) -> None:
    student, teacher = features(student_shape, 8), features(teacher_shape, 9).relu()
    value, parts = PKT(eps=eps)(student, teacher, return_parts=True)
    assert parts == {}
    assert value.item() == pytest.approx(reference_pkt(student, teacher, eps), rel=1e-10, abs=1e-16)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_equals_the_published_formula(k) -> None:
    student, teacher = stage_maps(10), stage_maps(20)
    value, parts = KDSVD(k=k)(student, teacher, return_parts=True)
    expected = reference_kdsvd(student, teacher, k)
    assert sorted(parts) == ["stages_0_1", "stages_1_2"]
    assert parts["stages_0_1"].item() == pytest.approx(expected[0], rel=1e-9)
    assert parts["stages_1_2"].item() == pytest.approx(expected[1], rel=1e-9)
    assert value.item() == pytest.approx(sum(expected), rel=1e-9)


def test_kdsvd_student_and_teacher_spatial_sizes_may_differ() -> None:
    student = stage_maps(30, shapes=((4, 4, 4), (6, 4, 4)))
    teacher = stage_maps(40, shapes=((4, 8, 8), (6, 2, 2)))
    value = KDSVD()(student, teacher)
    assert value.item() == pytest.approx(sum(reference_kdsvd(student, teacher)), rel=1e-9)


# ----------------------------------------------------------------------------------------------- gradients


PAIRWISE = [SP(), RKD(), PKT()]
PAIRWISE_IDS = ["sp", "rkd", "pkt"]


@pytest.mark.parametrize("loss", PAIRWISE, ids=PAIRWISE_IDS)
def test_gradient_reaches_the_student_never_the_teacher(loss) -> None:
    student, teacher = features((6, 5), 50).requires_grad_(), features((6, 7), 51).requires_grad_()
    loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0 and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("loss", [*PAIRWISE, RKD(distance_weight=0.0), RKD(angle_weight=0.0)],
                         ids=[*PAIRWISE_IDS, "rkd_angle", "rkd_distance"])
def test_gradcheck(loss) -> None:
    student, teacher = features((4, 3), 52).requires_grad_(), features((4, 5), 53)
    assert torch.autograd.gradcheck(lambda s: loss(s, teacher), (student,))


def test_cc_trains_both_embeddings_but_never_the_teacher_features() -> None:
    student, teacher = features((5, 4), 54).requires_grad_(), features((5, 6), 55).requires_grad_()
    loss = probed_cc(student.detach(), teacher.detach())
    assert sum(p.numel() for p in loss.parameters()) == (4 + 1) * 128 + (6 + 1) * 128
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    embed_grad = torch.autograd.gradcheck(lambda s: loss(s, teacher.detach()), (student.detach().requires_grad_(),))
    assert embed_grad


def test_kdsvd_gradient_reaches_every_student_stage_never_the_teacher() -> None:
    student = [x.requires_grad_() for x in stage_maps(60)]
    teacher = [x.requires_grad_() for x in stage_maps(70)]
    KDSVD()(student, teacher).backward()
    assert all(x.grad is None for x in teacher)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all() for x in student)


def test_kdsvd_gradcheck() -> None:
    student, teacher = stage_maps(80, n=2), stage_maps(90, n=2)
    assert torch.autograd.gradcheck(lambda *s: KDSVD()(list(s), teacher),
                                    tuple(x.requires_grad_() for x in student))


# ----------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("loss", PAIRWISE, ids=PAIRWISE_IDS)
def test_zero_when_the_student_equals_the_teacher(loss) -> None:
    x = features((6, 5), 100)
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-14)


def test_kdsvd_is_zero_when_the_student_equals_the_teacher() -> None:
    maps = stage_maps(110)
    assert KDSVD()(maps, [x.clone() for x in maps]).item() == pytest.approx(0.0, abs=1e-14)


def test_cc_is_zero_when_both_embeddings_agree() -> None:
    x = features((5, 4), 120)
    loss = probed_cc(x, x)
    loss.teacher_embed.load_state_dict(loss.student_embed.state_dict())
    assert loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-14)


def test_rkd_ignores_scale_rotation_and_translation_of_the_student() -> None:
    teacher = features((6, 4), 130)
    rotation, _ = torch.linalg.qr(features((4, 4), 131))
    student = 7.5 * teacher @ rotation + features((1, 4), 132)
    value, parts = RKD()(student, teacher, return_parts=True)
    assert value.item() == pytest.approx(0.0, abs=1e-20)
    assert parts["distance"].item() == pytest.approx(0.0, abs=1e-20)


def test_pkt_ignores_positive_per_sample_scaling() -> None:
    student, teacher = features((5, 4), 140), features((5, 6), 141)
    scale = torch.tensor([0.5, 2.0, 1.0, 20.0, 300.0], dtype=torch.float64).view(5, 1)
    torch.testing.assert_close(PKT()(student * scale, teacher), PKT()(student, teacher), rtol=1e-6, atol=0)


def test_sp_ignores_a_global_scale_and_follows_a_permutation_of_the_batch() -> None:
    student, teacher = features((6, 5), 150), features((6, 3), 151)
    order = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(SP()(30 * student, teacher), SP()(student, teacher), rtol=1e-12, atol=0)
    torch.testing.assert_close(SP()(student[order], teacher[order]), SP()(student, teacher), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["sp", "cc", "rkd", "pkt", "kdsvd"])
def test_low_precision_inputs_and_autocast_are_computed_in_float32(name) -> None:
    if name == "kdsvd":
        student, teacher = [x.float() for x in stage_maps(160)], [x.float() for x in stage_maps(170)]
    else:
        student, teacher = features((6, 5), 160).float(), features((6, 7), 161).float()
    loss = LOSSES.build(name)
    if name == "cc":
        loss.probe(student, teacher)
    exact = loss(student, teacher)
    low = [x.bfloat16() for x in student] if name == "kdsvd" else student.bfloat16()
    assert loss(low, teacher).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student, teacher)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt"])
def test_unknown_context_is_ignored(name) -> None:
    student, teacher = features((4, 5), 180), features((4, 3), 181)
    loss = LOSSES.build(name)
    with_context = loss(student, teacher, target=torch.arange(4), index=torch.arange(4), epoch=2,
                        mask=torch.ones(4, dtype=torch.bool))
    assert with_context.item() == loss(student, teacher).item()


def test_registered_names_and_defaults() -> None:
    assert [LOSSES.get(n) for n in ("sp", "cc", "rkd", "pkt", "kdsvd")] == [SP, CC, RKD, PKT, KDSVD]
    rkd, pkt, cc, kdsvd = RKD(), PKT(), CC(), KDSVD()
    assert (rkd.distance_weight, rkd.angle_weight, pkt.eps, cc.embed_dim, kdsvd.k) == (25.0, 50.0, 1e-7, 128, 1)


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (RKD, {"distance_weight": -1.0}, "distance_weight must be a finite number >= 0"),
        (RKD, {"angle_weight": "50"}, "angle_weight must be a finite number >= 0"),
        (RKD, {"angle_weight": float("nan")}, "angle_weight must be a finite number >= 0"),
        (PKT, {"eps": 0.0}, "eps must be a finite number > 0"),
        (PKT, {"eps": None}, "eps must be a finite number > 0"),
        (CC, {"embed_dim": 0}, "embed_dim must be a whole number > 0"),
        (CC, {"embed_dim": 12.5}, "embed_dim must be a whole number > 0"),
        (CC, {"embed_dim": True}, "embed_dim must be a whole number > 0"),
        (KDSVD, {"k": 0}, "k must be a whole number > 0"),
        (KDSVD, {"k": "1"}, "k must be a whole number > 0"),
    ],
)
def test_bad_kwargs_are_one_line_config_errors(factory, kwargs, match) -> None:
    one_line_error(ConfigError, match, lambda: factory(**kwargs))


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt"])
def test_wrong_pairwise_shapes_are_one_line_shape_errors(name) -> None:
    loss = LOSSES.build(name)
    x = features((4, 5), 190)
    one_line_error(ShapeError, r"\(4, 5\) and the teacher's \(3, 5\) hold different batch sizes",
                   lambda: loss(x, features((3, 5), 191)))
    one_line_error(ShapeError, r"the student's is \(4,\)", lambda: loss(x[:, 0], x))
    one_line_error(ShapeError, "the teacher's is list", lambda: loss(x, [x]))


def test_method_specific_shape_errors_are_one_line() -> None:
    x = features((4, 5), 200)
    one_line_error(ShapeError, r"PKT compares embeddings \(N, D\); the student's is \(4, 5, 1, 1\): give the term "
                   "transform: pool", lambda: PKT()(x.view(4, 5, 1, 1), x))
    one_line_error(ShapeError, r"RKD relates the samples of a batch and needs 2 at least, got \(1, 5\)",
                   lambda: RKD()(x[:1], x[:1]))
    one_line_error(ShapeError, "CC's embeddings are sized by a shape probe", lambda: CC()(x, x))
    cc = probed_cc(x, x)
    one_line_error(ShapeError, "CC's student embedding was probed on 5 features per sample but gets 3",
                   lambda: cc(x[:, :3], x))
    one_line_error(ShapeError, "CC relates the samples of a batch and needs 2 at least", lambda: cc(x[:1], x[:1]))


def test_kdsvd_shape_errors_are_one_line() -> None:
    maps = stage_maps(210)
    one_line_error(ShapeError, "list two or more module paths", lambda: KDSVD()(maps[0], maps[0]))
    one_line_error(ShapeError, "two at least; got 1 and 1", lambda: KDSVD()(maps[:1], maps[:1]))
    one_line_error(ShapeError, "got 3 and 2", lambda: KDSVD()(maps, maps[:2]))
    one_line_error(ShapeError, r"the teacher's stage 1 is \(3, 24\)",
                   lambda: KDSVD()(maps, [maps[0], maps[1].flatten(1), maps[2]]))
    other = stage_maps(220, shapes=((4, 4, 4), (5, 2, 2), (8, 2, 2)))
    one_line_error(ShapeError, r"stage 1: student map \(3, 6, 2, 2\) and teacher map \(3, 5, 2, 2\) need the batch "
                   "size 3 and equal channel counts", lambda: KDSVD()(maps, other))

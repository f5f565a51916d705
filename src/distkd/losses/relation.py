"""Relational losses: the student matches how the teacher relates the samples of a batch (or its stages).

- ``SP`` (``"sp"``): similarity-preserving KD (Tung & Mori, ICCV 2019).
- ``CC`` (``"cc"``): correlation congruence (Peng et al., ICCV 2019), the code its authors sent to RepDistiller,
  with RepDistiller's two learnable linear embeddings (trainable state built by the shape probe).
- ``RKD`` (``"rkd"``): relational KD, distance and angle terms (Park et al., CVPR 2019).
- ``PKT`` (``"pkt"``): probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).
- ``KDSVD`` (``"kdsvd"``): self-supervised KD with singular value decomposition (Lee et al., ECCV 2018); it
  relates consecutive stages, so its term lists two or more module paths and it receives lists of feature maps.

Each follows HobbitLong/RepDistiller ``distiller_zoo/`` (SP, RKD, PKT and the losses of KDSVD match
megvii-research/mdistiller ``distillers/`` except where noted; mdistiller has no CC). Deliberate differences:

- every loss runs with autocast off, in float32 at least (fp16/bf16 inputs are upcast); SP returns a 0-d scalar
  where the reference returns shape (1,);
- PKT takes each row's norm with ``torch.linalg.vector_norm``: the same value as the reference's
  ``sqrt(sum(f ** 2))``, but a zero gradient instead of NaN for an all-zero row;
- KDSVD views a map as (N, H*W, C) where the reference writes (N, H*H, C) (it assumes square maps), and uses
  ``torch.linalg.svd``, the current name of the reference's ``torch.svd``; mdistiller instead views the map as
  (N, C*H, W), which changes the loss: distkd follows RepDistiller;
- RKD and CC need two samples at least: one sample is a one-line ShapeError where the reference gives NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses._inputs import check_non_negative, check_positive

RBF_SCALE = 8.0  # KDSVD's kernel exp(-d^2 / 8), fixed in the reference code


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an int > 0 (not a bool), else a ConfigError."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a whole number > 0, got {value!r}; set e.g. {name}: 1")
    return value


def _describe(x: object) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """The common dtype of ``tensors``, float32 at least."""
    dtype = torch.float32
    for x in tensors:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def sample_vectors(method: str, student: Tensor, teacher: Tensor, min_batch: int = 1) -> tuple[Tensor, Tensor]:
    """Check two batches of features and view each sample as one float vector (float32 at least).

    ``student`` (N, d1, ...) and ``teacher`` (N, e1, ...) -> (N, D_s), (N, D_t); the teacher is detached.
    """
    for role, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise ShapeError(f"{method} compares float features (N, D) or (N, C, H, W); the {role}'s is "
                             f"{_describe(x)}: tap a layer's output (one tensor per call)")
    if student.shape[0] != teacher.shape[0]:
        raise ShapeError(f"{method}: the student's features {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)} hold different batch sizes; feed both the same images")
    if student.shape[0] < min_batch:
        raise ShapeError(f"{method} relates the samples of a batch and needs {min_batch} at least, got "
                         f"{tuple(student.shape)}; use a larger batch (drop_last for a short final batch)")
    dtype = _float_dtype(student, teacher)
    return student.flatten(1).to(dtype), teacher.detach().flatten(1).to(dtype)


# ---------------------------------------------------------------------------------------------------------- SP


def similarity_matrix(f: Tensor) -> Tensor:
    """SP's batch similarity: (N, D) -> (N, N) Gram matrix ``f f^T``, each row at unit L2 norm (``max(., 1e-12)``)."""
    return F.normalize(f @ f.T, dim=1)


@LOSSES.register("sp")
class SP(nn.Module):
    """Similarity-preserving KD: ``||G_t - G_s||_F^2 / N^2`` with ``G = row_normalise(f f^T)``.

    ``f`` is each sample's features flattened to a vector (N, D); ``row_normalise`` divides each row of the
    (N, N) Gram matrix by its L2 norm (RepDistiller's ``Similarity``, "verified by original author"; identical in
    mdistiller). Student and teacher dimensions may differ.

    RepDistiller applies it to the last stage's feature map (``feat[-2]``; mdistiller ``feats[-1]``). Published
    CIFAR-100 weight: 3000 (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``--distill similarity
    -a 0 -b 3000``; mdistiller ``CFG.SP.LOSS.FEAT_WEIGHT = 3000.0``), on top of cross-entropy with weight 1.
    """

    def __init__(self) -> None:
        """SP has no hyper-parameters (an explicit signature, so a config's stray kwargs are rejected by name)."""
        super().__init__()

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The SP loss (a scalar) of features (N, ...) of each model; the teacher is detached.

        ``return_parts``: also return ``{}``. Other ``context`` keys are ignored.
        """
        f_s, f_t = sample_vectors("SP", student, teacher)
        with torch.autocast(f_s.device.type, enabled=False):
            loss = (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / f_s.shape[0] ** 2
        return (loss, {}) if return_parts else loss


# ---------------------------------------------------------------------------------------------------------- CC


@LOSSES.register("cc")
class CC(nn.Module):
    """Correlation congruence as RepDistiller runs it: ``mean_i sum_d |delta[i, d]| * |delta[i + 1, d]|``.

    ``delta = e_s(f_s) - e_t(f_t)`` with two learnable linear embeddings (RepDistiller's ``LinearEmbed``, a
    ``nn.Linear(D, embed_dim)`` of each model's flattened features (N, D)); the mean runs over the N - 1
    neighbouring pairs of the batch. This is the code the CC authors sent to RepDistiller (``distiller_zoo/CC.py``),
    not the kernel correlation matrices the paper describes. Both embeddings are trainable state, built by
    :meth:`probe` and trained with the student, as in RepDistiller (whose ``trainable_list`` holds ``embed_s`` and
    ``embed_t``): gradient reaches the teacher's embedding, never the teacher's features.

    RepDistiller applies it to the penultimate features (``feat[-1]``, after global pooling: (N, D)). Published
    CIFAR-100 weight: 0.02 (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``--distill correlation
    -a 0 -b 0.02``), on top of cross-entropy with weight 1; mdistiller has no CC.

    Args:
        embed_dim: the embeddings' output size (RepDistiller's ``--feat_dim``, default 128).
    """

    def __init__(self, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.student_embed: nn.Linear | None = None
        self.teacher_embed: nn.Linear | None = None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}"

    def probe(self, student: Tensor, teacher: Tensor, **context: object) -> None:
        """Build the two embeddings for these features (called once, by the shape probe)."""
        f_s, f_t = sample_vectors("CC", student, teacher)
        self.student_embed = nn.Linear(f_s.shape[1], self.embed_dim).to(f_s.device)
        self.teacher_embed = nn.Linear(f_t.shape[1], self.embed_dim).to(f_s.device)

    @staticmethod
    def _embed(layer: nn.Linear, f: Tensor, role: str) -> Tensor:
        if f.shape[1] != layer.in_features:
            raise ShapeError(f"CC's {role} embedding was probed on {layer.in_features} features per sample but "
                             f"gets {f.shape[1]}; compare the layers it was probed on")
        return F.linear(f, layer.weight.to(f.dtype), layer.bias.to(f.dtype))

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The CC loss (a scalar) of features (N, ...) of each model, N >= 2; the teacher is detached.

        ``return_parts``: also return ``{}``. Other ``context`` keys are ignored.
        """
        if self.student_embed is None or self.teacher_embed is None:
            raise ShapeError("CC's embeddings are sized by a shape probe: call Distiller.probe(batch) once before "
                             "the first step (distkd's trainer does)")
        f_s, f_t = sample_vectors("CC", student, teacher, min_batch=2)
        with torch.autocast(f_s.device.type, enabled=False):
            e_s = self._embed(self.student_embed, f_s, "student")
            e_t = self._embed(self.teacher_embed, f_t, "teacher")
            delta = (e_s - e_t).abs()
            loss = (delta[:-1] * delta[1:]).sum(1).mean()
        return (loss, {}) if return_parts else loss


# --------------------------------------------------------------------------------------------------------- RKD


def pairwise_distances(e: Tensor) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, zero diagonal.

    As the reference: ``sqrt(max(|e_i|^2 + |e_j|^2 - 2 <e_i, e_j>, 1e-12))`` off the diagonal.
    """
    squares = e.pow(2).sum(1)
    distances = (squares.unsqueeze(1) + squares.unsqueeze(0) - 2 * e @ e.T).clamp(min=1e-12).sqrt()
    diagonal = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return distances.masked_fill(diagonal, 0.0)


def relative_distances(e: Tensor) -> Tensor:
    """(N, D) -> (N, N) pairwise distances divided by the mean of the positive ones."""
    d = pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum())


def triplet_angles(e: Tensor) -> Tensor:
    """(N, D) -> (N, N, N): ``[i, j, k] = <u_ij, u_ik>``, ``u_ij = (e_j - e_i) / max(||e_j - e_i||, 1e-12)``."""
    directions = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
    return torch.bmm(directions, directions.transpose(1, 2))


@LOSSES.register("rkd")
class RKD(nn.Module):
    """Relational KD: ``distance_weight * L_distance + angle_weight * L_angle`` (RepDistiller's ``RKDLoss``).

    With each sample's features flattened to a vector (N, D):

    - ``L_distance = mean_{i, j} huber(d_s[i, j], d_t[i, j])``, ``d`` the (N, N) distances (zero diagonal) over
      the mean of the positive ones;
    - ``L_angle = mean_{i, j, k} huber(a_s[i, j, k], a_t[i, j, k])``, ``a[i, j, k]`` the cosine of the angle at
      ``e_i`` between ``e_j`` and ``e_k`` (0 where ``j`` or ``k`` is ``i``);

    ``huber`` is ``F.smooth_l1_loss`` with ``beta = 1``; the means include the diagonal entries, as the reference.
    Student and teacher dimensions may differ; N >= 2.

    RepDistiller applies it to the penultimate features (``feat[-1]``, (N, D); mdistiller ``pooled_feat``).
    Published CIFAR-100 weight: 1 (HobbitLong/RepDistiller ``scripts/run_cifar_distill.sh``, ``--distill rkd -a 0
    -b 1``; mdistiller ``CFG.RKD.LOSS.FEAT_WEIGHT = 1.0``), on top of cross-entropy with weight 1; the 25 / 50
    below are inside the loss, as in both.

    Args:
        distance_weight: weight of the distance term (>= 0; RepDistiller's ``w_d = 25``).
        angle_weight: weight of the angle term (>= 0; RepDistiller's ``w_a = 50``).
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        self.distance_weight = check_non_negative("distance_weight", distance_weight)
        self.angle_weight = check_non_negative("angle_weight", angle_weight)

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}"

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The RKD loss (a scalar) of features (N, ...) of each model, N >= 2; the teacher is detached.

        ``return_parts``: also return ``{"distance": L_distance, "angle": L_angle}``, detached and without the
        two weights. Other ``context`` keys are ignored.
        """
        f_s, f_t = sample_vectors("RKD", student, teacher, min_batch=2)
        with torch.autocast(f_s.device.type, enabled=False):
            with torch.no_grad():
                d_t, a_t = relative_distances(f_t), triplet_angles(f_t)
            distance = F.smooth_l1_loss(relative_distances(f_s), d_t)
            angle = F.smooth_l1_loss(triplet_angles(f_s), a_t)
            loss = self.distance_weight * distance + self.angle_weight * angle
        if return_parts:
            return loss, {"distance": distance.detach(), "angle": angle.detach()}
        return loss


# --------------------------------------------------------------------------------------------------------- PKT


def cosine_distribution(f: Tensor, eps: float) -> Tensor:
    """PKT's conditional probabilities: (N, D) -> (N, N), row ``i`` is ``p(j | i)``.

    ``u = f / (||f|| + eps)`` per row (NaN set to 0), ``k = (u u^T + 1) / 2``, each row divided by its sum.
    """
    unit = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)
    unit = unit.masked_fill(unit.isnan(), 0.0)
    kernel = (unit @ unit.T + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


@LOSSES.register("pkt")
class PKT(nn.Module):
    """Probabilistic knowledge transfer: ``mean_{i, j} p_t[i, j] * log((p_t[i, j] + eps) / (p_s[i, j] + eps))``.

    ``p`` is :func:`cosine_distribution` of each model's embeddings (N, D): the cosine-similarity kernel scaled to
    [0, 1] and normalised per row; the mean over all N * N entries is the reference's (the authors' code in
    RepDistiller's ``PKT``, identical in mdistiller), i.e. the mean row KL divergence divided by N. Embedding sizes
    may differ.

    RepDistiller applies it to the penultimate features (``feat[-1]``, (N, D)): give a feature-map tap
    ``transform: pool``. Published CIFAR-100 weight: 30000 (HobbitLong/RepDistiller
    ``scripts/run_cifar_distill.sh``, ``--distill pkt -a 0 -b 30000``; mdistiller ``CFG.PKT.LOSS.FEAT_WEIGHT =
    30000.0``), on top of cross-entropy with weight 1.

    Args:
        eps: added to the norms and inside the log ratio (> 0; the reference's ``1e-7``).
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = check_positive("eps", eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The PKT loss (a scalar) of embeddings (N, D_s) and (N, D_t); the teacher is detached.

        ``return_parts``: also return ``{}``. Other ``context`` keys are ignored.
        """
        for role, x in (("student", student), ("teacher", teacher)):
            if isinstance(x, Tensor) and x.dim() != 2:
                raise ShapeError(f"PKT compares embeddings (N, D); the {role}'s is {tuple(x.shape)}: give the term "
                                 "transform: pool (RepDistiller uses the pooled penultimate features)")
        f_s, f_t = sample_vectors("PKT", student, teacher)
        with torch.autocast(f_s.device.type, enabled=False):
            p_s, p_t = cosine_distribution(f_s, self.eps), cosine_distribution(f_t, self.eps)
            loss = (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return (loss, {}) if return_parts else loss


# ------------------------------------------------------------------------------------------------------- KDSVD


def _finite(x: Tensor) -> Tensor:
    """``x`` with NaN and +-inf entries set to 0 (the reference's ``removenan``)."""
    return torch.where(torch.isfinite(x), x, 0.0)


def leading_singular_vectors(f: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The map (N, C, H, W) viewed as (N, H*W, C): its top-``n`` right singular vectors and singular values.

    Returns ``v`` (N, C, n') with unit columns and ``s`` (N, n') scaled to unit L2 norm per sample, where
    ``n' = min(n, H*W, C)``; non-finite entries are zeroed first (the reference's ``svd``).
    """
    _, s, vh = torch.linalg.svd(f.flatten(2).transpose(1, 2), full_matrices=False)
    v, s = _finite(vh.transpose(1, 2)), _finite(s)
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def align_to(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector of largest ``|cos|``, signed to agree: (N, C, m), (N, C, k) ->
    (N, C, k). Ties sum their candidates, as the reference's mask does; the choice carries no gradient."""
    with torch.no_grad():
        cosine = v_s.transpose(1, 2) @ v_t
        best = cosine.abs() == cosine.abs().amax(1, keepdim=True)
        selection = torch.where(best, cosine.sign(), 0.0)
    return v_s @ selection


def stage_rbf(v: Tensor, v_before: Tensor) -> Tensor:
    """``exp(-(v[n, a, m] - v_before[n, b, m]) ** 2 / 8)``: (N, C, k), (N, C', k) -> (N, C, C', k)."""
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / RBF_SCALE)


@LOSSES.register("kdsvd")
class KDSVD(nn.Module):
    """KD-SVD between consecutive stages: ``sum_i sum (rbf_s(i) - rbf_t(i)) ** 2 / N`` (RepDistiller's ``KDSVD``).

    For each stage's feature map, viewed as (N, H*W, C): the teacher's top-``k`` right singular vectors ``v_t``
    (N, C, k) and the student's top ``k + 3`` ``v_s``; each teacher vector takes the student vector of largest
    ``|cos|``, signed to agree (:func:`align_to`); both are scaled by the teacher's top-``k`` singular values at unit
    norm. Stage ``i >= 1`` then compares ``rbf(i)[n, a, b, m] = exp(-(v(i)[n, a, m] - v(i-1)[n, b, m]) ** 2 / 8)``
    of student and teacher: squared differences (non-finite ones dropped), summed and divided by the batch size
    N; the loss is the sum over the consecutive pairs of stages.

    The method couples stages, so its term lists two or more module paths (RepDistiller uses every stage output,
    ``feat[1:-1]``) and ``student``/``teacher`` are lists of maps (N, C_i, H, W); student and teacher must have the
    same channels at each stage (spatial sizes may differ). Published CIFAR-100 weight: 1 (megvii-research/mdistiller
    ``CFG.KDSVD.LOSS.FEAT_WEIGHT = 1.0``, on top of cross-entropy with weight 1; RepDistiller's
    ``scripts/run_cifar_distill.sh`` gives no KDSVD command).

    Args:
        k: how many teacher singular vectors per stage (RepDistiller's and mdistiller's default 1).
    """

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.k = check_positive_int("k", k)

    def extra_repr(self) -> str:
        return f"k={self.k}"

    def forward(
        self, student: list[Tensor], teacher: list[Tensor], *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The KDSVD loss (a scalar) of lists of stage feature maps (N, C_i, H_i, W_i); teachers are detached.

        ``return_parts``: also return ``{"stages_<i-1>_<i>": that pair's loss}`` for each consecutive pair,
        detached. Other ``context`` keys are ignored.
        """
        stages = _stage_pairs(student, teacher)
        with torch.autocast(stages[0][0].device.type, enabled=False):
            vectors = [self._singular_vectors(f_s, f_t) for f_s, f_t in stages]
            batch = stages[0][0].shape[0]
            parts: dict[str, Tensor] = {}
            for i in range(1, len(vectors)):
                (v_s, v_t), (v_s_before, v_t_before) = vectors[i], vectors[i - 1]
                squares = (stage_rbf(v_s, v_s_before) - stage_rbf(v_t, v_t_before)).pow(2)
                parts[f"stages_{i - 1}_{i}"] = _finite(squares).sum() / batch
            loss = sum(parts.values())
        if return_parts:
            return loss, {name: value.detach() for name, value in parts.items()}
        return loss

    def _singular_vectors(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """One stage's scaled, aligned singular vectors: student (N, C, k), teacher (N, C, k)."""
        with torch.no_grad():
            v_t, s_t = leading_singular_vectors(f_t, self.k)
        v_s, _ = leading_singular_vectors(f_s, self.k + 3)
        scale = s_t.unsqueeze(1)
        return align_to(v_s, v_t) * scale, v_t * scale


def _stage_pairs(student: list[Tensor], teacher: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Check KDSVD's lists of stage maps; return float (student, detached teacher) pairs, float32 at least."""
    if not isinstance(student, (list, tuple)) or not isinstance(teacher, (list, tuple)):
        raise ShapeError("KDSVD relates consecutive stages: list two or more module paths in its term "
                         "(student: [stage1, stage2, ...], teacher: [...]) so it receives lists of feature maps")
    if len(student) != len(teacher) or len(student) < 2:
        raise ShapeError(f"KDSVD needs as many student as teacher stages, two at least; got {len(student)} and "
                         f"{len(teacher)}: list the same number of module paths on both sides")
    for role, maps in (("student", student), ("teacher", teacher)):
        for i, x in enumerate(maps):
            if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
                raise ShapeError(f"KDSVD compares float feature maps (N, C, H, W); the {role}'s stage {i} is "
                                 f"{_describe(x)}: tap convolutional layers, with transform: none")
    batch = student[0].shape[0]
    for i, (f_s, f_t) in enumerate(zip(student, teacher, strict=True)):
        if f_s.shape[0] != batch or f_t.shape[0] != batch or f_s.shape[1] != f_t.shape[1]:
            raise ShapeError(f"KDSVD's stage {i}: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} "
                             f"need the batch size {batch} and equal channel counts; tap stages whose channels match")
    dtype = _float_dtype(*student, *teacher)
    return [(f_s.to(dtype), f_t.detach().to(dtype)) for f_s, f_t in zip(student, teacher, strict=True)]

"""CRD: contrastive representation distillation (Tian et al., ICLR 2020), as RepDistiller's ``crd/`` computes it
(mdistiller's ``CRD`` is a copy).

Student and teacher features (N, D_s) and (N, D_t) (any (N, ...) is flattened) go through a linear embedding head
each, L2-normalised to ``feat_dim``: ``e_s``, ``e_t``. Two memory banks of shape (dataset_size, feat_dim) hold a
momentum average of every training sample's student and teacher embedding. Each sample ``i`` (its position
``index[i]`` in the training split) is contrasted with its own bank row (the positive) and ``K = nce_k`` other rows
(the negatives), on both sides, with the NCE objective of RepDistiller's ``ContrastLoss`` (its Eq. 18):

    P_s[i, j] = exp(<M_t[r_ij], e_s[i]> / T) / Z_s     r_i0 = index[i], r_i1..r_iK the negatives, T = nce_t
    P_t[i, j] = exp(<M_s[r_ij], e_t[i]> / T) / Z_t
    nce(P) = -(1 / N) * sum_i [log(P_i0 / (P_i0 + K/n + eps)) + sum_{j>=1} log((K/n) / (P_ij + K/n + eps))]
    loss = nce(P_s) + nce(P_t)                         n = dataset_size, eps = 1e-7

``Z_s``, ``Z_t`` are set once, at the first training step, to ``mean(exp(...)) * n`` of that step and then kept
(buffers). After the scores, the rows of the batch are updated (no gradient), ``m = nce_m``:

    M_s[index] <- normalize(m * M_s[index] + (1 - m) * e_s),   M_t[index] <- normalize(m * M_t[index] + (1 - m) * e_t)

The banks start uniform in ``[-1 / sqrt(feat_dim / 3), 1 / sqrt(feat_dim / 3)]``, as RepDistiller's.

Negatives. RepDistiller's CIFAR-100 loader (mode ``exact``) draws, per sample, ``K`` rows WITHOUT replacement among
the samples of OTHER classes (with replacement only when fewer exist); ``negatives="other_class"`` (the default) does
the same inside the loss, from a label table it fills with ``target`` at ``index`` as samples are seen: samples not
seen yet (in the first epoch) count as other-class, so the draw is exact from the second epoch on.
``negatives="uniform"`` draws ``K`` rows uniformly with replacement (``ContrastMemory``'s own fallback when no
indices are given), for tasks without one class per sample; it needs no labels and costs O(N K) instead of
O(N dataset_size). Each draw uses a fresh ``torch.Generator`` seeded with splitmix64 of ``(seed, draws)``, ``draws``
being a buffer that counts training steps, so a run is reproducible and a resumed run draws what the uninterrupted
one would have. :meth:`CRD.sample_negatives` is the draw; a ``contrast_index`` (N, K+1) in the context (RepDistiller's
loader output, positive first) replaces it.

State: the two heads (trained), the banks, the label table, ``Z`` and ``draws`` (buffers, saved with the term
state), built by the shape probe from the feature sizes and the context's ``dataset_size``; ``index`` (the
``Batch.index`` of every step) is required. Buffers change only in training mode.

Under DDP (an initialised default process group of several ranks) the buffers stay those of one process that
trains on the global batch: every rank all-gathers ``(index, e_s, e_t, target)`` and updates its label table and
both banks with every rank's samples, and ``Z`` is the mean over the global batch, so the banks are identical on
all ranks and equal to a single process's. Each rank contrasts its own anchors (the loss is their mean, and DDP's
mean over ranks of equal batches is the global mean). Only the negatives' random numbers differ from one process:
each rank draws from its own stream (``draws * world_size + rank``), the same distribution, not the same numbers;
a ``contrast_index`` in the context makes even those equal.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses._features import check_choice, check_int, not_probed, single_level
from distkd.losses._inputs import check_non_negative, check_positive

EPS = 1e-7
NEGATIVES = ("other_class", "uniform")
FEATURE_DIMS = (2, 3, 4, 5)


class Embed(nn.Module):
    """RepDistiller's ``Embed``: (N, ...) -> flatten -> linear -> L2-normalised (N, feat_dim)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.flatten(1)).to(self.linear.weight.dtype)
        return x / x.norm(dim=1, keepdim=True)


def contrast_loss(scores: Tensor, dataset_size: int) -> Tensor:
    """RepDistiller's ``ContrastLoss`` of normalised scores (N, K+1), the positive in column 0 -> a scalar."""
    noise = (scores.shape[1] - 1) / dataset_size
    positive, negative = scores[:, 0], scores[:, 1:]
    log_d1 = (positive / (positive + noise + EPS)).log()
    log_d0 = (noise / (negative + noise + EPS)).log()
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def draw_seed(seed: int, draws: int) -> int:
    """The generator seed of draw number ``draws``: splitmix64 of ``(seed, draws)``, so every bit counts (torch's
    CPU generator keeps only the low 32 bits of a seed)."""
    mask = 2**64 - 1
    value = (seed * 2**32 + draws + 0x9E3779B97F4A7C15) & mask
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
    return value ^ (value >> 31)


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` (N_r, ...) concatenated in rank order (ranks may hold different N_r); ``x`` alone
    without a process group. No gradient flows through the result."""
    _, world = _world()
    if world == 1:
        return x
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
    padded = torch.zeros((max(int(n) for n in sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def _check_index(index: object, batch: int, dataset_size: int) -> Tensor:
    if not isinstance(index, Tensor) or index.shape != (batch,) or index.is_floating_point():
        got = tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__
        raise ShapeError(f"CRD needs index=<int tensor ({batch},)>, the samples' positions in the training split "
                         f"(Batch.index), got {got}; use a loader that yields indices")
    if bool(((index < 0) | (index >= dataset_size)).any()):
        raise ShapeError(f"CRD's index holds positions outside [0, {dataset_size}); probe with the training "
                         "split's dataset_size")
    return index.long()


DENSE_SCORES = 8  # score against the whole bank when it holds at most this many times the rows drawn per anchor


@LOSSES.register("crd")
class CRD(nn.Module):
    """Contrastive representation distillation with a momentum memory bank (features (N, D), e.g. pooled).

    Published weights (not part of the loss, for configs): 0.8 on CIFAR-100 (RepDistiller
    ``scripts/run_cifar_distill.sh``: ``--distill crd -a 0 -b 0.8``, and ``-a 1 -b 0.8`` for CRD+KD; mdistiller
    ``CFG.CRD.LOSS.FEAT_WEIGHT = 0.8``).

    Args:
        feat_dim: the embedding size (an int >= 1), default 128.
        nce_k: negatives per sample (an int >= 1), default 16384.
        nce_t: the temperature ``T`` (> 0), default 0.07.
        nce_m: the memory momentum ``m`` in [0, 1], default 0.5.
        negatives: ``"other_class"`` (default; needs ``target`` (N,)) or ``"uniform"``; see the module docstring.
        seed: seeds the negative draws and the banks' initial values (an int in [0, 2**31 - 1]), default 0.
    """

    def __init__(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5,
                 negatives: str = "other_class", seed: int = 0) -> None:
        super().__init__()
        self.feat_dim = check_int("feat_dim", feat_dim, 1)
        self.nce_k = check_int("nce_k", nce_k, 1)
        self.nce_t = check_positive("nce_t", nce_t)
        self.nce_m = check_non_negative("nce_m", nce_m)
        if self.nce_m > 1:
            raise ConfigError(f"nce_m must be a number in [0, 1], got {nce_m!r}; set e.g. nce_m: 0.5")
        self.negatives = check_choice("negatives", negatives, NEGATIVES)
        self.seed = check_int("seed", seed, 0, 2**31 - 1)
        self.dataset_size = 0
        self.embed_student: Embed | None = None
        self.embed_teacher: Embed | None = None

    def extra_repr(self) -> str:
        return (f"feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}, "
                f"negatives={self.negatives!r}, seed={self.seed}, dataset_size={self.dataset_size}")

    def probe(self, student: Tensor, teacher: Tensor, *, dataset_size: object = None, **context: object) -> None:
        """Build the heads and the memory buffers (called once, by the shape probe, with ``dataset_size``)."""
        s = single_level(student, "student", "CRD", FEATURE_DIMS)
        t = single_level(teacher, "teacher", "CRD", FEATURE_DIMS)
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size < 2:
            raise ShapeError(f"CRD's memory bank has one row per training sample: probe with dataset_size=<the "
                             f"training split's size, >= 2>, got {dataset_size!r} (distkd's trainer passes it)")
        device = s.device
        self.dataset_size = dataset_size
        self.embed_student = Embed(s[0].numel(), self.feat_dim).to(device)
        self.embed_teacher = Embed(t[0].numel(), self.feat_dim).to(device)
        generator = torch.Generator().manual_seed(self.seed)
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(dataset_size, self.feat_dim, generator=generator) * (2 * bound) - bound
            self.register_buffer(name, bank.to(device))
        self.register_buffer("labels", torch.full((dataset_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("z", torch.full((2,), -1.0, device=device))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long, device=device))

    def sample_negatives(self, index: Tensor, target: Tensor | None = None) -> Tensor:
        """The ``nce_k`` negative bank rows of each anchor, (N, K) int64; in training mode it advances ``draws``.

        ``index``: the anchors' positions (N,); ``target``: their class labels (N,) (``other_class`` only).
        """
        if self.embed_student is None:
            raise not_probed("CRD", "memory bank")
        rank, world = _world()
        stream = int(self.draws) * world + rank  # one process: the step count
        generator = torch.Generator(device=self.labels.device).manual_seed(draw_seed(self.seed, stream))
        if self.training:
            self.draws.add_(1)
        if self.negatives == "uniform":
            return torch.randint(self.dataset_size, (index.shape[0], self.nce_k), generator=generator,
                                 device=self.labels.device)
        allowed = self.labels.unsqueeze(0) != self._labels(target, index.shape[0]).unsqueeze(1)
        allowed[torch.arange(index.shape[0], device=allowed.device), index] = False
        replacement = bool((allowed.sum(1) < self.nce_k).any())
        return torch.multinomial(allowed.float(), self.nce_k, replacement=replacement, generator=generator)

    def _labels(self, target: object, batch: int) -> Tensor:
        if not isinstance(target, Tensor) or target.shape != (batch,) or target.is_floating_point():
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ShapeError(f"CRD's other-class negatives need target=<int tensor ({batch},)>, one class per "
                             f"sample, got {got}; set negatives: uniform for other tasks")
        return target.long()

    def _scores(self, bank: Tensor, rows: Tensor, anchor: Tensor) -> Tensor:
        """``exp(<bank[rows[i, j]], anchor[i]> / T)``: (N, K+1), in the bank's dtype even under autocast.

        When the bank is at most ``DENSE_SCORES`` times the rows drawn per anchor, the anchors are scored against
        the whole bank (one (N, D) x (D, S) product on a copy of the bank) and the drawn columns gathered: on
        CIFAR (S = 50,000, K = 16,384) that replaces copying N (K+1) D bank entries.
        """
        with torch.autocast(bank.device.type, enabled=False):
            if bank.shape[0] <= DENSE_SCORES * rows.shape[1]:
                dots = (anchor @ bank.T.clone()).gather(1, rows)  # a copy: the bank is updated before backward
            else:
                dots = (bank[rows] @ anchor.unsqueeze(2)).squeeze(2)
            return torch.exp(dots / self.nce_t)

    @torch.no_grad()
    def _update_memory(self, index: Tensor, e_s: Tensor, e_t: Tensor) -> None:
        for bank, embedding in ((self.memory_student, e_s), (self.memory_teacher, e_t)):
            rows = bank[index] * self.nce_m + embedding.detach() * (1 - self.nce_m)
            bank[index] = rows / rows.norm(dim=1, keepdim=True)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        index: Tensor | None = None,
        target: Tensor | None = None,
        contrast_index: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The CRD loss (a scalar); the teacher's features are detached (its head is trained).

        Args:
            student, teacher: features (N, ...) of the batch.
            return_parts: also return ``{"student_anchor": nce(P_s), "teacher_anchor": nce(P_t)}``, detached.
            index: int (N,), the samples' positions in the training split (required).
            target: int (N,) class labels (needed with ``negatives="other_class"``).
            contrast_index: optional int (N, K+1), the bank rows to contrast (positive first); drawn when None.
            context: other keys are ignored.
        """
        if self.embed_student is None or self.embed_teacher is None:
            raise not_probed("CRD", "memory bank")
        s = single_level(student, "student", "CRD", FEATURE_DIMS)
        t = single_level(teacher, "teacher", "CRD", FEATURE_DIMS)
        index = _check_index(index, s.shape[0], self.dataset_size)
        dtype = self.memory_student.dtype
        e_s = self.embed_student(s.to(dtype)).to(dtype)
        e_t = self.embed_teacher(t.detach().to(dtype)).to(dtype)
        if self.training:  # every rank's samples (one process: this batch's)
            all_index, all_e_s, all_e_t = gather_rows(index), gather_rows(e_s), gather_rows(e_t)
        if self.training and self.negatives == "other_class":
            self.labels[all_index] = gather_rows(self._labels(target, s.shape[0]))
        rows = self._contrast_rows(index, target, contrast_index)
        scores_s = self._scores(self.memory_teacher, rows, e_s)
        scores_t = self._scores(self.memory_student, rows, e_t)
        first = torch.stack([scores_s.mean(), scores_t.mean()]).detach() * self.dataset_size
        if _world()[1] > 1 and self.training and bool(self.z[0] < 0):  # Z over the global batch (equal batches)
            dist.all_reduce(first)
            first /= _world()[1]
        z = torch.where(self.z < 0, first, self.z)
        if self.training:
            self.z.copy_(z)
            self._update_memory(all_index, all_e_s, all_e_t)
        loss_s = contrast_loss(scores_s / z[0], self.dataset_size)
        loss_t = contrast_loss(scores_t / z[1], self.dataset_size)
        loss = loss_s + loss_t
        if return_parts:
            return loss, {"student_anchor": loss_s.detach(), "teacher_anchor": loss_t.detach()}
        return loss

    def _contrast_rows(self, index: Tensor, target: Tensor | None, contrast_index: Tensor | None) -> Tensor:
        """(N, K+1) bank rows: the positive ``index`` then the negatives (drawn, or the given ``contrast_index``)."""
        if contrast_index is None:
            return torch.cat([index.unsqueeze(1), self.sample_negatives(index, target)], dim=1)
        expected = (index.shape[0], self.nce_k + 1)
        if not isinstance(contrast_index, Tensor) or tuple(contrast_index.shape) != expected:
            got = tuple(contrast_index.shape) if isinstance(contrast_index, Tensor) else type(contrast_index).__name__
            raise ShapeError(f"CRD's contrast_index must be an int tensor {expected} (positive first), got {got}")
        return contrast_index.long()

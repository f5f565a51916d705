"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

DIST matches *relations* instead of exact probabilities: the Pearson correlation between student
and teacher predictions of each instance (inter-class relation) and of each class across the batch
(intra-class relation). This module follows the authors' released code (hunto/DIST_KD):

- ``y = softmax(z / tau)`` over the class dim (``activation="sigmoid"``: ``sigmoid(z / tau)`` per
  class, as in their detection code);
- ``rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + 1e-8)``;
- ``inter = 1 - mean_i rho(y_s[i, :], y_t[i, :])``, ``intra = 1 - mean_j rho(y_s[:, j], y_t[:, j])``;
- ``loss = tau**2 * (beta * inter + gamma * intra)``.

The released code multiplies by ``tau**2``; the paper's appendix pseudocode does not. The two
agree at ``tau = 1`` (the paper's default); ``tau_squared=False`` gives the pseudocode's scale.

Degenerate inputs stay finite: a zero-variance vector (a constant column, a uniform row, or any
column when only one instance is kept) has ``rho = 0 / (0 + 1e-8) = 0``, so with one instance the
intra term is exactly 1. A mask that keeps no position gives a loss of 0 with zero gradient.
Masked positions may hold anything (even inf or NaN): they are replaced by 0 before the
activation and excluded from every sum, so they reach neither the value nor the gradient.

The two terms are computed by one autograd Function with an analytic first-order backward
(``distkd.losses._relations``): no N x N or HW x HW matrix, a few input-sized buffers, and on the
CPU cache-sized chunks. Second derivatives (double backward) are not supported there;
``implementation="reference"`` computes the same terms in plain autograd (the readable formulation,
tested equal to the fast one; more memory, any order of derivatives, no ``global_intra``).

The intra term depends on which instances share a batch. The authors ran ImageNet on 8 GPUs with
32 images each, so their intra term correlates each class over 32 images, and DDP then averages the
8 GPUs' gradients. ``intra_group_size=32`` gives one process with the global batch of 256 the same
loss: the batch is cut into consecutive groups of 32 samples (the leading dim), the intra term is the
mean of the groups' intra terms (over the groups that keep an instance), and the inter term, per
instance, is the mean over all kept instances as before (with equal groups and no mask, exactly the
mean of the per-GPU losses). ``global_intra`` goes the other way (one group spanning every rank), so
the two options exclude each other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import (
    as_instances,
    check_flag,
    check_non_negative,
    check_positive,
    instance_mask,
)
from distkd.losses._relations import reference_terms, relation_terms

ACTIVATIONS = ("softmax", "sigmoid")
IMPLEMENTATIONS = ("fast", "reference")


@LOSSES.register("dist")
class DIST(nn.Module):
    """DIST loss on logits ``(N, C)`` or dense logits ``(N, C, d1, ..., dk)`` (class dim 1).

    Every position of a dense input is one instance, as the authors do for segmentation and
    detection. Inputs in fp16/bf16 are computed in fp32; the teacher is detached.

    Args:
        beta: weight of the inter-class term (>= 0).
        gamma: weight of the intra-class term (>= 0).
        tau: temperature (> 0).
        activation: ``"softmax"`` over classes, or ``"sigmoid"`` per class (sigmoid-trained heads).
        tau_squared: multiply by ``tau**2`` as the released code does (False: the paper's pseudocode).
        intra_group_size: compute the intra-class term over consecutive groups of this many samples
            of the batch and average it over the groups (the batch must divide into them); None: one
            group, the whole local batch. ``32`` with a batch of 256 reproduces the authors' 8 GPUs.
        global_intra: compute the intra-class term over the global batch of all ranks of the
            default process group (the inter term is per instance, so it stays local). Each rank's
            gradient is then ``world_size`` times its share of the global term's gradient, so the
            mean over ranks that DDP takes gives exactly the global gradient. Without an initialised
            process group (or with one rank) the local batch is the global batch.
        implementation: ``"fast"`` (the analytic-gradient Function) or ``"reference"`` (plain autograd).
    """

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 1.0,
        activation: str = "softmax",
        tau_squared: bool = True,
        global_intra: bool = False,
        intra_group_size: int | None = None,
        implementation: str = "fast",
    ) -> None:
        super().__init__()
        self.beta = check_non_negative("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)
        self.tau = check_positive("tau", tau)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.tau_squared = check_flag("tau_squared", tau_squared)
        self.global_intra = check_flag("global_intra", global_intra)
        if intra_group_size is not None:
            if isinstance(intra_group_size, bool) or not isinstance(intra_group_size, int) or intra_group_size < 2:
                raise ConfigError(f"intra_group_size must be an integer >= 2 (or null for the whole batch), got "
                                  f"{intra_group_size!r}")
            if global_intra:
                raise ConfigError("DIST's global_intra (one intra group over every rank) and intra_group_size (groups "
                                  "within the batch) exclude each other; set one of them")
        self.intra_group_size = intra_group_size
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"unknown DIST implementation {implementation!r}; choose one of "
                              f"{', '.join(IMPLEMENTATIONS)}")
        if implementation == "reference" and global_intra:
            raise ConfigError("DIST's reference implementation computes the local batch only; use implementation "
                              "'fast' with global_intra")
        self.implementation = implementation

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, activation={self.activation!r}, "
            f"tau_squared={self.tau_squared}, global_intra={self.global_intra}, "
            f"intra_group_size={self.intra_group_size}, implementation={self.implementation!r}"
        )

    def probe(self, student: Tensor, teacher: Tensor, **context: object) -> None:
        """Check, before training, that the batch divides into ``intra_group_size`` groups."""
        self._groups(student.shape[0])

    def _groups(self, batch: int) -> int:
        size = self.intra_group_size
        if size is None:
            return 1
        if batch % size:
            raise ConfigError(f"DIST's intra_group_size={size} does not divide this process's batch of {batch} "
                              f"samples; make the per-process batch (data.batch_size / processes) a multiple of "
                              f"{size}, or change intra_group_size")
        return batch // size

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The DIST loss (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"inter", "intra"}``, the unweighted terms, detached.
            mask: bool ``(N, d1, ..., dk)`` (``(N,)`` for 2-D logits); False positions take no
                part in either term, in value or gradient.
            context: other keys (``target``, ``epoch``, ...) are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        groups = self._groups(z_s.shape[0])
        if groups == 1:
            inter, intra = self._terms(z_s, z_t, keep)
        else:
            inter, intra = self._grouped_terms(z_s, z_t, keep, groups)
        scale = self.tau**2 if self.tau_squared else 1.0
        loss = scale * (self.beta * inter + self.gamma * intra)
        if return_parts:
            return loss, {"inter": inter.detach(), "intra": intra.detach()}
        return loss

    def _terms(self, z_s: Tensor, z_t: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(inter, intra)`` of logits ``(N, C, S)`` with ``keep`` ``(N, 1, S)`` or None, by the chosen path."""
        if self.implementation == "reference":
            return reference_terms(z_s, z_t, keep, tau=self.tau, activation=self.activation)
        return relation_terms(z_s, z_t, keep, tau=self.tau, activation=self.activation, global_batch=self.global_intra)

    def _grouped_terms(self, z_s: Tensor, z_t: Tensor, keep: Tensor | None, groups: int) -> tuple[Tensor, Tensor]:
        """``(inter, intra)`` of ``(N, C, S)`` logits cut into ``groups`` groups along ``N``: inter the mean over
        all kept instances (each group's mean weighted by its kept count), intra the mean over the groups that
        keep an instance."""
        size = z_s.shape[0] // groups
        inters, intras, counts = [], [], []
        for g in range(groups):
            part = slice(g * size, (g + 1) * size)
            k = None if keep is None else keep[part]
            inter, intra = self._terms(z_s[part], z_t[part], k)
            inters.append(inter)
            intras.append(intra)
            counts.append(z_s.new_tensor(float(size * z_s.shape[2])) if k is None else k.sum().to(z_s.dtype))
        count = torch.stack(counts)
        inter = (torch.stack(inters) * count).sum() / count.sum().clamp_min(1.0)
        with_instances = (count > 0).to(z_s.dtype)
        intra = (torch.stack(intras) * with_instances).sum() / with_instances.sum().clamp_min(1.0)
        return inter, intra

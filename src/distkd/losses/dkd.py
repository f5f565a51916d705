"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

KD's divergence splits into a target-class part (TCKD: binary KL between ``[p_gt, 1 - p_gt]`` of
teacher and student) and a non-target part (NCKD: KL between the softmaxes over the classes other
than the ground truth). DKD weights them ``alpha`` and ``beta``, multiplies both by ``tau**2`` and
ramps the total in with ``min(epoch / warmup, 1)``, as megvii-research/mdistiller does.

Differences from mdistiller, none changing the value at ordinary logits:

- the non-target softmax excludes the ground-truth class exactly (log-sum-exp over the other
  classes) instead of subtracting 1000 from its scaled logit;
- TCKD works with log-probabilities (``log(1 - p_gt)`` as a log-sum-exp), so it stays finite when
  the student's ``p_gt`` underflows, where ``log`` of the probability gives ``-inf``;
- dense logits ``(N, C, d1, ..., dk)`` are supported: every position is an instance with its own
  target, positions where ``mask`` is False take no part, and the mean runs over the kept
  positions (for 2-D logits this is mdistiller's division by the batch size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import (
    as_instances,
    check_non_negative,
    check_positive,
    instance_mask,
    instance_targets,
    masked_mean,
    zero_masked,
)


def _kl_terms(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """Elementwise ``p_t * (log p_t - log p_s)``."""
    return log_p_t.exp() * (log_p_t - log_p_s)


def decoupled_divergences(z_s: Tensor, z_t: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-instance TCKD and NCKD, each ``(N, 1, S)``, of scaled logits ``(N, C, S)``.

    ``target``: ``(N, 1, S)`` int64 class indices in ``[0, C)``.
    """
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target, True)
    lse_s, lse_t = z_s.logsumexp(1, keepdim=True), z_t.logsumexp(1, keepdim=True)
    others_s = z_s.masked_fill(is_target, float("-inf")).logsumexp(1, keepdim=True)
    others_t = z_t.masked_fill(is_target, float("-inf")).logsumexp(1, keepdim=True)
    tckd = _kl_terms(z_t.gather(1, target) - lse_t, z_s.gather(1, target) - lse_s) + _kl_terms(
        others_t - lse_t, others_s - lse_s
    )
    nckd = _kl_terms(z_t - others_t, z_s - others_s).masked_fill(is_target, 0.0).sum(1, keepdim=True)
    return tckd, nckd


@LOSSES.register("dkd")
class DKD(nn.Module):
    """``min(epoch / warmup, 1) * tau**2 * (alpha * TCKD + beta * NCKD)``, averaged over instances.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1). fp16/bf16 inputs are
    computed in fp32; the teacher is detached.

    Args:
        alpha: weight of the target-class term (>= 0).
        beta: weight of the non-target-class term (>= 0).
        tau: temperature (> 0).
        warmup: epochs over which the loss ramps in linearly (>= 0; 0 disables the ramp).
            mdistiller counts epochs from 1, so epoch 1 of 20 gets 1/20.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, warmup: float = 20) -> None:
        super().__init__()
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        self.tau = check_positive("tau", tau)
        self.warmup = check_non_negative("warmup", warmup)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, tau={self.tau}, warmup={self.warmup}"

    def warmup_factor(self, epoch: object) -> float:
        """``min(epoch / warmup, 1)``; 1 when ``warmup`` is 0."""
        if self.warmup == 0:
            return 1.0
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or epoch < 0:
            raise ConfigError(
                f"DKD with warmup={self.warmup:g} needs epoch=<number >= 0> in the loss call, got {epoch!r}; "
                "pass the epoch or set warmup: 0"
            )
        return min(epoch / self.warmup, 1.0)

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        epoch: float | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The DKD loss (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"tckd", "nckd"}``: the mean divergences without
                ``tau**2``, weights or warm-up, detached.
            target: int class indices ``(N,)`` or ``(N, d1, ..., dk)``, in ``[0, C)`` where kept.
            mask: bool, the shape of ``target``; False positions (e.g. label 255) take no part.
                A mask keeping nothing gives 0.
            epoch: the current epoch, for the warm-up factor (needed unless ``warmup`` is 0).
            context: other keys are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        labels = instance_targets(target, student.shape, mask)
        factor = self.warmup_factor(epoch)
        tckd, nckd = decoupled_divergences(zero_masked(z_s, keep) / self.tau, zero_masked(z_t, keep) / self.tau, labels)
        weights = None if keep is None else keep.to(tckd.dtype)
        tckd, nckd = masked_mean(tckd, weights), masked_mean(nckd, weights)
        loss = factor * self.tau**2 * (self.alpha * tckd + self.beta * nckd)
        if return_parts:
            return loss, {"tckd": tckd.detach(), "nckd": nckd.detach()}
        return loss

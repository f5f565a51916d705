"""NKD: Normalized Knowledge Distillation (Yang et al., ICCV 2023, "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels").

NKD splits KD at the ground-truth class ``g``: the target term is a cross-entropy weighted by the
teacher's target probability (both at temperature 1), the non-target term matches the teacher's
and the student's distributions *renormalised over the non-target classes*, at temperature ``tau``:

    loss = mean_i [ -p_t[i, g] * log p_s[i, g] ]
           - gamma * tau**2 * mean_i sum_{j != g} q_t[i, j] * log q_s[i, j],

with ``p = softmax(z)`` and ``q = softmax over j != g of z / tau``. This follows the authors'
released code (yzd-v/cls_KD, ``NKDLoss`` in ``mmcls/models/dis_losses/nkd.py``), which removes the
ground-truth column before the non-target softmax; here the ground truth is excluded by a
log-sum-exp over the other classes, the same value. Differences: soft (one-hot / mixed) labels,
which the released code reduces to their arg-max, are not accepted (pass class indices); dense
logits ``(N, C, d1, ..., dk)`` with one instance per position and a ``mask`` are supported.
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


def target_term(z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
    """``-p_t[g] * log p_s[g]`` per instance ``(N, 1, S)`` of logits ``(N, C, S)`` (temperature 1)."""
    log_p_s = z_s.log_softmax(1).gather(1, target)
    p_t = z_t.softmax(1).gather(1, target)
    return -p_t * log_p_s


def non_target_cross_entropy(z_s: Tensor, z_t: Tensor, target: Tensor) -> Tensor:
    """``-sum_{j != g} q_t[j] * log q_s[j]`` per instance ``(N, 1, S)`` of scaled logits ``(N, C, S)``.

    ``q`` is the softmax over the classes other than the ground truth ``target`` ``(N, 1, S)``.
    """
    is_target = torch.zeros_like(z_s, dtype=torch.bool).scatter_(1, target, True)
    log_q_s = z_s - z_s.masked_fill(is_target, float("-inf")).logsumexp(1, keepdim=True)
    log_q_t = z_t - z_t.masked_fill(is_target, float("-inf")).logsumexp(1, keepdim=True)
    return -(log_q_t.exp() * log_q_s).masked_fill(is_target, 0.0).sum(1, keepdim=True)


@LOSSES.register("nkd")
class NKD(nn.Module):
    """``mean(-p_t[g] log p_s[g]) + gamma * tau**2 * mean(-sum_{j != g} q_t[j] log q_s[j])``.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1). Needs ``target``. fp16/bf16
    inputs are computed in fp32; the teacher is detached.

    Published settings (yzd-v/cls_KD ``configs/distillers``): CIFAR-100 (ResNet34 -> ResNet18)
    ``tau = 3, gamma = 3.5``; ImageNet ``tau = 1, gamma = 1.5`` (the code's defaults, used here). The
    loss is added to the student's CE with weight 1 (no separate weight in their distiller).

    Args:
        tau: temperature of the non-target term (> 0).
        gamma: weight of the non-target term (>= 0).
    """

    def __init__(self, tau: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.gamma = check_non_negative("gamma", gamma)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, gamma={self.gamma}"

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        target: Tensor | None = None,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The NKD loss (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"target", "non_target"}``: the mean target term and the mean
                non-target cross-entropy (without ``gamma * tau**2``), detached.
            target: int class indices ``(N,)`` or ``(N, d1, ..., dk)``, in ``[0, C)`` where kept.
            mask: bool, the shape of ``target``; False positions take no part. A mask keeping nothing
                gives 0.
            context: other keys (``epoch``, ...) are ignored.
        """
        if target is None:
            raise ConfigError("NKD needs the class labels: pass target=<int tensor of shape (N, ...)> in the loss call")
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        labels = instance_targets(target, student.shape, mask)
        z_s, z_t = zero_masked(z_s, keep), zero_masked(z_t, keep)
        weights = None if keep is None else keep.to(z_s.dtype)
        target_part = masked_mean(target_term(z_s, z_t, labels), weights)
        non_target = masked_mean(non_target_cross_entropy(z_s / self.tau, z_t / self.tau, labels), weights)
        loss = target_part + self.gamma * self.tau**2 * non_target
        if return_parts:
            return loss, {"target": target_part.detach(), "non_target": non_target.detach()}
        return loss

"""CTKD: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023).

KD's temperature becomes a learnable parameter trained *adversarially*: it reaches the temperature
through a gradient reversal layer, so the optimizer step that lowers the student's KD loss moves
the temperature to *raise* it. The reversal strength follows an easy-to-hard curriculum. As the
authors' released code (zhengli97/CTKD: ``models/temp_global.py``, ``helper/loops.py``,
``train_student.py``, ``scripts/run_cifar_distill.sh``):

- ``tau = t_start + t_range * sigmoid(GRL_lambda(theta))``, one global ``theta`` initialised to 1
  (their flags ``--t_start 1 --t_end 20``: ``t_end`` is the range, so ``tau`` lies in (1, 21));
- ``GRL_lambda`` is the identity forward and multiplies the gradient by ``-lambda`` backward;
- ``lambda(epoch) = lambda_end + (lambda_start - lambda_end) * (1 + cos(pi * e / decay_epochs)) / 2``
  with ``e = epoch`` clipped to ``[0, decay_epochs]`` (their ``CosineDecay`` with ``--decay_max 0
  --decay_min -1 --decay_loops 10``, whose value is ``-lambda``); epochs count from 1;
- ``loss = tau**2 * mean_i KL(softmax(t / tau) || softmax(s / tau))``.

``theta`` is trainable term state built in ``__init__`` (its shape does not depend on the inputs):
the engine trains it with the student in the term's own optimizer group and checkpoints it.

Differences from the released code: only the global temperature is implemented (the paper's
instance-wise variant is not in the released code), ``theta`` is a 0-dim tensor (theirs has shape
``(1,)``), and dense logits and masks are supported as in KD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import (
    as_instances,
    check_non_negative,
    check_positive,
    instance_mask,
    masked_mean,
    zero_masked,
)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength``."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-strength``."""
    return _ReverseGradient.apply(x, strength)


@LOSSES.register("ctkd")
class CTKD(nn.Module):
    """KD at a learnable, adversarially trained temperature ``tau = t_start + t_range * sigmoid(theta)``.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1; every position is one
    instance). fp16/bf16 inputs are computed in fp32; the teacher is detached. Needs ``epoch``
    (1-based) for the curriculum.

    Published CIFAR-100 settings (zhengli97/CTKD ``scripts/run_cifar_distill.sh``): CE weight 0.1
    (``-r``), CTKD weight 0.9 (``-a``), ``--t_start 1 --t_end 20``, cosine curriculum 0 -> 1 over 10
    epochs; SGD lr 0.05, momentum 0.9, weight decay 5e-4 for the student and ``theta`` alike, batch
    64, 240 epochs. With logit standardization (sunshangquan/logit-standardization-KD, ``CTKD/``)
    the weight is 9.

    Args:
        t_start: the lowest temperature (> 0).
        t_range: the temperature's range above ``t_start`` (> 0; the authors' ``--t_end``).
        lambda_start: reversal strength at epoch 0 (>= 0).
        lambda_end: reversal strength from epoch ``decay_epochs`` on (>= 0).
        decay_epochs: epochs of the cosine ramp from ``lambda_start`` to ``lambda_end`` (> 0).
    """

    def __init__(
        self,
        t_start: float = 1.0,
        t_range: float = 20.0,
        lambda_start: float = 0.0,
        lambda_end: float = 1.0,
        decay_epochs: float = 10,
    ) -> None:
        super().__init__()
        self.t_start = check_positive("t_start", t_start)
        self.t_range = check_positive("t_range", t_range)
        self.lambda_start = check_non_negative("lambda_start", lambda_start)
        self.lambda_end = check_non_negative("lambda_end", lambda_end)
        self.decay_epochs = check_positive("decay_epochs", decay_epochs)
        self.theta = nn.Parameter(torch.ones(()))

    def extra_repr(self) -> str:
        return (
            f"t_start={self.t_start}, t_range={self.t_range}, lambda_start={self.lambda_start}, "
            f"lambda_end={self.lambda_end}, decay_epochs={self.decay_epochs}"
        )

    def reversal_strength(self, epoch: object) -> float:
        """``lambda(epoch)``: the cosine curriculum of the reversal strength, a ConfigError without an epoch."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
            raise ConfigError(f"CTKD needs epoch=<number> (1-based) in the loss call for its curriculum, got {epoch!r}")
        progress = min(max(float(epoch), 0.0), self.decay_epochs) / self.decay_epochs
        return self.lambda_end + (self.lambda_start - self.lambda_end) * (1.0 + math.cos(math.pi * progress)) / 2

    def temperature(self, strength: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
        """``t_start + t_range * sigmoid(theta)``, a scalar of ``dtype`` (default: theta's).

        The gradient reaching ``theta`` through it is multiplied by ``-strength``.
        """
        theta = self.theta if dtype is None else self.theta.to(dtype)
        return self.t_start + self.t_range * torch.sigmoid(reverse_gradient(theta, strength))

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        epoch: float | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The KD loss at the learned temperature (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"kl": mean KL without tau**2, "temperature": tau}``, detached.
            mask: bool ``(N, d1, ..., dk)`` (``(N,)`` for 2-D logits); False positions take no part.
            epoch: the current epoch (1-based), for the reversal strength.
            context: other keys (``target``, ...) are ignored.
        """
        strength = self.reversal_strength(epoch)
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        tau = self.temperature(strength, z_s.dtype)
        log_p_s = (zero_masked(z_s, keep) / tau).log_softmax(1)
        log_p_t = (zero_masked(z_t, keep) / tau).log_softmax(1)
        divergence = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1, keepdim=True)
        kl = masked_mean(divergence, None if keep is None else keep.to(divergence.dtype))
        loss = tau**2 * kl
        if return_parts:
            return loss, {"kl": kl.detach(), "temperature": tau.detach()}
        return loss

"""KD: the classic soft-target distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_positive, instance_mask, masked_mean, zero_masked


@LOSSES.register("kd")
class KD(nn.Module):
    """``tau**2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over instances.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1; every position is one
    instance). fp16/bf16 inputs are computed in fp32; the teacher is detached.

    Args:
        tau: temperature (> 0).
    """

    def __init__(self, tau: float = 4.0) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The KD loss (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"kl": mean KL}`` (without the ``tau**2`` factor), detached.
            mask: bool ``(N, d1, ..., dk)`` (``(N,)`` for 2-D logits); False positions take no part.
                A mask keeping nothing gives 0.
            context: other keys (``target``, ``epoch``, ...) are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        log_p_s = (zero_masked(z_s, keep) / self.tau).log_softmax(1)
        log_p_t = (zero_masked(z_t, keep) / self.tau).log_softmax(1)
        divergence = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1, keepdim=True)
        kl = masked_mean(divergence, None if keep is None else keep.to(divergence.dtype))
        loss = self.tau**2 * kl
        if return_parts:
            return loss, {"kl": kl.detach()}
        return loss

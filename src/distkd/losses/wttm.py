"""WTTM: weighted transformed teacher matching (Zheng and Yang, ICLR 2024, "Knowledge Distillation
Based on Transformed Teacher Matching").

TTM drops the temperature on the student side: the student's plain softmax ``p_s = softmax(s)``
matches the teacher's power-transformed distribution ``q_t = p_t**gamma / U`` with
``U = sum_j p_t[j]**gamma`` (``gamma = 1 / T`` gives ``softmax(t / T)``). WTTM weights each
instance by ``U``, which is larger for smoother teacher predictions:

    loss = mean_i U_i * KL(q_t[i] || p_s[i]).

This follows the authors' released code (zkxufo/TTM, ``distiller_zoo/wttm.py``), computed in log
space (``gamma * log_softmax(t)`` and a log-sum-exp for ``log U``). Differences: dense logits
``(N, C, d1, ..., dk)`` with one instance per position and a ``mask`` are supported.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_positive, instance_mask, masked_mean, zero_masked


def transformed_teacher(z_t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(log q_t, U)`` of teacher logits ``(N, C, S)``: ``U = sum_j p_t**gamma`` is ``(N, 1, S)``."""
    powered = gamma * z_t.log_softmax(1)
    log_u = powered.logsumexp(1, keepdim=True)
    return powered - log_u, log_u.exp()


@LOSSES.register("wttm")
class WTTM(nn.Module):
    """``mean_i U_i * KL(p_t[i]**gamma / U_i || softmax(s[i]))`` with ``U_i = sum_j p_t[i, j]**gamma``.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1). fp16/bf16 inputs are
    computed in fp32; the teacher is detached.

    Published CIFAR-100 settings (zkxufo/TTM ``README.md`` and ``train_student.py``): CE weight 1
    (``-r 1``) plus ``-b`` times the loss; the paper's appendix A.4 lists the per-pair ``T = 1 /
    gamma`` and ``beta``. The README's WTTM example (added to CRD) uses ``--ttm_l 0.2`` with weight
    4, its TTM example ``--ttm_l 0.1`` with weight 45 (VGG13/VGG8); SGD lr 0.05 (0.01 for
    MobileNetV2/ShuffleNet students), batch 64, 240 epochs. The code's flag default
    ``--ttm_l 1`` is plain KD at ``T = 1``; the default here is the README's WTTM value 0.2.

    Args:
        gamma: the exponent of the power transform, ``1 / T`` (> 0).
    """

    def __init__(self, gamma: float = 0.2) -> None:
        super().__init__()
        self.gamma = check_positive("gamma", gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The WTTM loss (a scalar).

        Args:
            student: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``.
            teacher: logits of the same shape (no gradient reaches it).
            return_parts: also return ``{"kl": mean KL (TTM's loss), "weight": mean U}``, detached.
            mask: bool ``(N, d1, ..., dk)`` (``(N,)`` for 2-D logits); False positions take no part.
                A mask keeping nothing gives 0.
            context: other keys (``target``, ``epoch``, ...) are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        log_q_t, weight = transformed_teacher(zero_masked(z_t, keep), self.gamma)
        log_p_s = zero_masked(z_s, keep).log_softmax(1)
        divergence = F.kl_div(log_p_s, log_q_t, reduction="none", log_target=True).sum(1, keepdim=True)
        kept = None if keep is None else keep.to(divergence.dtype)
        loss = masked_mean(weight * divergence, kept)
        if return_parts:
            return loss, {"kl": masked_mean(divergence, kept).detach(), "weight": masked_mean(weight, kept).detach()}
        return loss

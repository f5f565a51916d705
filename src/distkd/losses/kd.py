"""KD: the classic soft-target distillation loss (Hinton et al., 2015)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_positive, instance_mask, masked_mean, zero_masked


@LOSSES.register("kd")
class KD(nn.Module):
    """``tau**2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over instances.

    ``activation="sigmoid"`` (detectors with sigmoid classifiers, e.g. RetinaNet's per-level anchor-class
    channels): each channel is a Bernoulli ``sigmoid(z / tau)``, the KL of every channel summed per instance.

    Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` (class dim 1; every position is one
    instance). fp16/bf16 inputs are computed in fp32; the teacher is detached.

    Args:
        tau: temperature (> 0).
        activation: ``"softmax"`` over classes, or ``"sigmoid"`` per class.
    """

    def __init__(self, tau: float = 4.0, activation: str = "softmax") -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        if activation not in ("softmax", "sigmoid"):
            raise ConfigError(f"unknown activation {activation!r}; choose one of softmax, sigmoid")
        self.activation = activation

    def extra_repr(self) -> str:
        return f"tau={self.tau}, activation={self.activation!r}"

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
        s, t = zero_masked(z_s, keep) / self.tau, zero_masked(z_t, keep) / self.tau
        if self.activation == "sigmoid":  # KL of Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s)) per channel
            p_t = t.sigmoid()
            divergence = (p_t * (F.logsigmoid(t) - F.logsigmoid(s))
                          + (1 - p_t) * (F.logsigmoid(-t) - F.logsigmoid(-s))).sum(1, keepdim=True)
        else:
            divergence = F.kl_div(s.log_softmax(1), t.log_softmax(1), reduction="none", log_target=True).sum(
                1, keepdim=True)
        kl = masked_mean(divergence, None if keep is None else keep.to(divergence.dtype))
        loss = self.tau**2 * kl
        if return_parts:
            return loss, {"kl": kl.detach()}
        return loss

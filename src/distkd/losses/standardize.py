"""Logit standardization (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation").

Before the softmax, the student's and the teacher's logits are each z-scored per instance,
``standardize(z) = (z - mean(z)) / (std(z) + eps)`` over the classes, so the student matches the
teacher's logit *relations* rather than their range; the shared temperature then acts as a base
temperature on unit-variance logits. This follows the authors' released code
(sunshangquan/logit-standardization-KD, ``normalize`` in ``mdistiller/distillers/KD.py``): the
unbiased standard deviation (``torch.std``, divisor ``C - 1``) and ``eps = 1e-7`` added to it.

``"ls_kd"``, ``"ls_dkd"`` and ``"ls_dist"`` are KD, DKD and DIST on standardised logits, with the
authors' base temperature 2 (``tools/train.py``: ``--base-temp 2``) as their default ``tau``; every
other argument, the parts and the mask handling are those of the wrapped loss. Dense logits
``(N, C, d1, ..., dk)`` are standardised per position. Masked positions are zeroed before
standardising, so whatever they hold reaches neither the value nor the gradient.

Deliberate differences from the released code:

- ``ls_dkd`` uses ``tau = 2``, the base temperature the README gives for "DKD+Ours"; the released
  ``tools/train.py`` writes that value to ``KD.TEMPERATURE``, which DKD never reads, so the released
  DKD+LS run keeps ``DKD.T = 4``.
- the authors publish no DIST+LS setting; ``ls_dist`` takes the same base temperature 2.
"""

from __future__ import annotations

from torch import Tensor

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_non_negative, instance_mask, zero_masked
from distkd.losses.dist import DIST
from distkd.losses.dkd import DKD
from distkd.losses.kd import KD

EPS = 1e-7  # the released code's constant


def standardize(logits: Tensor, eps: float = EPS) -> Tensor:
    """Z-score ``logits`` ``(N, C, ...)`` along the class dim 1: ``(z - mean) / (std + eps)``.

    ``std`` is the unbiased standard deviation over the ``C`` classes (divisor ``C - 1``), as
    ``torch.std`` and the authors' code. The result has the shape and dtype of ``logits``; with
    ``eps = 0`` a constant instance gives NaN.
    """
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def standardized_pair(student: Tensor, teacher: Tensor, mask: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Both logits standardised per instance, in their input shape (fp32 at least, teacher detached).

    ``mask``: bool ``(N, d1, ..., dk)`` or None; masked positions are zeroed first (they stay 0).
    """
    z_s, z_t = as_instances(student, teacher)
    keep = instance_mask(mask, student.shape)
    z_s, z_t = standardize(zero_masked(z_s, keep), eps), standardize(zero_masked(z_t, keep), eps)
    return z_s.reshape(student.shape), z_t.reshape(teacher.shape)


class _Standardized:
    """Mixin: standardise both logits, then run the wrapped loss (the next class in the MRO)."""

    eps: float

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The wrapped loss on ``standardize(student)`` and ``standardize(teacher)``; see its ``forward``."""
        z_s, z_t = standardized_pair(student, teacher, mask, self.eps)
        return super().forward(z_s, z_t, return_parts=return_parts, mask=mask, **context)  # type: ignore[misc]


@LOSSES.register("ls_kd")
class LSKD(_Standardized, KD):
    """KD on standardised logits: ``tau**2 * KL(softmax(Z(t) / tau) || softmax(Z(s) / tau))``.

    ``Z`` is :func:`standardize`. Logits ``(N, C)`` or ``(N, C, d1, ..., dk)``; parts ``{"kl"}`` as KD.

    Published CIFAR-100 settings (README and ``tools/train.py`` of sunshangquan/logit-standardization-KD,
    log names ``kd,TEACHER,STUDENT,TAU,WEIGHT`` in ``logs/KD``): KD weight 9 (``--kd-weight 9``; CE
    weight 1 in the repository's ``cfg.py``) with ``tau = 2``; ``tau = 3`` for VGG13/VGG8,
    VGG13/MobileNetV2, WRN-40-2/MobileNetV2, ResNet32x4/WRN-16-2 and ResNet32x4/WRN-40-2;
    ResNet110/ResNet20 ``tau = 4``, weight 12; ResNet50/MobileNetV2 ``tau = 3``, weight 1. mdistiller
    schedule (240 epochs, SGD lr 0.05, batch 64, weight decay 5e-4).

    Args:
        tau: base temperature (> 0).
        eps: added to the standard deviation (>= 0).
    """

    def __init__(self, tau: float = 2.0, eps: float = EPS) -> None:
        super().__init__(tau=tau)
        self.eps = check_non_negative("eps", eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


@LOSSES.register("ls_dkd")
class LSDKD(_Standardized, DKD):
    """DKD on standardised logits (``min(epoch / warmup, 1) * tau**2 * (alpha TCKD + beta NCKD)``).

    Needs ``target`` (and ``epoch`` unless ``warmup`` is 0), as DKD; parts ``{"tckd", "nckd"}``.

    Published CIFAR-100 settings: README "DKD+Ours": ``--base-temp 2 --kd-weight 9``; the released
    ``tools/train.py`` turns that into ``alpha = 1 * 9`` and ``beta = 9 * 9`` (it multiplies the
    already scaled alpha), i.e. term weight 9 with ``alpha = 1, beta = 9``, and leaves DKD's own
    ``T = 4``; the log names (``logs/DKD``) record per-pair weights 9 to 18 and betas 2 or 8. CE
    weight 1, warm-up 20 epochs, as DKD.

    Args:
        alpha: weight of the target-class term (>= 0).
        beta: weight of the non-target term (>= 0).
        tau: base temperature (> 0).
        warmup: linear warm-up epochs (>= 0; 0 disables it).
        eps: added to the standard deviation (>= 0).
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 8.0, tau: float = 2.0, warmup: float = 20, eps: float = EPS
    ) -> None:
        super().__init__(alpha=alpha, beta=beta, tau=tau, warmup=warmup)
        self.eps = check_non_negative("eps", eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        target: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """DKD's loss on standardised logits; a ConfigError without ``target``."""
        if target is None:
            raise ConfigError("ls_dkd needs the class labels: pass target=<int tensor of shape (N, ...)> to the loss")
        return super().forward(student, teacher, return_parts=return_parts, target=target, **context)


@LOSSES.register("ls_dist")
class LSDIST(_Standardized, DIST):
    """DIST on standardised logits: ``tau**2 * (beta * inter + gamma * intra)`` of ``softmax(Z(z) / tau)``.

    Parts ``{"inter", "intra"}`` as DIST. The authors of logit standardization publish no DIST
    setting: ``tau = 2`` is their base temperature for KD, DKD, MLKD and CTKD.

    Args:
        beta: weight of the inter-class term (>= 0).
        gamma: weight of the intra-class term (>= 0).
        tau: base temperature (> 0).
        activation: ``"softmax"`` or ``"sigmoid"``, as DIST.
        tau_squared: multiply by ``tau**2`` as DIST's released code.
        global_intra: intra-class term over the global batch of all ranks, as DIST.
        eps: added to the standard deviation (>= 0).
    """

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 2.0,
        activation: str = "softmax",
        tau_squared: bool = True,
        global_intra: bool = False,
        eps: float = EPS,
    ) -> None:
        super().__init__(
            beta=beta, gamma=gamma, tau=tau, activation=activation, tau_squared=tau_squared, global_intra=global_intra
        )
        self.eps = check_non_negative("eps", eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"

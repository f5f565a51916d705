"""MLKD: Multi-Level Logit Distillation (Jin, Wang and Lin, CVPR 2023).

MLKD aligns the student's softened predictions with the teacher's at three levels, each summed
over a list of temperatures, on the logits ``(N, C)`` of one batch. With ``P = softmax(z / tau)``:

- instance level: ``KD_tau = tau**2 * mean_i KL(P_t[i] || P_s[i])``;
- batch level: ``BC_tau = sum((P_t P_t^T - P_s P_s^T) ** 2) / N`` (the N x N sample relations);
- class level: ``CC_tau = sum((P_t^T P_t - P_s^T P_s) ** 2) / C`` (the C x C class relations).

Confidence masking uses the teacher at temperature 1: ``m`` keeps the instances whose top
probability is at most the batch median, ``c`` the classes whose summed probability is at most the
median over classes (medians with linear interpolation, as ``numpy.percentile(x, 50)``). The loss
is ``sum_tau (mean(m) * KD_tau + mean(m) * BC_tau + mean(c) * CC_tau)``, as the released code
(Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``) computes its
weak-view terms: it multiplies the *batch means* (``reduce=True``; the per-sample variant is
commented out) by the boolean masks and averages, so each mask scales its terms by the fraction it
keeps (about 1/2) rather than selecting instances or classes. This module follows the code.

What needs the data pipeline: the released training feeds every image twice through both networks,
a weak view (random crop and flip) and a strong one (the same, then RandAugment with two random
operations and Cutout; ``get_cifar100_train_transform_strong`` in the logit-standardization
repository's copy of the MLKD code). This loss is the weak view's terms; the released
total also adds the cross-entropy of both views and an unmasked ``sum_tau KD_tau`` in which, as
written, tau = 4, 3, 5 use the strong view's logits and tau = 2, 6 the weak view's. The strong
view's batch- and class-level terms are computed there but left out of the loss. A two-view
pipeline can add that KD sum as separate ``kd`` terms on the strong view's logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError, ShapeError
from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_positive

# The released code's cfg.KD.TEMPERATURE (4), then its hard-coded 3, 5, 2, 6.
TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def check_temperatures(value: Sequence[float]) -> tuple[float, ...]:
    """``value`` as a tuple of floats if it is a non-empty list of numbers > 0, else a ConfigError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ConfigError(
            f"temperatures must be a non-empty list of numbers > 0, got {value!r}; "
            "set e.g. temperatures: [4, 3, 5, 2, 6]"
        )
    return tuple(check_positive(f"temperatures[{i}]", tau) for i, tau in enumerate(value))


def below_median_fraction(values: Tensor) -> Tensor:
    """The fraction of ``values`` (1-D) that are <= their median (linear interpolation)."""
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


def instance_kd(log_p_s: Tensor, log_p_t: Tensor, tau: float) -> Tensor:
    """``tau**2 * mean_i KL(p_t[i] || p_s[i])`` of log-probabilities ``(N, C)``."""
    return tau**2 * F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1).mean()


def batch_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """``sum((p_t p_t^T - p_s p_s^T) ** 2) / N`` of probabilities ``(N, C)``."""
    return (p_t @ p_t.T - p_s @ p_s.T).square().sum() / p_s.shape[0]


def class_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """``sum((p_t^T p_t - p_s^T p_s) ** 2) / C`` of probabilities ``(N, C)``."""
    return (p_t.T @ p_t - p_s.T @ p_s).square().sum() / p_s.shape[1]


@LOSSES.register("mlkd")
class MLKD(nn.Module):
    """``sum_tau (mean(m) * (KD_tau + BC_tau) + mean(c) * CC_tau)`` on the logits ``(N, C)`` of a batch.

    See the module docstring for the terms and the masks. The batch- and class-level terms couple
    the instances, so dense logits and masks are not supported (a ShapeError). fp16/bf16 inputs are
    computed in fp32; the teacher is detached.

    Published CIFAR-100 settings (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/engine/cfg.py``
    and ``configs/cifar100/ours/*.yaml``): the whole MLKD sum weighted by ``KD.LOSS.KD_WEIGHT = 0.9``
    and CE (of both views) by 0.1; SGD, batch 64, weight decay 5e-4, lr decay x0.1 at 150/180/210;
    ResNet32x4/ResNet8x4 lr 0.025 for 240 epochs, ResNet32x4/ShuffleV1 lr 0.01 and ResNet50/MobileNetV2
    lr 0.0025 for 480 epochs. With logit standardization (sunshangquan/logit-standardization-KD) the
    list is 2, 3, 5, 2, 6, the weight 9, and only the instance-level KD sees standardised logits.

    Args:
        temperatures: the temperatures summed over (each > 0); the released list is 4, 3, 5, 2, 6.
    """

    def __init__(self, temperatures: Sequence[float] = TEMPERATURES) -> None:
        super().__init__()
        self.temperatures = check_temperatures(temperatures)

    def extra_repr(self) -> str:
        return f"temperatures={self.temperatures}"

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The MLKD loss (a scalar).

        Args:
            student: logits ``(N, C)`` of one batch.
            teacher: logits ``(N, C)`` (no gradient reaches it); its confidences set the masks.
            return_parts: also return ``{"instance", "batch", "class"}``: the three masked sums over
                the temperatures (they add up to the loss), detached.
            mask: not supported (a ShapeError when given).
            context: other keys (``target``, ``epoch``, ...) are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        if student.dim() != 2 or mask is not None:
            raise ShapeError(
                f"MLKD compares the logits (N, C) of a whole batch, without a mask; got logits of shape "
                f"{tuple(student.shape)}{' and a mask' if mask is not None else ''}"
            )
        z_s, z_t = z_s[..., 0], z_t[..., 0]
        p_t1 = z_t.softmax(1)
        kept_instances = below_median_fraction(p_t1.amax(1))
        kept_classes = below_median_fraction(p_t1.sum(0))
        kd = bc = cc = z_s.new_zeros(())
        for tau in self.temperatures:
            log_p_s, log_p_t = (z_s / tau).log_softmax(1), (z_t / tau).log_softmax(1)
            p_s, p_t = log_p_s.exp(), log_p_t.exp()
            kd = kd + instance_kd(log_p_s, log_p_t, tau)
            bc = bc + batch_relation(p_s, p_t)
            cc = cc + class_relation(p_s, p_t)
        parts = {"instance": kept_instances * kd, "batch": kept_instances * bc, "class": kept_classes * cc}
        loss = parts["instance"] + parts["batch"] + parts["class"]
        if return_parts:
            return loss, {k: v.detach() for k, v in parts.items()}
        return loss

"""VID: variational information distillation (Ahn et al., CVPR 2019), as RepDistiller's ``VIDLoss`` computes it.

The teacher's feature map ``t`` (N, C_t, H, W) is modelled as a Gaussian whose mean a small regressor predicts from
the student's map ``s`` and whose variance is one learned value per teacher channel; the loss is the mean negative
log-likelihood without its constant:

    mu = conv1x1(relu(conv1x1(relu(conv1x1(s)))))          channels C_s -> C_t -> C_t -> C_t, no biases
    var_c = softplus(log_scale_c) + eps                     log_scale_c starts at log(exp(init_pred_var - eps) - 1)
    loss = mean_{n,c,h,w} 0.5 * ((mu - t)**2 / var_c + log var_c)

When the spatial sizes differ, the larger map is average-pooled to the smaller one's size first (RepDistiller
pools to a square of the smaller height; distkd pools height and width separately, the same for square maps).

Several levels (a term with a list of module paths, shallow to deep) get one regressor each and their losses are
summed, as RepDistiller sums ``VIDLoss`` over the three stage outputs ``feat[1:-1]``. The regressors and
``log_scale`` are trainable distillation state built by the shape probe. Deliberate difference from mdistiller:
its ``VID`` keeps ``log_scale`` in a plain Python list, so the variances are never registered, moved or trained;
distkd trains them, as RepDistiller and the authors' code do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._features import check_probed_levels, level_parts, not_probed, paired_levels, pool_to_common
from distkd.losses._inputs import check_positive


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class GaussianRegressor(nn.Module):
    """The per-level VID head: a mean regressor (N, C_s, H, W) -> (N, C_t, H, W) and per-channel variances."""

    def __init__(self, s_channels: int, t_channels: int, init_pred_var: float, eps: float) -> None:
        super().__init__()
        self.mean = nn.Sequential(_conv1x1(s_channels, t_channels), nn.ReLU(), _conv1x1(t_channels, t_channels),
                                  nn.ReLU(), _conv1x1(t_channels, t_channels))
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def variance(self) -> Tensor:
        """``softplus(log_scale) + eps``, shape ``(C_t,)``."""
        return F.softplus(self.log_scale) + self.eps

    def nll(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The mean Gaussian negative log-likelihood (without ``log(2 pi) / 2``) of ``teacher`` given ``student``."""
        dtype = self.log_scale.dtype
        s, t = pool_to_common(student.to(dtype), teacher.detach().to(dtype))
        mu = self.mean(s).to(dtype)
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mu - t) ** 2 / var + var.log())).mean()


@LOSSES.register("vid")
class VID(nn.Module):
    """Variational information distillation on feature maps (N, C, H, W), one regressor per level.

    Published weights (not part of the loss, for configs): 1 on CIFAR-100 (RepDistiller
    ``scripts/run_cifar_distill.sh``: ``--distill vid -a 0 -b 1``, summed over the three stage outputs;
    mdistiller ``CFG.VID.LOSS.FEAT_WEIGHT = 1.0``).

    Args:
        init_pred_var: the variance every channel starts with (> eps), RepDistiller's default 5.0.
        eps: the variance floor added to the softplus (> 0), default 1e-5.
    """

    def __init__(self, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = check_positive("eps", eps)
        self.init_pred_var = check_positive("init_pred_var", init_pred_var)
        if self.init_pred_var <= self.eps:
            raise ConfigError(f"init_pred_var must exceed eps={self.eps:g}, got {init_pred_var!r}; set e.g. "
                              "init_pred_var: 5.0")
        self.regressors: nn.ModuleList | None = None

    def extra_repr(self) -> str:
        return f"init_pred_var={self.init_pred_var}, eps={self.eps}"

    def probe(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], **context: object) -> None:
        """Build one regressor per level for these feature maps (called once, by the shape probe)."""
        s, t = paired_levels(student, teacher, "VID")
        self.regressors = nn.ModuleList(
            GaussianRegressor(a.shape[1], b.shape[1], self.init_pred_var, self.eps) for a, b in zip(s, t, strict=True)
        ).to(s[0].device)

    def forward(
        self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], *, return_parts: bool = False,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The VID loss (a scalar), summed over levels; the teacher is detached.

        ``return_parts``: also return ``{"level<i>": loss of level i}`` for several levels, ``{}`` for one.
        """
        if self.regressors is None:
            raise not_probed("VID", "regressor")
        s, t = paired_levels(student, teacher, "VID")
        check_probed_levels("VID", len(self.regressors), len(s))
        values = [head.nll(a, b) for head, a, b in zip(self.regressors, s, t, strict=True)]
        loss = torch.stack(values).sum()
        return (loss, level_parts(values)) if return_parts else loss

"""OFD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al., ICCV 2019), as the authors' code
(clovaai/overhaul-distillation, CIFAR-100) and megvii-research/mdistiller compute it.

Both sides are PRE-ReLU feature maps. A connector (a ``k x k`` conv without bias, ``k = 1`` by default, then
BatchNorm; conv weights ~ N(0, 2 / (k k C_t)), BN weight 1, bias 0) maps the student's map to the teacher's
channels; the teacher's map is average-pooled to the student's size (mdistiller; the authors' CIFAR code taps
equal sizes). The partial L2 distance ignores the student where the teacher's neuron is off and the student is
already below the teacher's margin ``m_c`` (a per-channel negative value):

    t' = max(t, m_c)
    d_l = sum_{c,h,w} (s - t')**2 * [s > t' or t' > 0] / N                      (N the batch size)
    loss = sum_l d_l / 2**(L - 1 - l)            levels l = 0 .. L-1, shallow to deep (a single map: L = 1)

The margin is the expectation of the teacher's negative responses under a Gaussian model of the pre-ReLU value with
per-channel mean ``mu`` and standard deviation ``sigma``:

    m_c = mu - sigma * phi(mu / sigma) / Phi(-mu / sigma)     if Phi(-mu / sigma) > 0.001, else -3 sigma

The authors take ``sigma = |gamma|`` and ``mu = beta`` from the affine parameters of the teacher's BatchNorm right
before the ReLU. distkd does exactly that when the shape probe's context carries ``teacher_bn`` (that BatchNorm
module, or a list of them, one per level): the Distiller passes it when the teacher declares the BatchNorm of each
tapped feature (``distill_preact_bn``; the CIFAR ResNets, ResNet-50, WRNs and VGGs of the zoo do, with the authors'
``get_bn_before_relu`` choices: a ResNet's last block's ``bn2``/``bn3``, before the shortcut is added). Without it
(MobileNetV2, ShuffleNets, other models) the margin is estimated from the probe batch: ``mu`` and ``sigma`` are the
per-channel mean and standard deviation of the teacher's pre-ReLU map over (N, H, W). The margins are buffers
(saved with the term state). A term with a list of module paths gives the L levels (mdistiller uses the pre-ReLU
output of every stage after the stem, ``preact_feats[1:]``).

Other differences from the originals: both put the teacher's BatchNorm layers in training mode while distilling
(batch statistics in the teacher's features); distkd's Distiller keeps the teacher in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from distkd.errors import ShapeError
from distkd.losses import LOSSES
from distkd.losses._features import check_int, check_probed_levels, level_parts, not_probed, paired_levels


def gaussian_margin(mean: Tensor, std: Tensor) -> Tensor:
    """``E[x | x < 0]`` for ``x ~ N(mean, std**2)`` per channel, ``-3 std`` where ``P(x < 0) <= 0.001``.

    ``mean``, ``std``: ``(C,)``; computed in float64 (the authors use Python floats), returned in float64.
    ``std`` is taken by absolute value (a BatchNorm weight may be negative) and floored at 1e-12.
    """
    s = std.detach().double().abs().clamp_min(1e-12)
    m = mean.detach().double()
    below = torch.special.ndtr(-m / s)
    expected = m - s * torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below
    return torch.where(below > 0.001, expected, -3 * s)


def batch_statistics(teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of (N, C, H, W) over (N, H, W)."""
    x = teacher.detach().double().transpose(0, 1).flatten(1)
    return x.mean(1), x.std(1, correction=0)


class OFDLevel(nn.Module):
    """One level: the connector (N, C_s, H, W) -> (N, C_t, H', W') and the teacher's margin buffer ``(C_t,)``."""

    def __init__(self, s_channels: int, t_channels: int, kernel_size: int, margin: Tensor) -> None:
        super().__init__()
        conv = nn.Conv2d(s_channels, t_channels, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channels)))
        self.connector = nn.Sequential(conv, nn.BatchNorm2d(t_channels))
        self.register_buffer("margin", margin.float())

    def distance(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``d_l``: the partial L2 distance between the connected student and the pooled teacher, per sample."""
        dtype = self.margin.dtype
        source = self.connector(student.to(dtype)).to(dtype)
        target = teacher.detach().to(dtype)
        if target.shape[2:] != source.shape[2:]:
            target = F.adaptive_avg_pool2d(target, source.shape[2:])
        target = torch.maximum(target, self.margin.view(1, -1, 1, 1))
        keep = (source > target) | (target > 0)
        return ((source - target) ** 2 * keep).sum() / student.shape[0]


def _bn_list(teacher_bn: object, count: int) -> list[nn.Module | None]:
    """The context's ``teacher_bn`` as one entry per level (None: estimate that level's margin from the batch)."""
    if teacher_bn is None:
        return [None] * count
    bns = list(teacher_bn) if isinstance(teacher_bn, (list, tuple, nn.ModuleList)) else [teacher_bn]
    if len(bns) != count or not all(isinstance(bn, _BatchNorm) and bn.affine for bn in bns):
        raise ShapeError(f"OFD's teacher_bn must be {count} affine BatchNorm module(s), one per level, got "
                         f"{teacher_bn!r}")
    return bns


def level_margin(teacher: Tensor, bn: nn.Module | None) -> Tensor:
    """The margin ``(C_t,)`` of one level: from ``bn``'s affine parameters, else from ``teacher``'s statistics."""
    if bn is None:
        return gaussian_margin(*batch_statistics(teacher))
    if bn.weight.numel() != teacher.shape[1]:
        raise ShapeError(f"OFD's teacher_bn has {bn.weight.numel()} channels but the teacher's map is "
                         f"{tuple(teacher.shape)}; pass the BatchNorm right before the tapped ReLU")
    return gaussian_margin(bn.bias, bn.weight)


@LOSSES.register("ofd")
class OFD(nn.Module):
    """The overhaul-of-feature-distillation loss on pre-ReLU feature maps (N, C, H, W), one connector per level.

    Published weights (not part of the loss, for configs): 1e-3 on CIFAR-100 (the authors'
    ``CIFAR-100/train_with_distillation.py``: ``loss_distill.sum() / batch_size / 1000``; mdistiller
    ``CFG.OFD.LOSS.FEAT_WEIGHT = 0.001``).

    Args:
        kernel_size: the connector's conv kernel (an int >= 1), mdistiller's ``CFG.OFD.CONNECTOR.KERNEL_SIZE = 1``.
    """

    def __init__(self, kernel_size: int = 1) -> None:
        super().__init__()
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        self.levels: nn.ModuleList | None = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"

    def probe(
        self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], *, teacher_bn: object = None,
        **context: object,
    ) -> None:
        """Build the connectors and the margins (called once, by the shape probe).

        ``teacher_bn``: the teacher's BatchNorm before each tapped ReLU (a module, or a list with one per level) for
        the authors' margins; None estimates them from this batch (see the module docstring).
        """
        s, t = paired_levels(student, teacher, "OFD")
        bns = _bn_list(teacher_bn, len(t))
        self.levels = nn.ModuleList(
            OFDLevel(a.shape[1], b.shape[1], self.kernel_size, level_margin(b, bn))
            for a, b, bn in zip(s, t, bns, strict=True)
        ).to(s[0].device)

    def forward(
        self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], *, return_parts: bool = False,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The OFD loss (a scalar); the teacher is detached.

        ``return_parts``: also return ``{"level<i>": d_i / 2**(L - 1 - i)}`` for several levels (they sum to the
        loss), ``{}`` for one.
        """
        if self.levels is None:
            raise not_probed("OFD", "connector")
        s, t = paired_levels(student, teacher, "OFD")
        check_probed_levels("OFD", len(self.levels), len(s))
        count = len(s)
        values = [level.distance(a, b) / 2.0 ** (count - 1 - i)
                  for i, (level, a, b) in enumerate(zip(self.levels, s, t, strict=True))]
        loss = torch.stack(values).sum()
        return (loss, level_parts(values)) if return_parts else loss

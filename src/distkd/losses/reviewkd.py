"""ReviewKD: "Distilling Knowledge via Knowledge Review" (Chen et al., CVPR 2021), as mdistiller's ``ReviewKD`` and
the authors' CIFAR-100 code (dvlab-research/ReviewKD) compute it: attention-based fusion (ABF) of the student's
stage features from deep to shallow, and the hierarchical context loss (HCL) against the teacher's.

Both sides are LISTS of L features, shallow to deep (a term with a list of module paths); a 2-D entry (N, C), such as
the pooled feature both originals append as the deepest level, is a (N, C, 1, 1) map. The originals feed the student's
post-ReLU stage outputs (mdistiller ``STU_PREACT = False``) and the teacher's pre-ReLU ones.

One ABF per level ``l`` (``C_mid = min(max_mid_channels, C_s[L-1])``; conv weights Kaiming-uniform with ``a = 1``):

    x_l = BN(conv1x1(s_l))                                        (N, C_mid, H_l, W_l), from the student's level l
    for l < L-1 (fusion with the deeper result r_{l+1}, nearest-upsampled to (H_l, W_l)):
        a = sigmoid(conv1x1([x_l, r_{l+1}]))                      (N, 2, H_l, W_l)
        x_l = x_l * a[:, 0] + r_{l+1} * a[:, 1]
    r_l = x_l, nearest-resized to the teacher's size at level l
    y_l = BN(conv3x3(r_l))                                        (N, C_t[l], H'_l, W'_l)

    hcl(y, t) = [mse(y, t) + sum_k 2**-k mse(pool_{p_k}(y), pool_{p_k}(t))] / (1 + sum_k 2**-k)
        over p = 4, 2, 1 smaller than the map's height (k counts the pooled terms used, from 1)
    loss = min(epoch / warmup, 1) * sum_l hcl(y_l, t_l)

mse is the element mean; pool_p the adaptive average pool to p x p. The ABFs are trainable distillation state built
by the shape probe. Deliberate differences: sizes are compared as (height, width) pairs (the originals compare
widths and resize to squares; the same for square maps). The warm-up counts epochs from 1, as mdistiller (and distkd)
do; the authors' script counts from 0, so its first epoch has weight 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._features import check_int, check_probed_levels, level_parts, not_probed, paired_levels
from distkd.losses._inputs import check_non_negative

HCL_POOLS = (4, 2, 1)


class ABF(nn.Module):
    """Attention-based fusion of one level: student (N, C_in, H, W) [+ deeper result] -> (N, C_out, H', W')."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``(y_l, r_l)``: the level's output at ``out_size`` and the fused features handed to the next level."""
        x = self.conv1(x)
        if self.att_conv is not None and residual is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, :1] + residual * attention[:, 1:]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hcl(student: Tensor, teacher: Tensor) -> Tensor:
    """The hierarchical context loss of one level: maps (N, C, H, W) of equal shape -> a scalar."""
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in HCL_POOLS:
        if size >= student.shape[2]:
            continue
        weight /= 2
        pooled = F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        loss, total = loss + weight * pooled, total + weight
    return loss / total


def review(abfs: nn.ModuleList, student: list[Tensor], sizes: list[tuple[int, ...]]) -> list[Tensor]:
    """The ABF outputs ``y_l``, shallow to deep, of student maps for the teacher's sizes ``(H'_l, W'_l)``."""
    outputs, residual = [], None
    for abf, x, size in zip(list(abfs)[::-1], student[::-1], sizes[::-1], strict=True):
        y, residual = abf(x, residual, size)
        outputs.append(y)
    return outputs[::-1]


def _as_map(x: Tensor) -> Tensor:
    """(N, C) -> (N, C, 1, 1); maps unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


@LOSSES.register("reviewkd")
class ReviewKD(nn.Module):
    """ReviewKD's ABF + HCL on lists of stage features, shallow to deep ((N, C, H, W) or pooled (N, C)).

    Published weights (not part of the loss, for configs), CIFAR-100: the authors' ``CIFAR-100/script/reviewKD.sh``
    uses 5.0 (WRN-40-2 -> WRN-16-2, WRN-40-2 -> WRN-40-1, WRN-40-2 -> ShuffleV1, ResNet32x4 -> ResNet8x4,
    ResNet32x4 -> ShuffleV1), 8.0 (ResNet32x4 -> ShuffleV2), 0.6 (ResNet56 -> ResNet20), 1.0 (ResNet110 ->
    ResNet32; also the script default); mdistiller: ``CFG.REVIEWKD.REVIEWKD_WEIGHT = 1.0``, 5.0 in
    ``configs/cifar100/reviewkd.yaml`` (ResNet32x4 -> ResNet8x4).

    Args:
        warmup: epochs over which the loss ramps in linearly (>= 0; 0 disables), default 20 (both originals).
        max_mid_channels: cap of the ABFs' middle width (an int >= 1), default 512.
    """

    def __init__(self, warmup: float = 20, max_mid_channels: int = 512) -> None:
        super().__init__()
        self.warmup = check_non_negative("warmup", warmup)
        self.max_mid_channels = check_int("max_mid_channels", max_mid_channels, 1)
        self.abfs: nn.ModuleList | None = None

    def extra_repr(self) -> str:
        return f"warmup={self.warmup}, max_mid_channels={self.max_mid_channels}"

    def probe(self, student: list[Tensor], teacher: list[Tensor], **context: object) -> None:
        """Build one ABF per level for these features (called once, by the shape probe)."""
        s, t = paired_levels(student, teacher, "ReviewKD", dims=(2, 4))
        mid = min(self.max_mid_channels, s[-1].shape[1])
        count = len(s)
        self.abfs = nn.ModuleList(
            ABF(a.shape[1], mid, b.shape[1], fuse=i < count - 1) for i, (a, b) in enumerate(zip(s, t, strict=True))
        ).to(s[0].device)

    def warmup_factor(self, epoch: object) -> float:
        """``min(epoch / warmup, 1)``; 1 when ``warmup`` is 0."""
        if self.warmup == 0:
            return 1.0
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or epoch < 0:
            raise ConfigError(f"ReviewKD with warmup={self.warmup:g} needs epoch=<number >= 0> in the loss call, "
                              f"got {epoch!r}; pass the epoch or set warmup: 0")
        return min(epoch / self.warmup, 1.0)

    def forward(
        self, student: list[Tensor], teacher: list[Tensor], *, return_parts: bool = False, epoch: float | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The ReviewKD loss (a scalar); the teacher is detached.

        ``epoch``: the current epoch, for the warm-up (needed unless ``warmup`` is 0). ``return_parts``: also
        return ``{"hcl": sum_l hcl_l}`` without the warm-up factor and, for several levels, ``{"level<i>": hcl_i}``.
        """
        if self.abfs is None:
            raise not_probed("ReviewKD", "ABF")
        s, t = paired_levels(student, teacher, "ReviewKD", dims=(2, 4))
        check_probed_levels("ReviewKD", len(self.abfs), len(s))
        factor = self.warmup_factor(epoch)
        dtype = self.abfs[0].conv1[0].weight.dtype
        t = [_as_map(x).detach().to(dtype) for x in t]
        outputs = review(self.abfs, [_as_map(x).to(dtype) for x in s], [tuple(x.shape[2:]) for x in t])
        values = [hcl(y.to(dtype), x) for y, x in zip(outputs, t, strict=True)]
        total = torch.stack(values).sum()
        loss = factor * total
        return (loss, {"hcl": total.detach(), **level_parts(values)}) if return_parts else loss

"""FPN mimic: MSE between the student's FPN levels, each through a learnable 1x1 conv, and the teacher's.

The DIST authors' "DIST + mimic" detection rows (hunto/MasKD, mmrazor): ``sum_l mean((conv_l(s_l) - t_l) ** 2)``
over the FPN levels, one 1x1 conv per level (256 -> 256 channels on COCO), weight 1. The convs are trainable
distillation state, sized by the shape probe and trained with the student (never exported with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ShapeError
from distkd.losses import LOSSES

Levels = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


def _levels(x: Levels, role: str) -> list[Tensor]:
    """Feature maps (N, C, H, W): one tensor, a list of them, or an FPN's ordered dict of levels."""
    levels = list(x.values()) if isinstance(x, Mapping) else [x] if isinstance(x, Tensor) else list(x)
    for level in levels:
        if level.dim() != 4:
            raise ShapeError(f"mimic compares feature maps (N, C, H, W); a {role} level is {tuple(level.shape)}: "
                             "tap the FPN (fpn) or convolutional layers")
    return levels


@LOSSES.register("mimic")
class Mimic(nn.Module):
    """``sum_l mean((adapter_l(s_l) - t_l) ** 2)`` over feature levels, ``adapter_l`` a 1x1 conv C_s -> C_t."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleList()

    def probe(self, student: Levels, teacher: Levels, **context: object) -> None:
        """Build one 1x1 conv per level for these features (called once, by the shape probe)."""
        s, t = _levels(student, "student"), _levels(teacher, "teacher")
        self._check(s, t)
        self.adapters = nn.ModuleList(nn.Conv2d(a.shape[1], b.shape[1], 1) for a, b in zip(s, t, strict=True))
        self.adapters.to(s[0].device)

    def _check(self, s: list[Tensor], t: list[Tensor]) -> None:
        if len(s) != len(t) or any(a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]
                                   for a, b in zip(s, t, strict=True)):
            raise ShapeError(f"mimic needs the same levels and sizes: student {[tuple(a.shape) for a in s]}, teacher "
                             f"{[tuple(b.shape) for b in t]}")

    def forward(self, student: Levels, teacher: Levels, *, return_parts: bool = False,
                **context: object) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The summed per-level MSE (a scalar); the teacher is detached. ``return_parts``: also return ``{}``."""
        s, t = _levels(student, "student"), _levels(teacher, "teacher")
        if len(self.adapters) != len(s):
            raise ShapeError("mimic's 1x1 convs are sized by a shape probe: call Distiller.probe(batch) once before "
                             "the first step (distkd's trainer does)")
        self._check(s, t)
        loss = sum(F.mse_loss(conv(a).float(), b.detach().float()) for conv, a, b in zip(self.adapters, s, t,
                                                                                          strict=True))
        return (loss, {}) if return_parts else loss

"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015), as RepDistiller and mdistiller run it.

A learnable regressor maps the student's feature map (N, C_s, H_s, W_s) to the teacher's (N, C_t, H_t, W_t),
and the loss is the mean squared error between the two: ``mean((r(f_s) - f_t) ** 2)``. The regressor is
RepDistiller's ``ConvReg``: a convolution chosen by the spatial sizes, BatchNorm, ReLU:

- ``H_s == 2 H_t``: 3x3 conv, stride 2, padding 1;
- ``2 H_s == H_t``: 4x4 transposed conv, stride 2, padding 1;
- ``H_s >= H_t``: a ``(1 + H_s - H_t) x (1 + W_s - W_t)`` conv without padding (1x1 for equal sizes).

The regressor is trainable distillation state: its shapes come from the shape probe
(:meth:`distkd.distill.Distiller.probe`), it is trained with the student and never exported with it. The
original scripts weight the term by 100 on CIFAR-100 (a config's ``weight``, not part of the loss).

RepDistiller trains the hint together with cross-entropy from the first epoch (its table's FitNet). The FitNets
paper's two stages come from one config too: a ``pretrain`` stage in which the hint term (``pretrain_weight: 1``)
trains the student up to the guided layer and the regressor, the layers after it frozen (``pretrain.freeze:
[stage3, fc]`` for a CIFAR ResNet guided at ``stage2``), then the main run with KD and the hint at weight 0.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ShapeError
from distkd.losses import LOSSES
from distkd.losses._inputs import check_flag


class ConvRegressor(nn.Module):
    """RepDistiller's ``ConvReg``: (N, C_s, H_s, W_s) -> (N, C_t, H_t, W_t), conv + BN (+ ReLU)."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], use_relu: bool = True) -> None:
        super().__init__()
        (_, s_c, s_h, s_w), (_, t_c, t_h, t_w) = student_shape, teacher_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ShapeError(f"FitNet cannot map a student feature map of {s_h}x{s_w} to the teacher's {t_h}x{t_w}; "
                             "tap layers whose sizes are equal, double or half")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


@LOSSES.register("fitnet")
class FitNet(nn.Module):
    """FitNet hint loss ``mean((regressor(f_s) - f_t) ** 2)`` on feature maps (N, C, H, W).

    Args:
        use_relu: end the regressor with a ReLU, as RepDistiller's ``ConvReg`` (default True).
    """

    def __init__(self, use_relu: bool = True) -> None:
        super().__init__()
        self.use_relu = check_flag("use_relu", use_relu)
        self.regressor: ConvRegressor | None = None

    def probe(self, student: Tensor, teacher: Tensor, **context: object) -> None:
        """Build the regressor for these feature maps (called once, by the shape probe)."""
        for role, x in (("student", student), ("teacher", teacher)):
            if x.dim() != 4:
                raise ShapeError(f"FitNet compares feature maps (N, C, H, W); the {role}'s is {tuple(x.shape)}: "
                                 "tap a convolutional layer")
        self.regressor = ConvRegressor(tuple(student.shape), tuple(teacher.shape), self.use_relu).to(student.device)

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The hint loss (a scalar); the teacher is detached. ``return_parts``: also return ``{}``."""
        if self.regressor is None:
            raise ShapeError("FitNet's regressor is sized by a shape probe: call Distiller.probe(batch) once before "
                             "the first step (distkd's trainer does)")
        loss = F.mse_loss(self.regressor(student).float(), teacher.detach().float())
        return (loss, {}) if return_parts else loss

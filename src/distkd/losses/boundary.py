"""AB: distillation of activation boundaries formed by hidden neurons (Heo et al., AAAI 2019), as RepDistiller's
``ABLoss`` with its ``Connector`` computes it.

Both sides are PRE-ReLU feature maps (RepDistiller calls the models with ``preact=True``); a connector maps the
student's map to the teacher's shape (identity when channels and size already agree, else RepDistiller's ``ConvReg``
without ReLU: a conv chosen by the sizes, then BatchNorm, see :class:`distkd.losses.fitnet.ConvRegressor`). The
margin loss pushes the connected student response ``s`` past ``-margin`` where the teacher's neuron is off and past
``+margin`` where it is on (``m`` = margin, sums over every element of the level):

    ab_l = sum (s + m)**2 * [s > -m and t <= 0] + (s - m)**2 * [s <= m and t > 0]
    loss = sum_l 2**(l - L + 1) * ab_l / N * 3 / 1000          levels l = 0 .. L-1, shallow to deep

``N`` is the batch size and ``3 / 1000`` is inside RepDistiller's (and the authors') criterion. A term with a list of
module paths gives the L levels (RepDistiller uses the three stage outputs ``feat[1:-1]``); a single map is L = 1.

Training stages in the original, both run by one config (a ``pretrain`` stage, then the main schedule):

1. initialisation, ``init_epochs = 30``: the connectors and the student's feature layers (all but the classifier)
   are trained with this loss alone (no cross-entropy), SGD with the run's constant lr (0.05; 0.01 for
   MobileNetV2/ShuffleNet students), momentum 0.9, weight decay 5e-4 (RepDistiller ``helper/pretrain.py``); the
   authors' ``cifar10_AB_distillation.py`` does the same (lr 0.1, Nesterov);
2. classification: the connectors are dropped and the student is trained with cross-entropy only (RepDistiller's
   ``train_distill`` sets the AB term to 0; the authors optionally add KD).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distkd.errors import ShapeError
from distkd.losses import LOSSES
from distkd.losses._features import (
    check_probed_levels,
    compute_dtype,
    level_parts,
    not_probed,
    paired_levels,
)
from distkd.losses._inputs import check_positive
from distkd.losses.fitnet import ConvRegressor


def boundary_sum(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """RepDistiller's ``criterion_alternative_l2``: the summed margin loss of ``source`` against ``target``'s signs.

    ``source``, ``target``: the same shape (any); returns a scalar.
    """
    off = (source > -margin) & (target <= 0)
    on = (source <= margin) & (target > 0)
    return ((source + margin) ** 2 * off + (source - margin) ** 2 * on).sum()


def connector(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
    """RepDistiller's AB connector: identity for equal (C, H, W), else ConvReg without ReLU."""
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    try:
        return ConvRegressor(tuple(student_shape), tuple(teacher_shape), use_relu=False)
    except ShapeError:
        raise ShapeError(f"AB cannot connect a student feature map {tuple(student_shape)} to the teacher's "
                         f"{tuple(teacher_shape)}; tap layers whose sizes are equal, double or half") from None


@LOSSES.register("ab")
class ActivationBoundary(nn.Module):
    """The activation-boundary margin loss on pre-ReLU feature maps (N, C, H, W), one connector per level.

    Published weights (not part of the loss, for configs): RepDistiller's CIFAR-100 script passes ``-b 1``, but its
    training loop sets the AB term to 0 after the initialisation stage, so the effective weight is 0 in the main
    stage and 1 (the whole objective) in the 30-epoch initialisation (see the module docstring).

    Args:
        margin: the boundary margin ``m`` (> 0), default 1.0 (RepDistiller ``ABLoss`` and the authors' code).
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = check_positive("margin", margin)
        self.connectors: nn.ModuleList | None = None

    def extra_repr(self) -> str:
        return f"margin={self.margin}"

    def probe(self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], **context: object) -> None:
        """Build one connector per level for these pre-ReLU maps (called once, by the shape probe)."""
        s, t = paired_levels(student, teacher, "AB")
        self.connectors = nn.ModuleList(connector(a.shape, b.shape) for a, b in zip(s, t, strict=True)).to(s[0].device)

    def _level(self, head: nn.Module, student: Tensor, teacher: Tensor) -> Tensor:
        """``ab_l / N * 3 / 1000`` for one level."""
        weight = next(head.parameters(), None)
        dtype = compute_dtype(student, teacher) if weight is None else weight.dtype
        source = head(student.to(dtype)).to(dtype)
        if source.shape != teacher.shape:
            raise ShapeError(f"AB's connector maps the student's {tuple(student.shape)} to {tuple(source.shape)}, "
                             f"not the teacher's {tuple(teacher.shape)}; tap layers of proportional sizes")
        return boundary_sum(source, teacher.detach().to(dtype), self.margin) / student.shape[0] * 3 / 1000

    def forward(
        self, student: Tensor | list[Tensor], teacher: Tensor | list[Tensor], *, return_parts: bool = False,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The AB loss (a scalar); the teacher is detached.

        ``return_parts``: also return ``{"level<i>": 2**(i - L + 1) * ab_i / N * 3 / 1000}`` for several levels
        (they sum to the loss), ``{}`` for one.
        """
        if self.connectors is None:
            raise not_probed("AB", "connector")
        s, t = paired_levels(student, teacher, "AB")
        check_probed_levels("AB", len(self.connectors), len(s))
        count = len(s)
        values = [2.0 ** (i - count + 1) * self._level(head, a, b)
                  for i, (head, a, b) in enumerate(zip(self.connectors, s, t, strict=True))]
        loss = torch.stack(values).sum()
        return (loss, level_parts(values)) if return_parts else loss

"""FSP: the flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017), as
RepDistiller's ``FSP`` computes it.

The FSP matrix of two consecutive feature maps ``b`` (N, C_i, H, W) and ``u`` (N, C_{i+1}, H, W) of one network is
their channel-by-channel inner product averaged over positions (the larger map is average-pooled to the smaller's
size first); the loss matches the student's matrices to the teacher's:

    G(b, u)[n, j, i] = mean_{h,w} u[n, j, h, w] * b[n, i, h, w]           (N, C_{i+1}, C_i)
    loss = sum_{i=0}^{L-2} mean_{n,j,i} (G(s_i, s_{i+1}) - G(t_i, t_{i+1}))**2

So FSP takes a LIST of L >= 2 feature maps per side (a term with a list of module paths, shallow to deep), and the
student's and the teacher's maps must have equal channel counts level by level. It owns no trainable state; the
shape probe only checks the levels.

Training stages in the original, both run by one config (a ``pretrain`` stage, then the main schedule):

1. initialisation, ``init_epochs = 30``: the student's feature layers (all but the classifier) are trained with this
   loss alone, on the stem output and every stage output (RepDistiller's ``feat[:-1]``), SGD with the run's
   constant lr (0.05; 0.01 for MobileNetV2/ShuffleNet students), momentum 0.9, weight decay 5e-4 (RepDistiller
   ``helper/pretrain.py``);
2. classification: the student is trained with cross-entropy only (RepDistiller's ``train_distill`` sets the FSP term
   to 0, although its script passes ``-b 50``).
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
    paired_levels,
    pool_to_common,
)


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """``G[n, j, i] = mean_hw top[n, j] * bottom[n, i]``: (N, C_b, H, W), (N, C_u, H', W') -> (N, C_u, C_b)."""
    bottom, top = pool_to_common(bottom, top)
    with torch.autocast(bottom.device.type, enabled=False):  # the products in the inputs' dtype, not fp16
        return top.flatten(2) @ bottom.flatten(2).transpose(1, 2) / bottom[0, 0].numel()


@LOSSES.register("fsp")
class FSP(nn.Module):
    """FSP-matrix matching over consecutive levels of feature maps (lists of (N, C_l, H_l, W_l), equal channels).

    Published weights (not part of the loss, for configs): 0 in RepDistiller's CIFAR-100 main stage (its script
    passes ``-b 50`` but the training loop sets the FSP term to 0); the loss is the whole objective of the 30-epoch
    initialisation (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.num_levels: int | None = None

    def probe(self, student: list[Tensor], teacher: list[Tensor], **context: object) -> None:
        """Check the levels: at least two, equal channels on both sides (called once, by the shape probe)."""
        s, t = paired_levels(student, teacher, "FSP")
        if len(s) < 2:
            raise ShapeError("FSP relates consecutive feature maps: give the term a list of at least two module paths")
        for i, (a, b) in enumerate(zip(s, t, strict=True)):
            if a.shape[1] != b.shape[1]:
                raise ShapeError(f"FSP needs equal channels level by level; at level {i} the student's map is "
                                 f"{tuple(a.shape)} and the teacher's {tuple(b.shape)}: tap layers of equal width")
        self.num_levels = len(s)

    def forward(
        self, student: list[Tensor], teacher: list[Tensor], *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The FSP loss (a scalar); the teacher is detached.

        ``return_parts``: also return ``{"pair<i>": the loss of levels i, i+1}`` for several pairs, ``{}`` for one.
        """
        if self.num_levels is None:
            raise ShapeError("FSP's levels are checked by a shape probe: call Distiller.probe(batch) once before "
                             "the first step (distkd's trainer does)")
        s, t = paired_levels(student, teacher, "FSP")
        check_probed_levels("FSP", self.num_levels, len(s))
        dtype = compute_dtype(*s, *t)
        s = [x.to(dtype) for x in s]
        t = [x.detach().to(dtype) for x in t]
        values = [((fsp_matrix(s[i], s[i + 1]) - fsp_matrix(t[i], t[i + 1])) ** 2).mean() for i in range(len(s) - 1)]
        loss = torch.stack(values).sum()
        return (loss, level_parts(values, "pair")) if return_parts else loss

"""FT: factor transfer (Kim et al., "Paraphrasing Complex Network", NeurIPS 2018), as RepDistiller computes it.

A *paraphraser* (an auto-encoder on the teacher's feature map) extracts the teacher factor, a *translator* on the
student's feature map extracts the student factor, and the loss compares the two after RepDistiller's
``FactorTransfer.factor``: the channel mean of the ``p1``-th power, flattened and L2-normalised per sample:

    F_s = translator(f_s),  F_t = paraphraser.encoder(f_t)               (N, k C_t, H, W) each, k = rate
    phi(F) = normalize(mean_c F**p1)                                     (N, H W), L2 over H W
    loss = mean_{n, hw} |phi(F_s) - phi(F_t)|**p2

When the factor maps differ in size, the larger is average-pooled to the smaller's first. The modules follow
RepDistiller's ``models/util.py``: the paraphraser's encoder is three 3x3 convs ``C_t -> C_t -> k C_t -> k C_t`` and
its decoder three 3x3 transposed convs back to ``C_t``, each followed by LeakyReLU(0.1), without BatchNorm
(``use_bn=False``); the translator is three 3x3 convs ``C_s -> C_s -> k C_t -> k C_t``, each followed by BatchNorm and
LeakyReLU(0.1). Both are distillation state built by the shape probe; the paraphraser's parameters are frozen
(``requires_grad=False``), so only the translator is trained with the student.

Training stages in the original, both run by one config (a ``pretrain`` stage, then the main schedule):

1. paraphraser pre-training, ``init_epochs = 30``: only the paraphraser is trained, to reconstruct the teacher's
   feature map (the last stage's output, RepDistiller's ``feat_t[-2]``) with the mean squared error; teacher and
   student are not trained; SGD with a constant lr of 0.01 for ResNet/WRN students, else the run's (0.05; 0.01 for
   MobileNetV2/ShuffleNet students), momentum 0.9, weight decay 5e-4 (RepDistiller ``helper/pretrain.py``). With
   the ``pretrain`` objective (:meth:`FactorTransfer.set_objective`, set by the stage) this loss is
   :meth:`FactorTransfer.reconstruction_loss` and the paraphraser, not the translator, is trainable;
2. distillation: the paraphraser is frozen again (RepDistiller also sets it to eval mode, which changes nothing
   without BatchNorm), the student and the translator are trained with cross-entropy + weight * this loss. Without
   stage 1 the teacher factor comes from a random paraphraser.

Deliberate choices: RepDistiller's formula, modules and weight are followed. The authors' code
(Jangho-Kim/Factor-Transfer-pytorch) differs: ``phi`` L2-normalises the whole flattened factor (no channel mean),
the loss is L1 with weight 500 (CIFAR-10), the paraphraser is pre-trained with L1 and the translator has no
BatchNorm. For ``p2`` distkd uses ``|d|**p2``; RepDistiller's ``d.pow(p2)`` is the same for p2 = 1 and 2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ShapeError
from distkd.losses import LOSSES
from distkd.losses._features import not_probed, pool_to_common, single_level
from distkd.losses._inputs import check_positive


def _conv3x3(c_in: int, c_out: int, transposed: bool = False) -> nn.Module:
    layer = nn.ConvTranspose2d if transposed else nn.Conv2d
    return layer(c_in, c_out, kernel_size=3, stride=1, padding=1)


def _stack(channels: list[int], transposed: bool = False, batch_norm: bool = False) -> nn.Sequential:
    """3x3 (transposed) convs through ``channels``, each followed by (BatchNorm and) LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers.append(_conv3x3(c_in, c_out, transposed))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser`` (``use_bn=False``): (N, C, H, W) -> factor (N, F, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _stack([factor_channels, factor_channels, channels, channels], transposed=True)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``."""
        return self.decoder(self.encoder(x))


def translator(s_channels: int, factor_channels: int) -> nn.Sequential:
    """RepDistiller's ``Translator`` (``use_bn=True``): (N, C_s, H, W) -> (N, F, H, W)."""
    return _stack([s_channels, s_channels, factor_channels, factor_channels], batch_norm=True)


@LOSSES.register("ft")
class FactorTransfer(nn.Module):
    """Factor transfer between the translated student map and the paraphrased teacher map (N, C, H, W).

    Published weights (not part of the loss, for configs): 200 on CIFAR-100 (RepDistiller
    ``scripts/run_cifar_distill.sh``: ``--distill factor -a 0 -b 200``, after the 30-epoch paraphraser stage).

    Args:
        rate: the paraphrase rate ``k`` (> 0): factors have ``int(C_t * k)`` channels; default 0.5.
        p1: the power before the channel mean (> 0), default 2. Factors can be negative (LeakyReLU), so a
            non-integer ``p1`` gives NaN.
        p2: the power of the factor distance (> 0), default 1 (L1).
    """

    def __init__(self, rate: float = 0.5, p1: float = 2.0, p2: float = 1.0) -> None:
        super().__init__()
        self.rate = check_positive("rate", rate)
        self.p1 = check_positive("p1", p1)
        self.p2 = check_positive("p2", p2)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Sequential | None = None
        self.objective = "loss"

    def set_objective(self, objective: str) -> None:
        """``loss``: the factor loss, the translator trains; ``pretrain``: the paraphraser's reconstruction of the
        teacher's map, the paraphraser trains (stage 1). Set before the shape probe builds the modules."""
        self.objective = objective

    def extra_repr(self) -> str:
        return f"rate={self.rate}, p1={self.p1}, p2={self.p2}, objective={self.objective}"

    def probe(self, student: Tensor, teacher: Tensor, **context: object) -> None:
        """Build the paraphraser (frozen) and the translator for these maps (called once, by the shape probe)."""
        s, t = single_level(student, "student", "FT"), single_level(teacher, "teacher", "FT")
        factor_channels = int(t.shape[1] * self.rate)
        if factor_channels < 1:
            raise ShapeError(f"FT's factors would have int({t.shape[1]} * {self.rate:g}) = 0 channels for the "
                             f"teacher's {tuple(t.shape)} (student {tuple(s.shape)}); raise rate")
        pretraining = self.objective == "pretrain"
        self.paraphraser = Paraphraser(t.shape[1], factor_channels).requires_grad_(pretraining).to(s.device)
        self.translator = translator(s.shape[1], factor_channels).requires_grad_(not pretraining).to(s.device)

    def factor(self, x: Tensor) -> Tensor:
        """``normalize(mean_c x**p1)``: (N, F, H, W) -> (N, H W), unit L2 norm per sample."""
        return F.normalize(x.pow(self.p1).mean(1).flatten(1))

    def reconstruction_loss(self, teacher: Tensor) -> Tensor:
        """Stage 1's objective: ``mean((paraphraser(f_t) - f_t) ** 2)`` for the teacher's map (N, C_t, H, W)."""
        if self.paraphraser is None:
            raise not_probed("FT", "paraphraser")
        target = teacher.detach().to(self.paraphraser.encoder[0].weight.dtype)
        return F.mse_loss(self.paraphraser(target).to(target.dtype), target)

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The factor-transfer loss (a scalar; with the ``pretrain`` objective the teacher map's reconstruction
        loss); the teacher is detached. ``return_parts``: also return ``{}``."""
        if self.paraphraser is None or self.translator is None:
            raise not_probed("FT", "translator")
        if self.objective == "pretrain":
            loss = self.reconstruction_loss(single_level(teacher, "teacher", "FT"))
            return (loss, {}) if return_parts else loss
        s, t = single_level(student, "student", "FT"), single_level(teacher, "teacher", "FT")
        dtype = self.translator[0].weight.dtype
        factor_s = self.translator(s.to(dtype)).to(dtype)
        factor_t = self.paraphraser.encoder(t.detach().to(dtype)).to(dtype)
        factor_s, factor_t = pool_to_common(factor_s, factor_t)
        loss = (self.factor(factor_s) - self.factor(factor_t)).abs().pow(self.p2).mean()
        return (loss, {}) if return_parts else loss

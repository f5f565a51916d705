"""Feature-map losses on where a layer fires: AT and NST, as RepDistiller and mdistiller compute them.

- ``AT`` (``"at"``): attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).
- ``NST`` (``"nst"``): neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via
  Neuron Selectivity Transfer", arXiv 2017), with the squared polynomial kernel of RepDistiller's ``NSTLoss``.

Both compare one student feature map (N, C_s, H_s, W_s) with one teacher map (N, C_t, H_t, W_t); channel counts
may differ. As in the reference code (HobbitLong/RepDistiller ``distiller_zoo/{AT,NST}.py``, identical in
megvii-research/mdistiller ``distillers/{AT,NST}.py``), the map with the larger spatial size is average-pooled
(``adaptive_avg_pool2d``) to the smaller one's size. The reference code sums the loss over several stages
(``feat[1:-1]``: every stage output); distkd configures one term per stage, so these losses take one pair.

Deliberate differences, none changing the value for the square maps the reference code was written for:

- the pooled size is ``(min(H_s, H_t), min(W_s, W_t))``: the reference pools to ``(H, H)``, which assumes square
  maps;
- NST's kernel means are batched matrix products instead of an (N, C, C, H*W) broadcast, the same numbers
  without the memory;
- the loss runs with autocast off, in float32 at least (fp16/bf16 inputs are upcast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ShapeError
from distkd.losses import LOSSES
from distkd.losses._inputs import check_positive


def _pooled(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` (N, C, H, W) average-pooled to ``size`` (itself when it already has that size)."""
    return x if tuple(x.shape[2:]) == size else F.adaptive_avg_pool2d(x, size)


def feature_map_pair(method: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Check two feature maps and bring them to one spatial size and a float dtype (float32 at least).

    ``student`` (N, C_s, H_s, W_s) and ``teacher`` (N, C_t, H_t, W_t) -> both (N, C, min(H_s, H_t), min(W_s, W_t))
    with their own channels; the teacher is detached.
    """
    for role, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{method} compares float feature maps (N, C, H, W); the {role}'s is {got}: "
                             "tap a convolutional layer, with transform: none")
    if student.shape[0] != teacher.shape[0]:
        raise ShapeError(f"{method}: the student's feature map {tuple(student.shape)} and the teacher's "
                         f"{tuple(teacher.shape)} hold different batch sizes; feed both the same images")
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    return _pooled(student.to(dtype), size), _pooled(teacher.detach().to(dtype), size)


def attention_map(features: Tensor, p: float) -> Tensor:
    """AT's attention map: (N, C, H, W) -> (N, H*W), ``mean_c f^p`` per position, unit L2 norm per sample."""
    return F.normalize(features.pow(p).mean(1).flatten(1), dim=1)


@LOSSES.register("at")
class AT(nn.Module):
    """Attention transfer: ``mean_{n, x} (a_s[n, x] - a_t[n, x]) ** 2`` with ``a = attention_map(f, p)``.

    ``a[n] = q[n] / max(||q[n]||_2, 1e-12)``, ``q[n, x] = mean_c f[n, c, x] ** p`` over the positions ``x`` of
    the (pooled) maps; the mean runs over the N samples and H*W positions (RepDistiller's ``at_loss``). The
    reference code raises ``f`` to ``p`` without an absolute value, as here; the paper's ``|f|^p`` agrees for
    ``p = 2``.

    One stage per term: RepDistiller sums this over every stage output (``feat[1:-1]``); configure one term
    per stage, each with the published weight. Published CIFAR-100 weight: 1000 (HobbitLong/RepDistiller
    ``scripts/run_cifar_distill.sh``, ``--distill attention -a 0 -b 1000``; mdistiller
    ``CFG.AT.LOSS.FEAT_WEIGHT = 1000.0``), on top of cross-entropy with weight 1.

    Args:
        p: the power of the activations (> 0; RepDistiller and mdistiller use 2).
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = check_positive("p", p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The AT loss (a scalar) of feature maps (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t).

        The larger map is average-pooled to the smaller one's size; the teacher is detached.
        ``return_parts``: also return ``{}``. Other ``context`` keys are ignored.
        """
        f_s, f_t = feature_map_pair("AT", student, teacher)
        with torch.autocast(f_s.device.type, enabled=False):
            loss = (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
        return (loss, {}) if return_parts else loss


def _unit_channels(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H*W), each channel's map scaled to unit L2 norm (``max(norm, 1e-12)``)."""
    return F.normalize(features.flatten(2), dim=2)


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{n, i, j} <a[n, i], b[n, j]> ** 2`` of (N, C_a, S) and (N, C_b, S): the kernel ``k(x, y) = (x.y)^2``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@LOSSES.register("nst")
class NST(nn.Module):
    """Neuron selectivity transfer: squared MMD between the channels of two feature maps, ``k(x, y) = (x.y)^2``.

    Every channel's (pooled) spatial map is a sample ``x = f[n, c] / max(||f[n, c]||_2, 1e-12)`` in R^(H*W);
    for each image ``n`` the student's C_s and the teacher's C_t samples are compared with

    ``loss = mean k(t_i, t_j) + mean k(s_i, s_j) - 2 mean k(s_i, t_j)``,

    each mean over the batch and all channel pairs (RepDistiller's ``nst_loss`` with ``full_loss = True``; the
    first term is a constant). Channel counts may differ.

    One stage per term: RepDistiller sums this over every stage output (``feat[1:-1]``); configure one term
    per stage, each with the published weight. Published CIFAR-100 weight: 50 (HobbitLong/RepDistiller
    ``scripts/run_cifar_distill.sh``, ``--distill nst -a 0 -b 50``; mdistiller ``CFG.NST.LOSS.FEAT_WEIGHT =
    50.0``), on top of cross-entropy with weight 1.
    """

    def __init__(self) -> None:
        """NST has no hyper-parameters (an explicit signature, so a config's stray kwargs are rejected by name)."""
        super().__init__()

    def forward(
        self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The NST loss (a scalar) of feature maps (N, C_s, H_s, W_s) and (N, C_t, H_t, W_t).

        The larger map is average-pooled to the smaller one's size; the teacher is detached.
        ``return_parts``: also return ``{}``. Other ``context`` keys are ignored.
        """
        f_s, f_t = feature_map_pair("NST", student, teacher)
        with torch.autocast(f_s.device.type, enabled=False):
            s, t = _unit_channels(f_s), _unit_channels(f_t)
            loss = _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)
        return (loss, {}) if return_parts else loss

"""Distillation losses, pure torch, built by name.

Every loss is an ``nn.Module`` with ``forward(student, teacher, *, return_parts=False, **context)``
returning a scalar tensor, or ``(loss, {part_name: scalar tensor})`` with ``return_parts=True``.
``context`` may carry ``target`` (N,) or (N, d1, ..., dk), ``mask`` (bool, same shape as target)
and ``epoch`` (int); a loss ignores what it does not use.

- ``DIST`` (``"dist"``): inter- and intra-class Pearson relations (Huang et al., NeurIPS 2022).
- ``KD`` (``"kd"``): ``tau**2 * KL(teacher || student)`` of softened probabilities (Hinton et al.).
- ``DKD`` (``"dkd"``): decoupled target / non-target KD (Zhao et al., CVPR 2022); needs ``target``.
- ``Mimic`` (``"mimic"``): MSE between FPN levels through a learnable 1x1 conv per level (detection's
  "DIST + mimic"); the convs are trainable state sized by the shape probe.
- ``FitNet`` (``"fitnet"``): MSE between a learnable regressor of the student's feature map and the
  teacher's (Romero et al., ICLR 2015); the regressor is trainable state sized by the shape probe.
- Feature and relation methods as RepDistiller computes them: ``AT`` (``"at"``), ``NST`` (``"nst"``),
  ``SP`` (``"sp"``), ``CC`` (``"cc"``, with its learnable embeddings), ``RKD`` (``"rkd"``), ``PKT`` (``"pkt"``),
  ``KDSVD`` (``"kdsvd"``, on a list of stage features).
- ``DeiT`` (``"deit"``): DeiT's hard (or soft) distillation of a vision transformer's distillation-token head
  (tap ``head_dist``) from the teacher's logits (Touvron et al., ICML 2021).
- Methods with learnable adapters or buffers (trainable state built by the shape probe): ``VID``
  (``"vid"``), ``ActivationBoundary`` (``"ab"``), ``FactorTransfer`` (``"ft"``), ``FSP`` (``"fsp"``, on a list of
  stage features), ``OFD`` (``"ofd"``), ``CRD`` (``"crd"``, a memory bank fed with ``index``), ``ReviewKD``
  (``"reviewkd"``, on a list of stage features). AB, FSP and FT's pre-training runs as a config's
  ``pretrain`` stage (``set_objective`` gives FT's paraphraser reconstruction).
- Newer logit methods as their authors' code computes them: logit standardisation applied to KD, DKD and
  DIST (``"ls_kd"``, ``"ls_dkd"``, ``"ls_dist"``), ``MLKD`` (``"mlkd"``, one view), ``CTKD`` (``"ctkd"``, a
  learnable temperature trained through gradient reversal), ``NKD`` (``"nkd"``), ``WTTM`` (``"wttm"``).

A loss with trainable state builds it in ``probe(student, teacher, **context)``, which the Distiller calls
once with real tensors before training; its parameters are then trained with the student.

Logits are ``(N, C)`` or dense ``(N, C, d1, ..., dk)`` with one instance per position.
"""

from __future__ import annotations

from torch import nn

from distkd.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


def build_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a registered loss, e.g. ``build_loss("dist", beta=2, gamma=2, tau=4)``."""
    return LOSSES.build(name, **kwargs)


def list_losses() -> list[str]:
    """The names ``build_loss`` accepts."""
    return LOSSES.names()


# Importing the loss modules registers them (they import LOSSES from here).
from distkd.losses.attention import AT, NST  # noqa: E402
from distkd.losses.boundary import ActivationBoundary  # noqa: E402
from distkd.losses.crd import CRD  # noqa: E402
from distkd.losses.ctkd import CTKD  # noqa: E402
from distkd.losses.deit import DeiT  # noqa: E402
from distkd.losses.dist import DIST  # noqa: E402
from distkd.losses.dkd import DKD  # noqa: E402
from distkd.losses.factor import FactorTransfer  # noqa: E402
from distkd.losses.fitnet import FitNet  # noqa: E402
from distkd.losses.fsp import FSP  # noqa: E402
from distkd.losses.kd import KD  # noqa: E402
from distkd.losses.mimic import Mimic  # noqa: E402
from distkd.losses.mlkd import MLKD  # noqa: E402
from distkd.losses.nkd import NKD  # noqa: E402
from distkd.losses.ofd import OFD  # noqa: E402
from distkd.losses.relation import CC, KDSVD, PKT, RKD, SP  # noqa: E402
from distkd.losses.reviewkd import ReviewKD  # noqa: E402
from distkd.losses.standardize import LSDIST, LSDKD, LSKD  # noqa: E402
from distkd.losses.vid import VID  # noqa: E402
from distkd.losses.wttm import WTTM  # noqa: E402

__all__ = ["AT", "CC", "CRD", "CTKD", "DIST", "DKD", "FSP", "KD", "KDSVD", "LOSSES", "LSDIST", "LSDKD", "LSKD", "MLKD",
           "Mimic", "NKD", "NST", "OFD", "PKT", "RKD", "SP", "VID", "WTTM", "ActivationBoundary", "DeiT",
           "FactorTransfer", "FitNet", "ReviewKD", "build_loss", "list_losses"]

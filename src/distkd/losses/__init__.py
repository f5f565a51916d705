"""Distillation losses, pure torch, built by name.

Every loss is an ``nn.Module`` with ``forward(student, teacher, *, return_parts=False, **context)``
returning a scalar tensor, or ``(loss, {part_name: scalar tensor})`` with ``return_parts=True``.
``context`` may carry ``target`` (N,) or (N, d1, ..., dk), ``mask`` (bool, same shape as target)
and ``epoch`` (int); a loss ignores what it does not use.

- ``DIST`` (``"dist"``): inter- and intra-class Pearson relations (Huang et al., NeurIPS 2022).
- ``KD`` (``"kd"``): ``tau**2 * KL(teacher || student)`` of softened probabilities (Hinton et al.).
- ``DKD`` (``"dkd"``): decoupled target / non-target KD (Zhao et al., CVPR 2022); needs ``target``.
- ``FitNet`` (``"fitnet"``): MSE between a learnable regressor of the student's feature map and the
  teacher's (Romero et al., ICLR 2015); the regressor is trainable state sized by the shape probe.

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
from distkd.losses.dist import DIST  # noqa: E402
from distkd.losses.dkd import DKD  # noqa: E402
from distkd.losses.fitnet import FitNet  # noqa: E402
from distkd.losses.kd import KD  # noqa: E402

__all__ = ["DIST", "DKD", "KD", "LOSSES", "FitNet", "build_loss", "list_losses"]

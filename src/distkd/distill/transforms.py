"""Named transforms of what a distillation term compares, so a loss need not know a model's layout.

Each maps one tensor to another; a term applies its transform to the student's and the teacher's side
alike (to every call of a multi-call tap). Losses take class dim 1: ``(N, C)`` or ``(N, C, d1, ..., dk)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from distkd.registry import Registry

TRANSFORMS: Registry[Tensor] = Registry("term transform")


@TRANSFORMS.register("none")
def identity(x: Tensor) -> Tensor:
    """The tensor as it is."""
    return x


@TRANSFORMS.register("class_last")
def class_last(x: Tensor) -> Tensor:
    """(N, d1, ..., dk, C) -> (N, C, d1, ..., dk): a class-last layout (e.g. torchvision's flattened
    ``(N, HWA, K)`` detection logits) moved to class dim 1."""
    return x.movedim(-1, 1)


@TRANSFORMS.register("flatten")
def flatten(x: Tensor) -> Tensor:
    """(N, d1, ..., dk) -> (N, d1 * ... * dk): a feature map as one vector per sample."""
    return x.flatten(1)


@TRANSFORMS.register("pool")
def pool(x: Tensor) -> Tensor:
    """(N, C, d1, ..., dk) -> (N, C): the mean over every position (global average pooling)."""
    return x.flatten(2).mean(2) if x.dim() > 2 else x


def get_transform(name: str) -> Callable[[Tensor], Tensor]:
    """The transform registered as ``name``; an unknown name lists the known ones."""
    return TRANSFORMS.get(name)

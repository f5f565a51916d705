"""Shared input handling for the logit losses: shape checks, dense flattening, masks, targets.

Every loss here treats dim 1 as the class axis and every other position of a dense input
``(N, C, d1, ..., dk)`` as one instance. Internally inputs are viewed as ``(N, C, S)`` with
``S = d1 * ... * dk`` (``S = 1`` for ``(N, C)`` inputs; copied only when not contiguous, e.g.
channels-last, or when fp16/bf16 is upcast to fp32), so per-instance reductions run along dim 1
and per-class reductions along dims ``(0, 2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkd.errors import ConfigError, ShapeError


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number > 0, else a ConfigError."""
    if not _is_finite_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}; set e.g. {name}: 4.0")
    return float(value)


def check_non_negative(name: str, value: float) -> float:
    """``value`` as a float if it is a finite number >= 0, else a ConfigError."""
    if not _is_finite_number(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}; set e.g. {name}: 1.0")
    return float(value)


def check_flag(name: str, value: bool) -> bool:
    """``value`` if it is a bool, else a ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def as_instances(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Check the logits and view them as ``(N, C, S)`` float tensors (fp32 at least).

    ``student`` and ``teacher``: ``(N, C)`` or ``(N, C, d1, ..., dk)``, same shape, ``C >= 2``.
    fp16/bf16 inputs are upcast to fp32; float64 stays float64. The teacher is detached.
    """
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise ShapeError("student and teacher logits must be torch tensors")
    if student.shape != teacher.shape:
        raise ShapeError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
            "both must be (N, C) or (N, C, d1, ..., dk) with the same shape"
        )
    if student.dim() < 2 or student.shape[1] < 2:
        raise ShapeError(f"logits of shape {tuple(student.shape)} need at least 2 dims (N, C, ...) with C >= 2 classes")
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise ShapeError(f"logits must be floating point, got {student.dtype} and {teacher.dtype}")
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    n, c = student.shape[:2]
    return student.to(dtype).reshape(n, c, -1), teacher.detach().to(dtype).reshape(n, c, -1)


def instance_mask(mask: Tensor | None, logits_shape: torch.Size) -> Tensor | None:
    """The mask viewed as bool ``(N, 1, S)``, or None when there is no mask.

    ``mask``: bool ``(N, d1, ..., dk)`` for logits ``(N, C, d1, ..., dk)`` (``(N,)`` for ``(N, C)``);
    True keeps a position.
    """
    if mask is None:
        return None
    expected = (logits_shape[0], *logits_shape[2:])
    if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(
            f"mask has shape {got} but logits {tuple(logits_shape)} need a mask of shape {expected} "
            "(logits without the class dim)"
        )
    if mask.dtype != torch.bool:
        raise ShapeError(f"mask must be a bool tensor, got {mask.dtype}; pass e.g. target != 255")
    return mask.reshape(expected[0], 1, -1)


def zero_masked(logits: Tensor, keep: Tensor | None) -> Tensor:
    """``logits`` ``(N, C, S)`` with masked-out positions set to 0.

    Whatever a masked position holds (even inf or NaN) then cannot reach the value, and the
    gradient there is exactly 0 (``torch.where`` routes no gradient to the dropped branch).
    """
    return logits if keep is None else torch.where(keep, logits, 0.0)


def instance_targets(target: Tensor | None, logits_shape: torch.Size, mask: Tensor | None) -> Tensor:
    """Class indices as ``(N, 1, S)`` int64, checked against the logits.

    ``target``: int ``(N,)`` for ``(N, C)`` logits or ``(N, d1, ..., dk)`` for dense logits. Values
    must lie in ``[0, C)`` wherever ``mask`` keeps the position; masked positions (e.g. label 255)
    may hold anything and are replaced by class 0 so indexing stays in range.
    """
    expected = (logits_shape[0], *logits_shape[2:])
    if target is None:
        raise ShapeError("this loss needs the class labels: pass target=<int tensor of shape (N, ...)>")
    if not isinstance(target, Tensor) or tuple(target.shape) != expected:
        got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ShapeError(f"target has shape {got} but logits {tuple(logits_shape)} need targets of shape {expected}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ShapeError(f"target must hold integer class indices, got {target.dtype}")
    target = target.long()
    if mask is not None:
        target = target.masked_fill(~mask, 0)
    num_classes = logits_shape[1]
    if bool(((target < 0) | (target >= num_classes)).any()):
        raise ShapeError(
            f"target holds labels outside [0, {num_classes}); pass mask=(target != ignore_label) "
            "to exclude ignored positions"
        )
    return target.reshape(expected[0], 1, -1)


def masked_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(N, 1, S)`` over the kept positions (``weights`` 0/1, same shape).

    With no kept position the result is 0 (the sum is 0 and the count is clamped to 1).
    """
    if weights is None:
        return values.mean()
    return (values * weights).sum() / weights.sum().clamp_min(1.0)

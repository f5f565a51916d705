"""Shared input handling for the feature losses with trainable state (VID, AB, FT, FSP, OFD, CRD, ReviewKD).

A feature loss compares one feature map per side, ``(N, C, H, W)``, or one list of them per side (a term with a
list of module paths, :meth:`distkd.distill.Distiller._pairs`); both arrive here as lists of levels. Besides the
checks, this module holds the small pieces several of those losses share: integer and choice options, the
unprobed-loss error, RepDistiller's pooling of the larger map to the smaller one's size, per-level parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distkd.errors import ConfigError, ShapeError


def check_int(name: str, value: int, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else a ConfigError."""
    upper = float("inf") if maximum is None else maximum
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= upper:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ConfigError(f"{name} must be an integer {bounds}, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def not_probed(method: str, what: str) -> ShapeError:
    """The error of a loss used before the shape probe sized ``what``."""
    return ShapeError(f"{method}'s {what} is sized by a shape probe: call Distiller.probe(batch) once before the "
                      "first step (distkd's trainer does)")


def levels(x: Tensor | Sequence[Tensor], role: str, method: str, dims: tuple[int, ...] = (4,)) -> list[Tensor]:
    """One feature (a tensor) or several (a list, shallow to deep) as a list of floating tensors.

    ``dims``: the accepted numbers of dimensions (``(4,)``: feature maps ``(N, C, H, W)``).
    """
    xs = [x] if isinstance(x, Tensor) else list(x)
    if not xs:
        raise ShapeError(f"{method} got an empty list of {role} features; list at least one module path")
    for i, f in enumerate(xs):
        if not isinstance(f, Tensor) or not f.is_floating_point():
            raise ShapeError(f"{method}: the {role}'s feature {i} is not a floating point tensor")
        if f.dim() not in dims:
            want = " or ".join(f"{d}-D" for d in dims)
            raise ShapeError(f"{method} compares {want} features; the {role}'s feature {i} is {tuple(f.shape)}: "
                             "tap a convolutional layer")
    return xs


def single_level(x: Tensor | Sequence[Tensor], role: str, method: str, dims: tuple[int, ...] = (4,)) -> Tensor:
    """The one feature a loss compares per side (a tensor, or a list holding one); see :func:`levels`."""
    xs = levels(x, role, method, dims)
    if len(xs) != 1:
        raise ShapeError(f"{method} compares one feature per side; the {role} gave a list of {len(xs)}: "
                         "give the term one module path")
    return xs[0]


def paired_levels(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor], method: str,
                  dims: tuple[int, ...] = (4,)) -> tuple[list[Tensor], list[Tensor]]:
    """Both sides as lists of the same length with the same batch size (see :func:`levels`)."""
    s, t = levels(student, "student", method, dims), levels(teacher, "teacher", method, dims)
    if len(s) != len(t):
        raise ShapeError(f"{method} pairs the student's features with the teacher's level by level; got {len(s)} "
                         f"and {len(t)}: list as many module paths on both sides")
    for i, (a, b) in enumerate(zip(s, t, strict=True)):
        if a.shape[0] != b.shape[0]:
            raise ShapeError(f"{method}: the student's feature {i} {tuple(a.shape)} and the teacher's "
                             f"{tuple(b.shape)} have different batch sizes")
    return s, t


def check_probed_levels(method: str, probed: int, got: int) -> None:
    """A ShapeError when a forward brings another number of levels than the probe saw."""
    if probed != got:
        raise ShapeError(f"{method} was probed with {probed} feature level(s) but got {got}; "
                         "the term must compare the same layers at every step")


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """The dtype the loss is computed in: float32, or float64 when an input is float64."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def pool_to_common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """RepDistiller's size match: the larger map is average-pooled (adaptively) to the smaller one's size.

    ``a``, ``b``: ``(N, C_a, H_a, W_a)``, ``(N, C_b, H_b, W_b)`` -> both at ``(min(H_a, H_b), min(W_a, W_b))``.
    RepDistiller compares heights only and pools to a square; for square maps the two agree.
    """
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a = a if tuple(a.shape[2:]) == size else F.adaptive_avg_pool2d(a, size)
    b = b if tuple(b.shape[2:]) == size else F.adaptive_avg_pool2d(b, size)
    return a, b


def level_parts(values: Sequence[Tensor], name: str = "level") -> dict[str, Tensor]:
    """``{"level0": ..., "level1": ...}`` (detached; ``name`` replaces "level") for several values, ``{}`` for one."""
    return {f"{name}{i}": v.detach() for i, v in enumerate(values)} if len(values) > 1 else {}

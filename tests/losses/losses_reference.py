"""Plain float64 re-computations of the loss formulas with explicit loops (no distkd code).

Each function takes numpy/torch logits ``(N, C)`` or ``(N, C, d1, ..., dk)`` and returns Python
floats, following the formulas in the papers / issue text, one instance at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-8


def instances(logits: torch.Tensor, mask: torch.Tensor | None = None) -> list[list[float]]:
    """The kept instances (one per sample and position) as lists of C floats."""
    array = logits.detach().double().cpu().numpy()
    keep = None if mask is None else mask.cpu().numpy()
    rows = []
    for n in range(array.shape[0]):
        for position in np.ndindex(*array.shape[2:]):
            if keep is not None and not keep[(n, *position)]:
                continue
            rows.append([float(array[(n, c, *position)]) for c in range(array.shape[1])])
    return rows


def targets_of(target: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
    """The kept targets, in the same order as ``instances``."""
    array = target.cpu().numpy()
    keep = None if mask is None else mask.cpu().numpy()
    out = []
    for index in np.ndindex(*array.shape):
        if keep is None or keep[index]:
            out.append(int(array[index]))
    return out


def softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    exps = [math.exp((v - top) / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def sigmoid(row: list[float], tau: float) -> list[float]:
    return [1.0 / (1.0 + math.exp(-v / tau)) for v in row]


def pearson(a: list[float], b: list[float]) -> float:
    mean_a = sum(a) / len(a)
    mean_b = sum(b) / len(b)
    dot = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm_a = math.sqrt(sum((x - mean_a) ** 2 for x in a))
    norm_b = math.sqrt(sum((y - mean_b) ** 2 for y in b))
    return dot / (norm_a * norm_b + EPS)


def dist_terms(student, teacher, *, tau=1.0, activation="softmax", mask=None) -> tuple[float, float]:
    """(inter, intra) of DIST over the kept instances; (0, 0) when none is kept."""
    act = softmax if activation == "softmax" else sigmoid
    ys = [act(row, tau) for row in instances(student, mask)]
    yt = [act(row, tau) for row in instances(teacher, mask)]
    if not ys:
        return 0.0, 0.0
    inter = 1.0 - sum(pearson(a, b) for a, b in zip(ys, yt, strict=True)) / len(ys)
    num_classes = len(ys[0])
    intra = 1.0 - sum(pearson([row[j] for row in ys], [row[j] for row in yt]) for j in range(num_classes)) / num_classes
    return inter, intra


def dist_loss(
    student, teacher, *, beta=1.0, gamma=1.0, tau=1.0, activation="softmax", mask=None, tau_squared=True
) -> float:
    inter, intra = dist_terms(student, teacher, tau=tau, activation=activation, mask=mask)
    scale = tau**2 if tau_squared else 1.0
    return scale * (beta * inter + gamma * intra)


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) with 0 log 0 = 0."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def kd_loss(student, teacher, *, tau=4.0, mask=None) -> float:
    rows_s = instances(student, mask)
    rows_t = instances(teacher, mask)
    if not rows_s:
        return 0.0
    total = sum(kl(softmax(t, tau), softmax(s, tau)) for s, t in zip(rows_s, rows_t, strict=True))
    return tau**2 * total / len(rows_s)


def dkd_terms(student, teacher, target, *, tau=4.0, mask=None) -> tuple[float, float]:
    """(TCKD, NCKD), each ``tau**2 *`` the mean KL over the kept instances."""
    rows_s = instances(student, mask)
    rows_t = instances(teacher, mask)
    labels = targets_of(target, mask)
    if not rows_s:
        return 0.0, 0.0
    tckd = nckd = 0.0
    for s, t, g in zip(rows_s, rows_t, labels, strict=True):
        p_s, p_t = softmax(s, tau), softmax(t, tau)
        tckd += kl([p_t[g], 1.0 - p_t[g]], [p_s[g], 1.0 - p_s[g]])
        others_s = [v for j, v in enumerate(s) if j != g]
        others_t = [v for j, v in enumerate(t) if j != g]
        nckd += kl(softmax(others_t, tau), softmax(others_s, tau))
    return tau**2 * tckd / len(rows_s), tau**2 * nckd / len(rows_s)

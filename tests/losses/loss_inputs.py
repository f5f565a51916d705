"""Seeded inputs shared by the loss tests: logits, per-position labels and masks."""

from __future__ import annotations

import torch


def logits(shape, seed, scale=3.0, dtype=torch.float64):
    """Logits of ``shape`` ((N, C) or (N, C, d1, ...)), normal with std ``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator)).to(dtype)


def labels(shape, num_classes, seed):
    """Class ids for every instance of logits of ``shape``: (N,) or (N, d1, ...)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=generator)


def random_mask(shape, seed, keep_first=1):
    """A bool mask keeping ~60% of the instances of logits of ``shape``, always the first ``keep_first``."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand((shape[0], *shape[2:]), generator=generator) > 0.4
    mask.view(-1)[:keep_first] = True
    return mask

"""Containers shared by the datasets and the loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """One in-memory split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) (or (N, H, W) for dense)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class InMemoryData:
    """A small-image dataset held as uint8 tensors, ready for the on-device loader.

    ``test`` is None when the dataset has no labelled test split. ``mean``/``std`` are per channel
    on the [0, 1] scale; the loader normalises with them.
    """

    train: Split
    val: Split
    test: Split | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

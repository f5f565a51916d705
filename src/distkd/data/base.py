"""Containers shared by the datasets and the loaders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distkd.data.preprocess import Preprocess


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

    ``test`` is None when the dataset has no labelled test split (it may be the very ``val`` object: see
    ``test_is_val``). ``mean``/``std`` are per channel on the [0, 1] scale; the loader normalises with them.
    ``classes``: the class names in label order (None: the labels' numbers).
    """

    train: Split
    val: Split
    test: Split | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None = None

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def test_is_val(self) -> bool:
        """True when the test split is the validation split itself (selection and report on the same images)."""
        return self.test is self.val

    @property
    def preprocess(self) -> Preprocess:
        """How an image file becomes an input like this dataset's: converted to its channels, resized to its
        image size exactly, normalised."""
        height, width = self.train.images.shape[2:]
        return Preprocess(channels=self.in_chans, size=(int(height), int(width)), resize=None,
                          interpolation="bilinear", mean=tuple(self.mean), std=tuple(self.std))

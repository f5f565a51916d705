"""Seeded views of file datasets: view ``k`` of sample ``i`` is the training pipeline's output under random number
generators seeded from ``(seed, i, k)``, so it can be produced again, pixel for pixel, in any process.

The file pipelines (:mod:`distkd.data.presets`: timm's RandomResizedCrop, flip, RandAugment, random erasing) draw from
Python's ``random``, NumPy's global generator and torch's CPU generator. :func:`seeded_rngs` seeds all three for one
call and restores them afterwards, so replaying a view changes no other random stream (CUDA's is not touched).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from distkd.data.loaders import derive_seed

FILE_VIEW_SALT = 0x5EED  # separates file views' seeds from every other derived seed


def view_seed(seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of sample ``index`` (63 bits)."""
    return derive_seed(seed, FILE_VIEW_SALT, index, view)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded from ``seed`` inside; their states restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededViews(Dataset[tuple[Tensor, int, int]]):
    """The seeded views of a file dataset's samples, addressed by ``flat = view * len(subset) + i``.

    ``subset`` is an :class:`~distkd.data.imagefolder.ImageSubset` (anything with ``__len__``, ``transform`` and
    ``load(i) -> (PIL image, label)``); ``views[flat]`` is ``(image float (3, S, S), label, flat)``: sample ``i``
    through ``subset.transform`` under :func:`seeded_rngs` of ``view_seed(seed, i, view)``.
    """

    def __init__(self, subset: Dataset, views: int, seed: int) -> None:
        self.subset, self.views, self.seed = subset, views, seed

    def __len__(self) -> int:
        return self.views * len(self.subset)

    def __getitem__(self, flat: int) -> tuple[Tensor, int, int]:
        view, i = divmod(int(flat), len(self.subset))
        image, label = self.subset.load(i)
        with seeded_rngs(view_seed(self.seed, i, view)):
            return self.subset.transform(image), label, int(flat)

"""The embedded Animal silhouettes set (10,000 grayscale 28x28 images, 10 classes).

Provenance and license: ``distkd/assets/NOTICE.silhouettes``. The split is fixed and stratified:
train 7,000 / val 1,000 / test 2,000 (700 / 100 / 200 per class), drawn with a seeded permutation.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from distkd.data.base import InMemoryData, Split

CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SPLIT_SIZES = {"train": 700, "val": 100, "test": 200}  # per class
SPLIT_SEED = 20221128  # fixed forever: changing it changes every published demo number
MEAN, STD = (0.2723,), (0.4055,)  # of the train split, [0, 1] scale



def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 images, uint8 (10000, 28, 28), and labels, int64 (10000,), in the source order."""
    with resources.files("distkd.assets").joinpath("silhouettes.npz").open("rb") as f:
        data = np.load(f)
        return data["images"], data["labels"]


def split_indices() -> dict[str, np.ndarray]:
    """Indices of the fixed stratified train/val/test split (sorted within each split)."""
    _, labels = load_arrays()
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_SIZES}
    for cls in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name, size in SPLIT_SIZES.items():
            parts[name].append(members[start : start + size])
            start += size
    return {name: np.sort(np.concatenate(idx)) for name, idx in parts.items()}


def load_silhouettes() -> InMemoryData:
    """The fixed train/val/test splits, images uint8 (N, 1, 28, 28)."""
    images, labels = load_arrays()
    splits = {
        name: Split(torch.from_numpy(images[idx]).unsqueeze(1).contiguous(), torch.from_numpy(labels[idx]))
        for name, idx in split_indices().items()
    }
    return InMemoryData(**splits, num_classes=len(CLASSES), mean=MEAN, std=STD, classes=CLASSES)

"""The embedded silhouettes: content, provenance notice, and the fixed stratified split."""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from distkd.data.silhouettes import CLASSES, MEAN, STD, load_arrays, load_silhouettes, split_indices


def test_the_embedded_arrays_are_the_10000_source_images_in_10_balanced_classes():
    images, labels = load_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10 and len(CLASSES) == 10


def test_the_notice_carries_the_license_and_the_source_hashes():
    notice = resources.files("distkd.assets").joinpath("NOTICE.silhouettes").read_text()
    assert "MIT License" in notice and "animal-mnist 0.4" in notice
    assert "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce" in notice


def test_the_split_is_stratified_7000_1000_2000_disjoint_and_fixed():
    parts = split_indices()
    _, labels = load_arrays()
    sizes = {name: np.bincount(labels[idx], minlength=10).tolist() for name, idx in parts.items()}
    assert sizes == {"train": [700] * 10, "val": [100] * 10, "test": [200] * 10}
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == 10000
    again = split_indices()
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_load_silhouettes_gives_nchw_uint8_splits_and_the_train_statistics():
    data = load_silhouettes()
    assert data.train.images.shape == (7000, 1, 28, 28) and data.train.images.dtype == torch.uint8
    assert len(data.val) == 1000 and len(data.test) == 2000 and data.num_classes == 10
    pixels = data.train.images.float() / 255
    assert abs(pixels.mean().item() - MEAN[0]) < 1e-3 and abs(pixels.std().item() - STD[0]) < 1e-3

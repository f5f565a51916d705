"""Silhouette pairs: 100 ordered-pair classes composed from the fixed silhouette splits, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distkd.config import DataConfig
from distkd.data.silhouette_pairs import CLASSES, load_silhouette_pairs, make_pairs, pair_layout
from distkd.data.silhouettes import load_arrays, split_indices
from distkd.errors import ConfigError
from distkd.tasks.classification import load_dataset


def test_there_are_100_ordered_pair_classes_named_left_then_right():
    assert len(CLASSES) == 100 and CLASSES[0] == "bear|bear" and CLASSES[13] == "bird|cow"
    assert CLASSES[31] == "cow|bird"  # ordered: (cow, bird) is not (bird, cow)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_left_and_right_silhouettes_are_the_pair_class_and_come_from_the_split(split):
    layout, labels = pair_layout(split, per_class=3, seed=0)
    _, animal = load_arrays()
    assert np.bincount(labels.numpy()).tolist() == [3] * 100
    left, right = animal[layout.sources[:, 1].numpy()], animal[layout.sources[:, 2].numpy()]
    assert (left == labels.numpy() // 10).all() and (right == labels.numpy() % 10).all()
    used = layout.sources[:, :3].flatten().numpy()  # distractor, left, right
    assert np.isin(used, split_indices()[split]).all()  # no silhouette of another split is drawn
    assert layout.active[:, :3].all() and not layout.active[:, 3].any()
    assert (layout.center[:, 1, 0] < 0).all() and (layout.center[:, 2, 0] > 0).all()  # left of right


def test_images_are_deterministic_per_seed_and_differ_between_seeds():
    a, b, c = make_pairs("val", 2, seed=0), make_pairs("val", 2, seed=0), make_pairs("val", 2, seed=1)
    assert a.images.shape == (200, 1, 24, 24) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_the_pair_is_drawn_brighter_than_the_background_on_its_own_side():
    layout, _ = pair_layout("test", per_class=2, seed=0)
    images = make_pairs("test", 2, seed=0).images.float() / 255  # (200, 1, 24, 24)
    # the two silhouettes are drawn at tone >= 0.6 x 0.7; the texture stays below 0.36
    bright = images[:, 0] > 0.4
    assert bright[:, :, :12].flatten(1).any(1).all() and bright[:, :, 12:].flatten(1).any(1).all()
    assert (layout.background <= 0.36 + 1e-6).all()


def test_load_gives_per_class_counts_and_train_statistics():
    data = load_silhouette_pairs(train=2, val=1, test=1, size=16)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (200, 100, 100, 100)
    assert data.train.images.shape[-2:] == (16, 16)
    pixels = data.train.images.float() / 255
    assert abs(pixels.mean().item() - data.mean[0]) < 1e-3 and abs(pixels.std().item() - data.std[0]) < 1e-3


@pytest.mark.parametrize(("overrides", "message"), [
    ({"flip": True}, "data.flip=false"),
    ({"flip": False, "kwargs": {"per_class": 3}}, "per_class not read"),
    ({"flip": False, "kwargs": {"train": 0}}, "per_class >= 1"),
])
def test_bad_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(DataConfig(name="silhouette_pairs", **overrides), seed=0)


def test_an_unknown_split_is_a_config_error():
    with pytest.raises(ConfigError, match="use one of train, val, test"):
        pair_layout("holdout", 1, 0)

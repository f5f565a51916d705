"""Silhouette scenes: determinism, label/image consistency, split disjointness, coverage."""

from __future__ import annotations

import time

import pytest
import torch

from distkd.data.scenes import (
    MAX_OBJECTS,
    NUM_CLASSES,
    THRESHOLD,
    Layout,
    load_scenes,
    make_scenes,
    render,
    scene_layout,
)
from distkd.data.silhouettes import load_arrays, split_indices
from distkd.errors import ConfigError


@pytest.fixture(scope="module")
def silhouettes() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_arrays()
    return torch.from_numpy(images), torch.from_numpy(labels)


def one_object_layout(source: int, size: int, scale: float, flip: bool) -> Layout:
    """One scene, one centred silhouette in slot 0, other slots off, flat background."""
    active = torch.tensor([[True] + [False] * (MAX_OBJECTS - 1)])
    return Layout(
        sources=torch.full((1, MAX_OBJECTS), source), active=active,
        scale=torch.full((1, MAX_OBJECTS), scale), center=torch.zeros(1, MAX_OBJECTS, 2),
        flip=torch.full((1, MAX_OBJECTS), flip), tone=torch.ones(1, MAX_OBJECTS),
        background=torch.full((1, size, size), 0.2),
    )


def test_same_seed_gives_identical_scenes_and_other_seeds_differ() -> None:
    a, b = make_scenes("val", 16, seed=3), make_scenes("val", 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = make_scenes("val", 16, seed=4)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.labels, c.labels)


def test_shapes_dtypes_and_label_range() -> None:
    split = make_scenes("test", 8, seed=0, size=48)
    assert split.images.shape == (8, 1, 48, 48) and split.images.dtype == torch.uint8
    assert split.labels.shape == (8, 48, 48) and split.labels.dtype == torch.int64
    assert int(split.labels.min()) >= 0 and int(split.labels.max()) < NUM_CLASSES


def test_identity_placement_labels_exactly_the_thresholded_source(silhouettes) -> None:
    images, labels = silhouettes
    source = 123
    pixels, target = render(one_object_layout(source, 28, 1.0, False), images, labels)
    fg = images[source] > THRESHOLD
    assert torch.equal(target[0] != 0, fg)
    assert set(target[0][fg].unique().tolist()) == {int(labels[source]) + 1}
    assert torch.all(pixels[0, 0][~fg] == round(0.2 * 255))  # background untouched
    _, mirrored = render(one_object_layout(source, 28, 1.0, True), images, labels)
    assert torch.equal(mirrored[0] != 0, fg.flip(-1))


def test_later_silhouettes_occlude_earlier_ones(silhouettes) -> None:
    images, labels = silhouettes
    first, second = (int(torch.nonzero(labels == c)[0]) for c in (0, 5))
    layout = one_object_layout(first, 32, 1.0, False)
    layout.sources[0, 1] = second
    layout.active[0, 1] = True
    _, target = render(layout, images, labels)
    _, only_second = render(one_object_layout(second, 32, 1.0, False), images, labels)
    second_fg = only_second[0] != 0
    assert torch.all(target[0][second_fg] == 6)  # class 5 -> label 6 wherever the later one covers
    assert torch.all(target[0][~second_fg] <= 1)


def test_scene_labels_come_only_from_the_placed_silhouettes(silhouettes) -> None:
    _, labels = silhouettes
    layout = scene_layout("train", 32, seed=1)
    split = make_scenes("train", 32, seed=1)
    for i in range(32):
        placed = {int(labels[s]) + 1 for s, on in zip(layout.sources[i], layout.active[i], strict=True) if on}
        assert set(split.labels[i].unique().tolist()) <= placed | {0}
        fg = split.labels[i] != 0
        assert fg.any()
        # foreground pixels are painted with their object's tone, background keeps the <= 0.6 texture
        assert float(split.images[i, 0][fg].float().mean()) > 0.3 * 255 * float(layout.tone[i].min())


def test_scenes_use_only_their_splits_silhouettes() -> None:
    pools = {name: set(idx.tolist()) for name, idx in split_indices().items()}
    used = {}
    for name in pools:
        layout = scene_layout(name, 300, seed=0)
        used[name] = set(layout.sources[layout.active].tolist())
        assert used[name] <= pools[name]
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"])
    assert not (used["val"] & used["test"])


def test_every_class_appears_and_background_is_textured() -> None:
    split = make_scenes("train", 200, seed=0)
    assert set(split.labels.unique().tolist()) == set(range(NUM_CLASSES))
    background = split.images[:, 0][split.labels == 0].float()
    assert background.std() > 10  # not a flat canvas
    per_scene = split.images[:, 0].float().flatten(1).std(1)
    assert bool((per_scene > 5).all())


def test_load_scenes_bundle_and_generation_speed() -> None:
    start = time.perf_counter()
    data = load_scenes(train=400, val=50, test=100, seed=0)
    elapsed = time.perf_counter() - start
    assert data.num_classes == 11 and data.in_chans == 1
    assert (len(data.train), len(data.val), len(data.test)) == (400, 50, 100)
    pixels = data.train.images.float() / 255
    assert data.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-4)
    assert data.std[0] == pytest.approx(float(pixels.std()), abs=1e-4)
    assert elapsed < 5.0  # the full 4000/500/1000 set takes ~10x this


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown scenes split"):
        make_scenes("dev", 4, seed=0)
    with pytest.raises(ConfigError, match="count >= 1"):
        make_scenes("train", 0, seed=0)

"""Silhouette pairs: a harder 100-class task composed from the embedded silhouettes.

Each image is a single-channel ``size`` x ``size`` canvas (default 24 px) with a seeded texture (as in
:mod:`distkd.data.scenes`), one faint *distractor* silhouette of any class somewhere behind, and two
silhouettes side by side, each maybe mirrored, with its own grey tone and scale, jittered so that they may
touch or overlap. The class is the ordered pair: ``10 * left + right`` (100 classes; ``CLASSES`` names them
``"cat|dog"``). Images of each split use only the silhouettes of the matching fixed split of
:mod:`distkd.data.silhouettes`, so no test animal is seen in training.

Why it is harder than the silhouettes themselves: 100 classes instead of 10, each animal drawn at about
11-15 px instead of 28, clutter (texture + distractor), and few training images per class (default 40,
4,000 in all, against 700 per class). Why a teacher has something to teach here: the classes share parts
(``cat|dog`` has its left half in common with ``cat|cow`` and its right half with ``bear|dog``), a structure
that a teacher's soft outputs carry and one-hot labels do not. A horizontal flip swaps left and right, so it
changes the class: train this set with ``data.flip: false``.
"""

from __future__ import annotations

import torch

from distkd.data.base import InMemoryData, Split
from distkd.data.scenes import MAX_OBJECTS, SOURCE_SIZE, Layout, make_textures, render
from distkd.data.silhouettes import CLASSES as ANIMALS
from distkd.data.silhouettes import load_arrays, split_indices
from distkd.errors import ConfigError

CLASSES = tuple(f"{left}|{right}" for left in ANIMALS for right in ANIMALS)
SPLIT_SALT = {"train": 0, "val": 1, "test": 2}
DEFAULT_PER_CLASS = {"train": 40, "val": 10, "test": 20}
SIZE_PX = (11.0, 15.0)  # drawn extent of the 28 px source box, in canvas pixels at size 24 (scales with size)
DISTRACTOR_TONE = (0.25, 0.45)
TONE = (0.6, 1.0)


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def pair_layout(split: str, per_class: int, seed: int, size: int = 24) -> tuple[Layout, torch.Tensor]:
    """The layout of ``per_class`` images of each of the 100 pair classes of ``split``, and their labels.

    Returns a :class:`~distkd.data.scenes.Layout` for N = 100 * per_class images (slot 0 the distractor,
    slot 1 the left silhouette, slot 2 the right one, slot 3 unused) and labels int64 (N,) in class order.
    """
    if split not in SPLIT_SALT:
        raise ConfigError(f"unknown silhouette-pairs split '{split}'; use one of {', '.join(SPLIT_SALT)}")
    if per_class < 1 or size < 12:
        raise ConfigError(f"silhouette pairs need per_class >= 1 and size >= 12, got per_class={per_class}, "
                          f"size={size}")
    gen = torch.Generator().manual_seed(seed * len(SPLIT_SALT) + SPLIT_SALT[split])
    _, animal = load_arrays()
    pool = torch.from_numpy(split_indices()[split])
    by_class = [pool[torch.from_numpy(animal[pool.numpy()] == c)] for c in range(len(ANIMALS))]
    n_animals = len(ANIMALS)
    labels = torch.arange(n_animals * n_animals).repeat_interleave(per_class)  # (N,)
    n = len(labels)

    def pick(classes: torch.Tensor) -> torch.Tensor:  # one random silhouette of each given class
        members = torch.stack([c[torch.randint(0, len(c), (n,), generator=gen)] for c in by_class])  # (10, N)
        return members.gather(0, classes.unsqueeze(0))[0]

    sources = torch.stack([pool[torch.randint(0, len(pool), (n,), generator=gen)],
                           pick(labels // n_animals), pick(labels % n_animals), torch.zeros(n, dtype=torch.int64)],
                          dim=1)  # (N, 4)
    active = torch.tensor([True, True, True, False]).expand(n, MAX_OBJECTS)
    scale = _uniform((n, MAX_OBJECTS), *SIZE_PX, gen) * (size / 24.0) / SOURCE_SIZE
    half = scale * SOURCE_SIZE / size  # half the drawn box, in [-1, 1] units
    x = torch.stack([_uniform((n,), -0.6, 0.6, gen), _uniform((n,), -0.6, -0.35, gen),
                     _uniform((n,), 0.35, 0.6, gen), torch.zeros(n)], dim=1)
    y = _uniform((n, MAX_OBJECTS), -1.0, 1.0, gen) * (1.0 - half).clamp(min=0.0)
    flip = torch.rand((n, MAX_OBJECTS), generator=gen) < 0.5
    tone = torch.cat([_uniform((n, 1), *DISTRACTOR_TONE, gen), _uniform((n, MAX_OBJECTS - 1), *TONE, gen)], dim=1)
    background = 0.6 * make_textures(n, size, gen)
    layout = Layout(sources, active, scale, torch.stack([x, y], dim=-1), flip, tone, background)
    return layout, labels


def make_pairs(split: str, per_class: int, seed: int, size: int = 24) -> Split:
    """``per_class`` images of each pair class of ``split``: images uint8 (N, 1, size, size), labels (N,)."""
    layout, labels = pair_layout(split, per_class, seed, size)
    images, animal = load_arrays()
    pixels, _ = render(layout, torch.from_numpy(images), torch.from_numpy(animal))
    return Split(pixels, labels)


def load_silhouette_pairs(train: int = DEFAULT_PER_CLASS["train"], val: int = DEFAULT_PER_CLASS["val"],
                          test: int = DEFAULT_PER_CLASS["test"], seed: int = 0, size: int = 24) -> InMemoryData:
    """Train/val/test splits with ``train``/``val``/``test`` images per class (100 classes); mean/std are
    measured on the train images."""
    splits = {name: make_pairs(name, count, seed, size) for name, count in
              (("train", train), ("val", val), ("test", test))}
    pixels = splits["train"].images.float() / 255.0
    return InMemoryData(**splits, num_classes=len(CLASSES), mean=(round(float(pixels.mean()), 4),),
                        std=(round(float(pixels.std()), 4),))

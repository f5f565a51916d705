"""Silhouette scenes: a small semantic-segmentation set built from the embedded silhouettes.

Each scene is a single-channel ``size`` x ``size`` canvas with a seeded texture (smooth noise, stripes or
a gradient) on which 1-4 silhouettes are pasted, each scaled 0.8-1.8x (of 28 px), maybe mirrored, with
its own grey tone; later silhouettes occlude earlier ones. Labels are per pixel: 0 = background,
1..10 = the silhouette classes (``distkd.data.silhouettes.CLASSES`` order), where a silhouette pixel is
foreground when the resampled source image exceeds ``THRESHOLD``. Scenes for train/val/test use only the
silhouettes of the matching fixed split. Generation is vectorised (separable bilinear resampling by batched matmuls) and
deterministic given (split, count, seed, size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distkd.data.base import InMemoryData, Split
from distkd.data.silhouettes import CLASSES, load_arrays, split_indices
from distkd.errors import ConfigError

NUM_CLASSES = len(CLASSES) + 1  # background + the silhouette classes
MAX_OBJECTS = 4
SOURCE_SIZE = 28
SCALE_RANGE = (0.8, 1.8)
THRESHOLD = 127  # source pixels above this (uint8) are foreground
SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Layout:
    """Where every silhouette of N scenes goes; slot ``j`` of a scene is drawn after slots ``< j``.

    ``sources`` int64 (N, 4) indices into :func:`load_arrays`; ``active`` bool (N, 4) (slot used);
    ``scale`` (N, 4) size factor of the 28 px source; ``center`` (N, 4, 2) (x, y) in [-1, 1] canvas
    coordinates; ``flip`` bool (N, 4) horizontal mirror; ``tone`` (N, 4) grey level in [0, 1];
    ``background`` (N, size, size) texture in [0, 1].
    """

    sources: torch.Tensor
    active: torch.Tensor
    scale: torch.Tensor
    center: torch.Tensor
    flip: torch.Tensor
    tone: torch.Tensor
    background: torch.Tensor


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def tent_weights(coords: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinear sampling weights (B, P, length) of positions ``coords`` (B, P) in [-1, 1] units.

    Pixel centres follow ``align_corners=False``; taps outside ``[0, length)`` get weight 0, so
    ``W @ signal`` equals ``grid_sample(..., mode="bilinear", padding_mode="zeros")`` along one axis.
    """
    pos = ((coords + 1.0) * length - 1.0) / 2.0
    return (1.0 - (pos.unsqueeze(-1) - torch.arange(length, dtype=coords.dtype)).abs()).clamp(min=0.0)


def make_textures(count: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` seeded textures (count, size, size) in [0, 0.6]: smooth noise, stripes or gradients."""
    coords = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    angle = _uniform((count, 1, 1), 0.0, math.pi, gen)
    along = x * torch.cos(angle) + y * torch.sin(angle)  # (count, size, size)
    freq = _uniform((count, 1, 1), 3.0, 12.0, gen)
    phase = _uniform((count, 1, 1), 0.0, 2 * math.pi, gen)
    stripes = 0.5 + 0.5 * torch.sin(freq * along + phase)
    gradient = (along + math.sqrt(2.0)) / (2 * math.sqrt(2.0))
    up = tent_weights(torch.linspace(-1.0, 1.0, size).expand(1, size), 8)[0]  # (size, 8) bilinear
    noise = up @ torch.rand((count, 8, 8), generator=gen) @ up.T
    kind = torch.randint(0, 3, (count, 1, 1), generator=gen)
    texture = torch.where(kind == 0, noise, torch.where(kind == 1, stripes, gradient))
    fine = 0.1 * torch.rand((count, size, size), generator=gen)
    return (0.5 * texture + fine).clamp(0.0, 0.6)


def sample_layout(pool: torch.Tensor, count: int, size: int, gen: torch.Generator) -> Layout:
    """Draw ``count`` scene layouts whose silhouettes come from ``pool`` (indices into the set)."""
    n_objects = torch.randint(1, MAX_OBJECTS + 1, (count, 1), generator=gen)
    active = torch.arange(MAX_OBJECTS).unsqueeze(0) < n_objects
    sources = pool[torch.randint(0, len(pool), (count, MAX_OBJECTS), generator=gen)]
    scale = _uniform((count, MAX_OBJECTS), *SCALE_RANGE, gen)
    half = scale * SOURCE_SIZE / size  # half the silhouette's extent in [-1, 1] units
    limit = (1.0 - 0.5 * half).clamp(min=0.0)  # at least half of the box stays on the canvas
    center = (torch.rand((count, MAX_OBJECTS, 2), generator=gen) * 2 - 1) * limit.unsqueeze(-1)
    flip = torch.rand((count, MAX_OBJECTS), generator=gen) < 0.5
    tone = _uniform((count, MAX_OBJECTS), 0.55, 1.0, gen)
    background = make_textures(count, size, gen)
    return Layout(sources, active, scale, center, flip, tone, background)


def render(layout: Layout, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint ``layout`` using the silhouette set ``images`` uint8 (M, 28, 28), ``labels`` int64 (M,).

    Returns scene images uint8 (N, 1, size, size) and per-pixel labels int64 (N, size, size).
    """
    canvas = layout.background.clone()
    n, size = canvas.shape[0], canvas.shape[-1]
    target = torch.zeros((n, size, size), dtype=torch.int64)
    axis = torch.linspace(-1.0 + 1.0 / size, 1.0 - 1.0 / size, size)  # canvas pixel centres
    for slot in range(MAX_OBJECTS):
        src = images[layout.sources[:, slot]].float() / 255.0  # (N, 28, 28)
        inv = (size / (layout.scale[:, slot] * SOURCE_SIZE)).unsqueeze(1)  # canvas units -> source units
        sign = torch.where(layout.flip[:, slot], -1.0, 1.0).unsqueeze(1)
        wx = tent_weights((axis - layout.center[:, slot, :1]) * inv * sign, SOURCE_SIZE)  # (N, size, 28)
        wy = tent_weights((axis - layout.center[:, slot, 1:]) * inv, SOURCE_SIZE)
        placed = wy @ src @ wx.transpose(1, 2)  # (N, size, size), separable bilinear resampling
        mask = (placed > THRESHOLD / 255.0) & layout.active[:, slot, None, None]
        shade = layout.tone[:, slot, None, None] * (0.7 + 0.3 * placed)
        canvas = torch.where(mask, shade, canvas)
        target = torch.where(mask, labels[layout.sources[:, slot]][:, None, None] + 1, target)
    pixels = (canvas * 255.0).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return pixels, target


def _generator(split: str, seed: int) -> torch.Generator:
    if split not in SPLIT_SALT:
        raise ConfigError(f"unknown scenes split '{split}'; use one of {', '.join(SPLIT_SALT)}")
    return torch.Generator().manual_seed(seed * len(SPLIT_SALT) + SPLIT_SALT[split])


def scene_layout(split: str, count: int, seed: int, size: int = 64) -> Layout:
    """The layout :func:`make_scenes` paints for these arguments (for inspection and tests)."""
    if count < 1 or size < 8:
        raise ConfigError(f"scenes need count >= 1 and size >= 8, got count={count}, size={size}")
    gen = _generator(split, seed)
    return sample_layout(torch.from_numpy(split_indices()[split]), count, size, gen)


def make_scenes(split: str, count: int, seed: int, size: int = 64) -> Split:
    """``count`` scenes of ``split`` ("train" | "val" | "test"): images uint8 (N, 1, size, size),
    labels int64 (N, size, size) with 0 = background and 1..10 = classes."""
    layout = scene_layout(split, count, seed, size)
    images, labels = load_arrays()
    pixels, target = render(layout, torch.from_numpy(images), torch.from_numpy(labels))
    return Split(pixels, target)


def load_scenes(train: int = 4000, val: int = 500, test: int = 1000, seed: int = 0,
                size: int = 64) -> InMemoryData:
    """Train/val/test scenes with ``num_classes`` = 11; mean/std are measured on the train images."""
    splits = {name: make_scenes(name, count, seed, size) for name, count in
              (("train", train), ("val", val), ("test", test))}
    pixels = splits["train"].images.float() / 255.0
    return InMemoryData(**splits, num_classes=NUM_CLASSES, mean=(round(float(pixels.mean()), 4),),
                        std=(round(float(pixels.std()), 4),))

"""The evaluation preprocessing of a classification model, as data: how an image file becomes its input.

A checkpoint stores it (with the class names) so that evaluation, export and prediction need nothing else.
Image folders evaluate through :meth:`Preprocess.transform` itself (resize the shorter side, center crop,
normalise), so ``distkd predict`` on a file gives exactly the input ``distkd eval`` gave the same file.
In-memory datasets (silhouettes, CIFAR) hold images at the model's size already; an image file given to such
a model is resized to that size exactly (``resize=None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from distkd.errors import CheckpointError, DataError, first_line

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Image file -> float ``(channels, size[0], size[1])``.

    ``channels``: 1 (grayscale) or 3 (RGB) — the image is converted to that mode first. ``resize``: the
    shorter side is resized to this many pixels and the center ``size`` crop is taken (ImageNet-style eval);
    ``None``: the image is resized to ``size`` exactly. ``interpolation``: the resize filter. ``mean``/``std``
    ([0, 1] scale, one per channel) normalise the result.
    """

    channels: int
    size: tuple[int, int]
    resize: int | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise CheckpointError(f"preprocessing record: {self.channels} channel(s) with mean {self.mean} and std "
                                  f"{self.std}; expected 1 or 3 channels and one mean/std per channel")
        if self.interpolation not in INTERPOLATIONS:
            raise CheckpointError(f"preprocessing record: interpolation {self.interpolation!r} is not one of "
                                  f"{', '.join(INTERPOLATIONS)}")

    def transform(self):  # noqa: ANN201 - a torchvision Compose: PIL image (in ``mode``) -> Tensor
        """The torchvision pipeline: resize (+ center crop), to tensor, normalise (expects a ``mode`` image)."""
        from torchvision import transforms as T

        filter_ = T.InterpolationMode(self.interpolation)
        if self.resize is None:
            steps = [T.Resize(list(self.size), interpolation=filter_)]
        else:
            steps = [T.Resize(self.resize, interpolation=filter_), T.CenterCrop(list(self.size))]
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to: ``L`` or ``RGB``."""
        return "L" if self.channels == 1 else "RGB"

    def load(self, path: str | Path) -> Tensor:
        """The image file ``path`` as the model's input, float ``(channels, H, W)``."""
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"cannot read image {path}: {first_line(err)}; give image files (.jpg, .png, ...)") \
                from None
        return self.transform()(image)

    def batch(self, paths: list[Path]) -> Tensor:
        """Images ``paths`` stacked, float ``(N, channels, H, W)``."""
        return torch.stack([self.load(p) for p in paths])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        try:
            return cls(channels=int(data["channels"]), size=(int(data["size"][0]), int(data["size"][1])),
                       resize=None if data["resize"] is None else int(data["resize"]),
                       interpolation=str(data["interpolation"]), mean=tuple(float(v) for v in data["mean"]),
                       std=tuple(float(v) for v in data["std"]))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CheckpointError(f"the preprocessing record {dict(data)} is malformed ({type(err).__name__}: "
                                  f"{err}); re-export from the run's checkpoint") from None

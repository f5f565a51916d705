"""Batched random crop (with padding) and horizontal flip for uint8 image batches held on any device.

The random parameters are drawn apart from their use (``CropFlip.sample`` then ``CropFlip.apply``) so a
caller can store them and replay the exact same augmentation later. The crop is one gather over a batch
padded once: no Python loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distkd.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class CropFlipParams:
    """Per-sample crop offsets and flips for a batch of N images.

    ``dy``/``dx`` int64 (N,): top/left corner of the crop inside the padded image, in ``[0, 2 * padding]``;
    ``flip`` bool (N,): whether the crop is then mirrored left-right.
    """

    dy: Tensor
    dx: Tensor
    flip: Tensor

    def __len__(self) -> int:
        return int(self.dy.shape[0])

    def __getitem__(self, index: slice | Tensor) -> CropFlipParams:
        """The parameters of a subset of the samples (a slice or an index tensor)."""
        return CropFlipParams(self.dy[index], self.dx[index], self.flip[index])

    def to(self, device: torch.device | str) -> CropFlipParams:
        """The same parameters on ``device``."""
        return CropFlipParams(self.dy.to(device), self.dx.to(device), self.flip.to(device))


def crop_flip(x: Tensor, params: CropFlipParams, padding: int, fill: int = 0) -> Tensor:
    """Pad the last two dims of ``x`` by ``padding`` with ``fill``, crop back to the input size, flip.

    ``x`` is (N, ..., H, W) of any dtype (images (N, C, H, W) or dense labels (N, H, W)); the result has
    the same shape and dtype, contiguous. Sample ``n`` is cropped at rows ``dy[n] : dy[n] + H`` and
    columns ``dx[n] : dx[n] + W`` of its padded copy, then mirrored along W when ``flip[n]``.
    """
    if x.dim() < 3:
        raise ShapeError(f"crop_flip expects a batch (N, ..., H, W), got {tuple(x.shape)}; add the batch dim")
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    if len(params) != n:
        raise ShapeError(f"crop/flip params are for {len(params)} samples, the batch has {n}; sample for it")
    padded = F.pad(x, (padding, padding, padding, padding), value=fill) if padding else x
    padded_w = width + 2 * padding
    device = x.device
    rows = params.dy.to(device).view(n, 1) + torch.arange(height, device=device)
    cols = torch.arange(width, device=device).expand(n, width)
    flip = params.flip.to(device).view(n, 1)
    cols = torch.where(flip, cols.flip(1), cols) + params.dx.to(device).view(n, 1)
    flat_index = (rows.view(n, height, 1) * padded_w + cols.view(n, 1, width)).view(n, 1, height * width)
    flat = padded.reshape(n, -1, (height + 2 * padding) * padded_w)
    out = torch.gather(flat, 2, flat_index.expand(n, flat.shape[1], height * width))
    return out.view(x.shape)


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise ShapeError(
            f"CropFlip expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}; "
            "augment before converting to float"
        )


@dataclass(frozen=True)
class CropFlip:
    """Random crop with zero padding + horizontal flip, applied to whole uint8 batches (N, C, H, W).

    Same distribution as torchvision ``RandomCrop(H, padding=p)`` (fill 0) followed by
    ``RandomHorizontalFlip(0.5)``: each offset uniform over ``0..2p``, each flip a fair coin, all independent.
    """

    padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError(f"CropFlip padding must be an int >= 0, got {self.padding!r}; e.g. padding=4")

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> CropFlipParams:
        """Draw parameters for ``n`` images of size (height, width) from ``generator`` (kept on its device).

        The crop is the size of the image, so the offsets do not depend on (height, width); they are
        checked so a caller cannot sample for an empty image.
        """
        if n < 0 or height < 1 or width < 1:
            raise ShapeError(f"cannot sample crops for n={n} images of {height}x{width}; need n>=0, H, W>=1")
        device = generator.device
        span = 2 * self.padding + 1
        dy = torch.randint(span, (n,), generator=generator, device=device)
        dx = torch.randint(span, (n,), generator=generator, device=device)
        if self.flip:
            flip = torch.rand(n, generator=generator, device=device) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=device)
        return CropFlipParams(dy, dx, flip)

    def apply(self, images: Tensor, params: CropFlipParams) -> Tensor:
        """Crop and flip uint8 ``images`` (N, C, H, W) with ``params``; uint8 (N, C, H, W) out."""
        _check_images(images)
        return crop_flip(images, params, self.padding, fill=0)

    def apply_dense(self, labels: Tensor, params: CropFlipParams, ignore_index: int = 255) -> Tensor:
        """Apply the same crop/flip to dense labels (N, H, W); padded pixels get ``ignore_index``."""
        if labels.dim() != 3:
            raise ShapeError(f"dense labels must be (N, H, W), got shape {tuple(labels.shape)}")
        return crop_flip(labels, params, self.padding, fill=ignore_index)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Sample parameters from ``generator`` and apply them: uint8 (N, C, H, W) in and out."""
        _check_images(images)
        params = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)

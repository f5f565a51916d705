"""CropFlip: exact agreement with torchvision per image, and the same random distribution."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from distkd.data.augment import CropFlip, CropFlipParams, crop_flip
from distkd.errors import ConfigError, ShapeError


def reference(image: torch.Tensor, padding: int, dy: int, dx: int, flip: bool, fill: int = 0) -> torch.Tensor:
    """torchvision's per-image pad + crop + hflip for one (C, H, W) image."""
    height, width = image.shape[-2:]
    out = TF.crop(TF.pad(image, [padding], fill=fill), dy, dx, height, width)
    return TF.hflip(out) if flip else out


@pytest.mark.parametrize(("channels", "height", "width", "padding"), [(3, 32, 32, 4), (1, 28, 20, 2), (2, 9, 7, 0)])
def test_apply_equals_torchvision_pad_crop_hflip_per_sample(channels: int, height: int, width: int, padding: int):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (24, channels, height, width), dtype=torch.uint8, generator=gen)
    augment = CropFlip(padding=padding)
    params = augment.sample(len(images), height, width, gen)
    out = augment.apply(images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for n in range(len(images)):
        expected = reference(images[n], padding, int(params.dy[n]), int(params.dx[n]), bool(params.flip[n]))
        assert torch.equal(out[n], expected), f"sample {n} differs"


def test_apply_dense_pads_labels_with_ignore_index_and_matches_reference():
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 19, (16, 12, 10), generator=gen)
    augment = CropFlip(padding=3)
    params = augment.sample(16, 12, 10, gen)
    out = augment.apply_dense(labels, params)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    for n in range(16):
        expected = reference(labels[n : n + 1], 3, int(params.dy[n]), int(params.dx[n]), bool(params.flip[n]), 255)
        assert torch.equal(out[n], expected[0])
    assert (out == 255).any(), "some crops should reach into the padding"


def test_no_flip_option_never_flips_and_zero_padding_only_flips():
    gen = torch.Generator().manual_seed(3)
    params = CropFlip(padding=4, flip=False).sample(500, 32, 32, gen)
    assert not params.flip.any()
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=gen)
    zero_pad = CropFlip(padding=0)
    params = zero_pad.sample(50, 8, 8, gen)
    assert (params.dy == 0).all() and (params.dx == 0).all()
    expected = torch.where(params.flip.view(-1, 1, 1, 1), images.flip(-1), images)
    assert torch.equal(zero_pad.apply(images, params), expected)


def test_sample_is_a_pure_function_of_the_generator_state():
    augment = CropFlip()
    first = augment.sample(100, 32, 32, torch.Generator().manual_seed(7))
    again = augment.sample(100, 32, 32, torch.Generator().manual_seed(7))
    other = augment.sample(100, 32, 32, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(vars(first).values(), vars(again).values(), strict=True))
    assert not torch.equal(first.dy, other.dy)
    assert first.dy.dtype == torch.int64 and first.dx.dtype == torch.int64 and first.flip.dtype == torch.bool
    assert int(first.dy.min()) >= 0 and int(first.dy.max()) <= 8 and int(first.dx.max()) <= 8


def test_params_slice_and_call_equals_sample_then_apply():
    images = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    augment = CropFlip(padding=2)
    params = augment.sample(10, 16, 16, torch.Generator().manual_seed(5))
    direct = augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(direct, augment.apply(images, params))
    part = params[2:5]
    assert len(part) == 3 and torch.equal(part.dx, params.dx[2:5])
    assert torch.equal(augment.apply(images[2:5], part), direct[2:5])


def coordinate_image(size: int) -> torch.Tensor:
    """uint8 (2, size, size): channel 0 holds row + 1, channel 1 column + 1 (0 marks padding)."""
    coords = torch.arange(1, size + 1, dtype=torch.uint8)
    return torch.stack([coords.view(-1, 1).expand(size, size), coords.view(1, -1).expand(size, size)])


def recover(out: torch.Tensor, padding: int) -> tuple[int, int, bool]:
    """(dy, dx, flip) of one augmented coordinate image (2, S, S) with S > 2 * padding."""
    size = out.shape[-1]
    row, left, right = padding, padding, size - 1 - padding  # always inside the image, whatever the offsets
    dy = int(out[0, row, left]) - 1 - row + padding
    col_left, col_right = int(out[1, row, left]) - 1, int(out[1, row, right]) - 1
    return dy, min(col_left, col_right), col_left > col_right


def chi_square_limit(df: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(df), Wilson-Hilferty approximation (z = 3.09)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def assert_uniform(samples: list[tuple[int, int, bool]], padding: int) -> None:
    """Offsets uniform over 0..2p, flip a fair coin, and the joint (dy, dx, flip) uniform (independence)."""
    span = 2 * padding + 1
    n = len(samples)
    dys = torch.tensor([s[0] for s in samples])
    dxs = torch.tensor([s[1] for s in samples])
    flips = torch.tensor([s[2] for s in samples], dtype=torch.long)
    for values, bins in ((dys, span), (dxs, span), (flips, 2), ((dys * span + dxs) * 2 + flips, span * span * 2)):
        assert int(values.min()) >= 0 and int(values.max()) < bins
        counts = torch.bincount(values, minlength=bins).double()
        expected = n / bins
        statistic = float(((counts - expected) ** 2 / expected).sum())
        assert statistic < chi_square_limit(bins - 1), f"chi-square {statistic:.1f} over {bins} bins"


PADDING, SIZE, DRAWS = 4, 12, 4000


def test_torchvision_reference_offsets_and_flips_are_uniform():
    image = coordinate_image(SIZE)
    transform = T.Compose([T.RandomCrop(SIZE, padding=PADDING), T.RandomHorizontalFlip()])
    torch.manual_seed(0)  # torchvision draws from the global generator
    assert_uniform([recover(transform(image), PADDING) for _ in range(DRAWS)], PADDING)


def test_cropflip_offsets_and_flips_are_uniform_and_recover_the_sampled_params():
    images = coordinate_image(SIZE).expand(DRAWS, 2, SIZE, SIZE)
    augment = CropFlip(padding=PADDING)
    params = augment.sample(DRAWS, SIZE, SIZE, torch.Generator().manual_seed(0))
    out = augment.apply(images, params)
    samples = [recover(o, PADDING) for o in out]
    assert samples == list(zip(params.dy.tolist(), params.dx.tolist(), params.flip.tolist(), strict=True))
    assert_uniform(samples, PADDING)


def test_bad_inputs_raise_clear_errors():
    augment = CropFlip()
    params = augment.sample(4, 8, 8, torch.Generator())
    with pytest.raises(ShapeError, match="uint8"):
        augment.apply(torch.zeros(4, 3, 8, 8), params)
    with pytest.raises(ShapeError, match="params are for 4 samples"):
        augment.apply(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), params)
    with pytest.raises(ShapeError, match="dense labels"):
        augment.apply_dense(torch.zeros(4, 8), params)
    with pytest.raises(ShapeError, match="batch"):
        crop_flip(torch.zeros(8, 8), CropFlipParams(torch.zeros(8), torch.zeros(8), torch.zeros(8)), 4)
    with pytest.raises(ConfigError, match="padding"):
        CropFlip(padding=-1)
    with pytest.raises(ShapeError, match="cannot sample"):
        augment.sample(4, 0, 8, torch.Generator())

"""TensorLoader: batches, normalisation, seeded epochs, rank shards, dense labels, memory format."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from distkd.data.augment import CropFlip
from distkd.data.base import Split
from distkd.data.loaders import TensorLoader
from distkd.errors import ConfigError, DataError

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def make_split(n: int = 50, channels: int = 3, size: int = 8) -> Split:
    """Random uint8 images; labels are the sample indices, so a batch tells which samples it holds."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    return Split(images, torch.arange(n))


def loader(split: Split, **kwargs) -> TensorLoader:
    options = {"batch_size": 16, "mean": MEAN[: split.images.shape[1]], "std": STD[: split.images.shape[1]]}
    return TensorLoader(split, **(options | kwargs))


def normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def epoch(data: TensorLoader, number: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches as ``(inputs, target)`` pairs."""
    if number is not None:
        data.set_epoch(number)
    return [(b.inputs, b.target) for b in data]


def test_plain_loader_yields_every_sample_in_order_normalised():
    split = make_split(50)
    data = loader(split)
    batches = epoch(data)
    assert len(data) == len(batches) == 4 and data.num_samples == 50
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (50, 3, 8, 8) and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(50))
    torch.testing.assert_close(x, normalised(split.images), rtol=1e-5, atol=1e-5)


def test_drop_last_drops_the_partial_batch():
    data = loader(make_split(50), drop_last=True, shuffle=True)
    batches = epoch(data)
    assert len(data) == len(batches) == 3 and all(len(y) == 16 for _, y in batches)


def test_shuffled_epoch_is_a_permutation_that_changes_with_the_epoch():
    data = loader(make_split(50), shuffle=True, seed=3)
    first = torch.cat([y for _, y in epoch(data, 0)])
    second = torch.cat([y for _, y in epoch(data, 1)])
    assert torch.equal(first.sort().values, torch.arange(50)) and torch.equal(second.sort().values, torch.arange(50))
    assert not torch.equal(first, torch.arange(50)) and not torch.equal(first, second)


def test_same_seed_and_epoch_give_identical_batches_as_after_a_resume():
    split = make_split(40)
    options = {"shuffle": True, "augment": CropFlip(padding=2), "seed": 11}
    uninterrupted = loader(split, **options)
    for number in range(3):
        epoch(uninterrupted, number)
    expected = epoch(uninterrupted, 3)
    resumed = loader(split, **options)
    for (x, y), (x_ref, y_ref) in zip(epoch(resumed, 3), expected, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    previous = epoch(resumed, 2)
    other_seed = epoch(loader(split, **(options | {"seed": 12})), 3)
    assert not torch.equal(previous[0][0], expected[0][0])
    assert not torch.equal(other_seed[0][0], expected[0][0])


def test_augmented_batches_are_the_planned_crops_of_the_planned_samples():
    split = make_split(30)
    augment = CropFlip(padding=4)
    data = loader(split, shuffle=True, augment=augment, seed=5)
    data.set_epoch(2)
    indices, params = data.plan()
    assert params is not None and len(params) == len(indices) == 30
    x = torch.cat([b.inputs for b in data])
    expected = normalised(augment.apply(split.images[indices], params))
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, normalised(split.images[indices])), "augmentation should change the images"


@pytest.mark.parametrize(("total", "world_size", "drop_last"), [(10, 3, False), (10, 3, True), (12, 4, False)])
def test_rank_shards_match_distributed_sampler_and_cover_the_split(total: int, world_size: int, drop_last: bool):
    split = make_split(total)
    shards = []
    for rank in range(world_size):
        data = loader(split, batch_size=1, rank=rank, world_size=world_size, drop_last=drop_last)
        shard = torch.cat([b.target for b in data])
        reference = DistributedSampler(range(total), world_size, rank, shuffle=False, drop_last=drop_last)
        assert shard.tolist() == list(reference) and data.num_samples == len(reference)
        shards.append(shard)
    union = set(torch.cat(shards).tolist())
    assert union == set(range(total - total % world_size if drop_last else total))


def test_shuffled_rank_shards_are_disjoint_slices_of_one_permutation():
    split = make_split(10)
    shards = [
        torch.cat([y for _, y in epoch(loader(split, batch_size=3, shuffle=True, rank=r, world_size=3), 1)])
        for r in range(3)
    ]
    assert all(len(s) == 4 for s in shards)
    merged = torch.stack(shards, dim=1).flatten()  # rank r holds positions r, r + 3, ... of the padded order
    assert torch.equal(merged[:10].sort().values, torch.arange(10))
    assert torch.equal(merged[10:], merged[:2]), "padding repeats the start of the permutation"


def test_ranks_draw_different_augmentations():
    split = Split(make_split(1).images.expand(8, 3, 8, 8).contiguous(), torch.zeros(8, dtype=torch.long))
    x0 = epoch(loader(split, augment=CropFlip(), rank=0, world_size=2))[0][0]
    x1 = epoch(loader(split, augment=CropFlip(), rank=1, world_size=2))[0][0]
    assert not torch.equal(x0, x1)


def test_dense_labels_get_the_same_crop_and_flip_padded_with_255():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 200, (20, 1, 10, 10), dtype=torch.uint8, generator=gen)  # 0 only in padding
    split = Split(images, images[:, 0].long())
    data = TensorLoader(split, batch_size=8, mean=(0.0,), std=(1.0,), augment=CropFlip(padding=3), shuffle=True)
    for x, y in epoch(data):
        assert y.shape == (len(x), 10, 10) and y.dtype == torch.int64
        pixels = (x[:, 0] * 255).round().long()
        padded = pixels == 0
        assert padded.any() and (~padded).any()
        assert torch.equal(y[padded], torch.full_like(y[padded], 255))
        assert torch.equal(y[~padded], pixels[~padded])


def test_channels_last_and_dtype_keep_the_values():
    split = make_split(20)
    options = {"augment": CropFlip(), "shuffle": True, "seed": 1}
    plain = epoch(loader(split, **options))
    channels_last = epoch(loader(split, channels_last=True, **options))
    half = epoch(loader(split, dtype=torch.bfloat16, **options))
    for (x, _), (x_cl, _), (x_half, _) in zip(plain, channels_last, half, strict=True):
        assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
            memory_format=torch.channels_last
        )
        assert torch.equal(x_cl, x)
        assert x_half.dtype == torch.bfloat16
        torch.testing.assert_close(x_half.float(), x, rtol=2e-2, atol=2e-2)


def test_bad_configuration_raises_clear_errors():
    split = make_split(10)
    with pytest.raises(ConfigError, match="one value per channel"):
        TensorLoader(split, batch_size=4, mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match="rank"):
        loader(split, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="std"):
        TensorLoader(split, batch_size=4, mean=MEAN, std=(0.1, 0.0, 0.1))
    with pytest.raises(ConfigError, match="floating point"):
        loader(split, dtype=torch.int32)
    with pytest.raises(DataError, match="full batch"):
        loader(split, batch_size=6, world_size=2, drop_last=True)
    with pytest.raises(DataError, match="uint8"):
        loader(Split(split.images.float(), split.labels))
    with pytest.raises(DataError, match="labels must be"):
        loader(Split(split.images, torch.zeros(10, 4, dtype=torch.long)))

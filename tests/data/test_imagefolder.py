"""ImageFolder datasets, the b1/b2/b3 presets and FileLoader on small trees of real image files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distkd.data.imagefolder import FileLoader, load_imagefolder
from distkd.data.presets import PRESETS, MixupSpec, get_preset
from distkd.errors import ConfigError, DataError, UnknownNameError

CLASSES = ("ant", "bee", "cat")
SIZE = 32  # output image size used throughout (images on disk are 40x40)


def write_tree(root: Path, train_per_class: int = 4, val_per_class: int = 2, seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.{jpg,png}`` with random 40x40 RGB images."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                ext = "jpg" if i % 2 == 0 else "png"
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path)


def _loader(dataset, **overrides) -> FileLoader:
    kwargs = {"batch_size": 4, "shuffle": True, "drop_last": True, "seed": 0, "num_workers": 0}
    kwargs.update(overrides)
    return FileLoader(dataset, **kwargs)


@pytest.mark.parametrize("name", ["b1", "b2"])
def test_hard_label_presets_give_normalised_batches_and_int_labels(tree: Path, name: str) -> None:
    data = load_imagefolder(str(tree), preset=name, image_size=SIZE)
    loader = _loader(data.train, drop_last=False)
    batches = [(b.inputs, b.target) for b in loader]
    assert len(batches) == len(loader) == 3 and loader.num_samples == 12
    for x, y in batches:
        assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (4,)
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(data.train.targets) == [0] * 4 + [1] * 4 + [2] * 4
    x = torch.cat([x for x, _ in batches])
    assert x.min() < -1 and x.max() > 1  # normalised, not [0, 1]


def test_b3_mixes_batches_into_soft_targets(tree: Path) -> None:
    data = load_imagefolder(str(tree), preset="b3", image_size=SIZE)
    loader = _loader(data.train, mixup=data.preset.mixup, num_classes=data.num_classes)
    for batch in loader:
        x, y = batch.inputs, batch.target
        assert x.shape == (4, 3, SIZE, SIZE)
        assert y.shape == (4, 3) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(1), torch.ones(4))
        assert (y > 0).all()  # label smoothing 0.1 in the mixed targets
        loss = F.cross_entropy(torch.zeros(4, 3, requires_grad=True), y)  # CE takes probabilities
        torch.testing.assert_close(loss, torch.tensor(np.log(3.0), dtype=torch.float32))


def test_eval_pipeline_is_deterministic_and_resizes_to_image_size(tree: Path) -> None:
    for name in PRESETS:
        data = load_imagefolder(str(tree), preset=name, image_size=SIZE)
        first = next(iter(_loader(data.val, shuffle=False, drop_last=False)))
        again = next(iter(_loader(data.val, shuffle=False, drop_last=False)))
        (x1, y1), (x2, y2) = (first.inputs, first.target), (again.inputs, again.target)
        assert x1.shape == (4, 3, SIZE, SIZE)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_without_val_size_val_is_the_val_folder_and_test_is_the_same(tree: Path) -> None:
    data = load_imagefolder(str(tree))
    assert data.test is data.val
    assert len(data.train) == 12 and len(data.val) == 6
    assert data.classes == CLASSES and data.num_classes == 3
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    assert data.preset is get_preset("b1")


def test_val_size_holds_out_a_stratified_seeded_split_of_train(tree: Path) -> None:
    data = load_imagefolder(str(tree), val_size=3, seed=5)
    assert len(data.train) == 9 and len(data.val) == 3 and len(data.test) == 6
    assert sorted(data.val.targets) == [0, 1, 2]
    assert not set(data.train.indices) & set(data.val.indices)
    assert sorted(data.train.indices + data.val.indices) == list(range(12))
    assert data.test.folder.root.endswith("val") and data.val.folder.root.endswith("train")
    again = load_imagefolder(str(tree), val_size=3, seed=5)
    assert again.val.indices == data.val.indices


def _labels_and_images(loader: FileLoader, epoch: int) -> tuple[list[int], torch.Tensor]:
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b.target for b in batches]).tolist(), torch.cat([b.inputs for b in batches])


def test_order_depends_only_on_seed_and_epoch(tree: Path) -> None:
    data = load_imagefolder(str(tree), image_size=SIZE)
    a, b, c = _loader(data.train, seed=7), _loader(data.train, seed=7), _loader(data.train, seed=7)
    epoch0 = list(a.sampler)
    a.set_epoch(1)
    b.set_epoch(1)
    c.set_epoch(2)
    assert list(a.sampler) == list(b.sampler)
    assert list(a.sampler) != epoch0 and list(c.sampler) != list(a.sampler)
    labels = [data.train.targets[i] for i in list(a.sampler)[:12]]
    assert _labels_and_images(a, 1)[0] == _labels_and_images(b, 1)[0] == labels


def test_worker_augmentation_is_reproducible_for_seed_and_epoch(tree: Path) -> None:
    data = load_imagefolder(str(tree), preset="b3", image_size=SIZE)
    spec = {"mixup": data.preset.mixup, "num_classes": 3, "num_workers": 1, "seed": 3}
    first = _loader(data.train, **spec)
    second = _loader(data.train, **spec)
    order1, images1 = _labels_and_images(first, 4)
    order2, images2 = _labels_and_images(second, 4)
    assert order1 == order2  # the same soft targets: the mixing ran in seeded workers
    torch.testing.assert_close(images1, images2, rtol=0, atol=0)
    _, other_epoch = _labels_and_images(second, 5)
    assert not torch.equal(images1, other_epoch)


def test_ranks_take_disjoint_shards_covering_the_dataset(tree: Path) -> None:
    data = load_imagefolder(str(tree), image_size=SIZE)
    shards = []
    for rank in range(2):
        loader = _loader(data.train, batch_size=2, rank=rank, world_size=2)
        loader.set_epoch(3)
        assert loader.num_samples == 6 and len(loader) == 3
        shards.append(list(loader.sampler))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(12))


def test_channels_last_output(tree: Path) -> None:
    data = load_imagefolder(str(tree), image_size=SIZE)
    x = next(iter(_loader(data.val, shuffle=False, drop_last=False, channels_last=True))).inputs
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_recommended_trainer_settings_are_exposed() -> None:
    assert get_preset("b2").recommended["label_smoothing"] == 0.1
    assert get_preset("b2").recommended["ema_decay"] == 0.9999
    b3 = get_preset("B3")
    assert b3.recommended["optimizer"] == "adamw" and b3.recommended["drop_path_rate"] == 0.2
    assert b3.mixup == MixupSpec(mixup_alpha=0.8, cutmix_alpha=1.0)
    assert b3.auto_augment == "rand-m9-mstd0.5-inc1" and b3.re_prob == 0.25
    assert get_preset("b2").auto_augment == "rand-m9-mstd0.5" and get_preset("b2").re_prob == 0.2


def test_unknown_preset_lists_known_ones(tree: Path) -> None:
    with pytest.raises(UnknownNameError, match="known: b1, b2, b3"):
        load_imagefolder(str(tree), preset="b4")


def test_missing_val_folder_names_the_layout(tmp_path: Path) -> None:
    shutil.rmtree(write_tree(tmp_path) / "val")
    with pytest.raises(DataError, match=r"val is not a folder; expected the ImageFolder layout <root>/train/"):
        load_imagefolder(str(tmp_path))


def test_class_folder_without_images_is_a_data_error(tree: Path) -> None:
    (tree / "train" / "dog").mkdir()
    (tree / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="dog") as err:
        load_imagefolder(str(tree))
    assert "\n" not in str(err.value)


def test_split_without_class_folders_is_a_data_error(tmp_path: Path) -> None:
    write_tree(tmp_path)
    for cls in CLASSES:
        shutil.rmtree(tmp_path / "val" / cls)
    with pytest.raises(DataError, match="class folder"):
        load_imagefolder(str(tmp_path))


def test_mismatched_class_folders_are_a_data_error(tree: Path) -> None:
    (tree / "val" / "cat").rename(tree / "val" / "cow")
    with pytest.raises(DataError, match=r"only in train/: \['cat'\], only in val/: \['cow'\]"):
        load_imagefolder(str(tree))


def test_mixup_needs_even_full_batches(tree: Path) -> None:
    data = load_imagefolder(str(tree), preset="b3", image_size=SIZE)
    with pytest.raises(ConfigError, match="even batch_size"):
        _loader(data.train, batch_size=3, mixup=data.preset.mixup, num_classes=3)
    with pytest.raises(ConfigError, match="drop_last=True"):
        _loader(data.train, drop_last=False, mixup=data.preset.mixup, num_classes=3)


def test_batch_larger_than_shard_with_drop_last_is_a_data_error(tree: Path) -> None:
    data = load_imagefolder(str(tree), image_size=SIZE)
    with pytest.raises(DataError, match="not one full batch"):
        _loader(data.val, batch_size=8)


def test_randaugment_posterize_at_full_magnitude_works_with_the_installed_pillow() -> None:
    # b3's rand-m9-mstd0.5-inc1 draws magnitude 10 ~2% of the time; timm then posterizes to 0 bits, which Pillow 13
    # refuses (a crash mid-training): distkd requires pillow < 13 until timm clamps it.
    from timm.data.auto_augment import AugmentOp

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    out = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(image)
    assert out.size == image.size and out.getpixel((0, 0)) == (0, 0, 0)  # 0 bits kept: black

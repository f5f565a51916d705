"""Cityscapes and VOC readers on tiny trees written in the real layouts, and the joint transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distkd.data.segmentation import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    cityscapes,
    voc,
)
from distkd.errors import DataError

H, W = 32, 64
# labelId -> trainId for the ids the fake labels use (Cityscapes' official table)
CITYSCAPES_EXPECTED = {0: 255, 1: 255, 7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 33: 18, 34: 255}


def write_cityscapes(root: Path, split: str = "train") -> list[np.ndarray]:
    """Three image/label pairs in two cities; returns the stored labelId arrays in sorted file order."""
    rng = np.random.default_rng(0)
    ids = np.array(sorted(CITYSCAPES_EXPECTED), dtype=np.uint8)
    stored = []
    for city, frame in (("aachen", 19), ("aachen", 20), ("bochum", 7)):
        stem = f"{city}_000000_{frame:06d}"
        image_dir = root / "leftImg8bit" / split / city
        label_dir = root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image_dir / f"{stem}_leftImg8bit.png")
        label = ids[rng.integers(0, len(ids), (H, W))]
        Image.fromarray(label, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
        stored.append(label)
    return stored


def voc_palette() -> list[int]:
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc(root: Path) -> dict[str, np.ndarray]:
    """Three images with palette labels (classes 0..20 plus a 255 border); train = 2 ids, val = 1."""
    rng = np.random.default_rng(1)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stored = {}
    for k, name in enumerate(("2007_000032", "2007_000033", "2008_000001")):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        label = rng.integers(0, 21, (H, W)).astype(np.uint8)
        label[0, :] = 255
        label[:, 0] = 255
        label[5, 5] = 20 + k  # 21 and 22 are not VOC classes -> ignored
        png = Image.fromarray(label, mode="P")
        png.putpalette(voc_palette())
        png.save(root / "SegmentationClass" / f"{name}.png")
        stored[name] = label
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000033\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2008_000001\n")
    return stored


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path) -> None:
    stored = write_cityscapes(tmp_path)
    data = cityscapes(tmp_path, "train", EvalTransform())
    assert len(data) == 3 and data.num_classes == 19
    for i, raw in enumerate(stored):
        expected = np.vectorize(CITYSCAPES_EXPECTED.get)(raw)
        image, label = data[i]
        assert image.shape == (3, H, W) and image.dtype == torch.float32
        assert label.dtype == torch.int64 and np.array_equal(label.numpy(), expected)


def test_eval_images_are_normalised_with_imagenet_statistics(tmp_path) -> None:
    write_cityscapes(tmp_path)
    data = cityscapes(tmp_path, "train", EvalTransform())
    raw = np.array(Image.open(data.pairs[0][0]).convert("RGB"), dtype=np.float64) / 255.0
    expected = (raw - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(data[0][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_voc_reads_palette_indices_and_ignores_other_values(tmp_path) -> None:
    stored = write_voc(tmp_path)
    train = voc(tmp_path, "train", EvalTransform())
    val = voc(tmp_path, "val", EvalTransform())
    assert (len(train), len(val), train.num_classes) == (2, 1, 21)
    for data, names in ((train, ("2007_000032", "2007_000033")), (val, ("2008_000001",))):
        for i, name in enumerate(names):
            expected = stored[name].astype(np.int64)
            expected[expected > 20] = 255
            _, label = data[i]
            assert np.array_equal(label.numpy(), expected)
    assert int(voc(tmp_path, "val", EvalTransform())[0][1][5, 5]) == 255  # stored 22


def test_train_transform_gives_crop_shapes_and_keeps_label_values(tmp_path) -> None:
    stored = write_cityscapes(tmp_path)
    data = cityscapes(tmp_path, "train", TrainTransform(crop_size=(16, 24)), seed=0)
    allowed = set(CITYSCAPES_EXPECTED.values())
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(len(stored)):
            image, label = data[i]
            assert image.shape == (3, 16, 24) and label.shape == (16, 24)
            assert set(label.unique().tolist()) <= allowed


def test_small_scaled_images_are_padded_with_zero_and_ignore(tmp_path) -> None:
    write_cityscapes(tmp_path)
    transform = TrainTransform(crop_size=(40, 80), scale_range=(0.5, 0.5), flip=False)
    image, label = cityscapes(tmp_path, "train", transform)[0]
    assert image.shape == (3, 40, 80)
    assert torch.all(label[16:] == 255) and torch.all(label[:, 32:] == 255)  # 32x64 scaled to 16x32
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    torch.testing.assert_close(image[:, 16:], black.expand(3, 24, 80))
    assert not torch.all(label[:16, :32] == 255)


def test_flip_only_transform_returns_the_pair_or_its_mirror(tmp_path) -> None:
    write_cityscapes(tmp_path)
    plain = cityscapes(tmp_path, "train", EvalTransform())[1]
    data = cityscapes(tmp_path, "train", TrainTransform(crop_size=(H, W), scale_range=(1.0, 1.0)))
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        image, label = data[1]
        flipped = torch.equal(label, plain[1].flip(-1))
        assert flipped or torch.equal(label, plain[1])
        torch.testing.assert_close(image, plain[0].flip(-1) if flipped else plain[0])
        seen.add(flipped)
    assert seen == {True, False}


def test_augmentation_is_deterministic_per_seed_epoch_and_index(tmp_path) -> None:
    write_cityscapes(tmp_path)
    transform = TrainTransform(crop_size=(16, 24))
    a = cityscapes(tmp_path, "train", transform, seed=5)
    b = cityscapes(tmp_path, "train", transform, seed=5)
    for i in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i], strict=True))
    c = cityscapes(tmp_path, "train", transform, seed=6)
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(3))
    first = [a[i][0] for i in range(3)]
    a.set_epoch(1)
    assert any(not torch.equal(first[i], a[i][0]) for i in range(3))


def test_missing_trees_raise_one_line_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="leftImg8bit_trainvaltest.zip") as info:
        cityscapes(tmp_path / "nowhere", "train", EvalTransform())
    assert "\n" not in str(info.value)
    write_cityscapes(tmp_path)
    next((tmp_path / "gtFine/train/bochum").glob("*.png")).unlink()
    with pytest.raises(DataError, match="missing Cityscapes label"):
        cityscapes(tmp_path, "train", EvalTransform())
    with pytest.raises(DataError, match="VOCdevkit/VOC2012"):
        voc(tmp_path / "voc", "train", EvalTransform())
    write_voc(tmp_path / "voc")
    (tmp_path / "voc/JPEGImages/2007_000033.jpg").unlink()
    with pytest.raises(DataError, match="2007_000033.jpg"):
        voc(tmp_path / "voc", "train", EvalTransform())


def test_bad_label_files_raise_data_errors(tmp_path) -> None:
    write_voc(tmp_path)
    Image.new("RGB", (W, H)).save(tmp_path / "SegmentationClass/2008_000001.png")
    with pytest.raises(DataError, match="palette"):
        voc(tmp_path, "val", EvalTransform())[0]
    Image.new("P", (W, H + 2)).save(tmp_path / "SegmentationClass/2008_000001.png")
    with pytest.raises(DataError, match="same size"):
        voc(tmp_path, "val", EvalTransform())[0]


def test_loader_workers_do_not_change_the_augmented_items(tmp_path) -> None:
    write_cityscapes(tmp_path)
    data = cityscapes(tmp_path, "train", TrainTransform(crop_size=(16, 24)), seed=2)
    direct = [data[i] for i in range(len(data))]
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    images, labels = next(iter(loader))
    assert torch.equal(images, torch.stack([x for x, _ in direct]))
    assert torch.equal(labels, torch.stack([y for _, y in direct]))

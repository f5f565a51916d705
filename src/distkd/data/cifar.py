"""CIFAR-10 and CIFAR-100 from the standard python-pickle files, as uint8 tensors in memory.

Expected files (as extracted from the official ``*-python.tar.gz`` archives)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

Reading goes through torchvision's ``CIFAR10``/``CIFAR100`` readers. With ``download=True`` the stock
readers are used unchanged: they fetch and md5-verify the archive and verify every extracted file.
With ``download=False`` the files are the user's own copy; the md5 check exists to catch a broken
download, and here it would only reject valid re-pickled copies (and files generated for tests), so
the readers run with their per-file checksums removed (:func:`_without_md5`) and we instead check
that every file is present and that the contents fit the format: uint8 images (N, 3, 32, 32), one
label per image, labels in 0..K-1. Broken files raise ``DataError``.

The standard training augmentation (random crop 32 with padding 4 + horizontal flip) is applied
on the device, per batch, by the in-memory loader; this module only reads the data.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from distkd.data.base import InMemoryData, Split
from distkd.errors import DataError, UnknownNameError

CifarName = Literal["cifar10", "cifar100"]

# Per-channel statistics of the training sets on the [0, 1] scale (the values the community uses).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _without_md5(reader: type[CIFAR10]) -> type[CIFAR10]:
    """``reader`` with the expected md5 of each file set to None: torchvision then only checks existence."""
    return type(
        f"{reader.__name__}LocalFiles",
        (reader,),
        {
            "train_list": [[name, None] for name, _ in reader.train_list],
            "test_list": [[name, None] for name, _ in reader.test_list],
            "meta": {**reader.meta, "md5": None},
            "__doc__": f"torchvision's {reader.__name__} reader for local files, without per-file md5.",
        },
    )


STOCK_READERS: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
LOCAL_READERS: dict[str, type[CIFAR10]] = {name: _without_md5(r) for name, r in STOCK_READERS.items()}


def expected_files(name: CifarName, root: str | Path) -> list[Path]:
    """Every file ``load_cifar(name, root)`` reads."""
    reader = STOCK_READERS[name]
    folder = Path(root) / reader.base_folder
    names = [f for f, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    return [folder / f for f in names]


def stratified_holdout(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices 0..N-1 into ``(keep, held_out)`` int64 tensors, sorted, with ``len(held_out) == val_size``.

    ``labels`` is int64 (N,). Each class gives up a share of ``val_size`` proportional to its size
    (largest-remainder rounding, so the sizes add up exactly; ties go to the lower class id), drawn
    with a permutation seeded by ``seed``: the same labels, size and seed give the same split.
    """
    n = len(labels)
    if not 0 < val_size < n:
        raise DataError(f"val_size={val_size} must be between 1 and {n - 1} (the training set has {n} images)")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * val_size / n
    quota = exact.floor().long()
    short = val_size - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda c: (-(exact[c] - quota[c]).item(), c))
    for c in order[:short]:
        quota[c] += 1
    generator = torch.Generator().manual_seed(seed)
    held = []
    for cls, take in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[:take]])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out


def _read_split(
    reader: type[CIFAR10], root: Path, *, train: bool, download: bool, title: str, num_classes: int
) -> Split:
    """One official split as a Split of uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    folder = root / reader.base_folder
    try:
        dataset = reader(str(root), train=train, download=download)
    except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        fix = "set data.download=true to fetch a fresh copy" if not download else "delete it and retry"
        raise DataError(f"could not read {title} from {folder}: {err}; the files look damaged, {fix}") from err
    except OSError as err:  # network failure while downloading, or unreadable files
        raise DataError(
            f"could not get {title} into {folder}: {err}; download and extract the archive by hand"
        ) from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if images.dtype != torch.uint8 or len(labels) != len(images):
        raise DataError(
            f"{title} in {folder} is malformed: {len(images)} images of dtype {images.dtype} "
            f"and {len(labels)} labels; re-extract the official archive"
        )
    if len(labels) and not (labels.min() >= 0 and labels.max() < num_classes):
        raise DataError(
            f"{title} in {folder} has labels outside 0..{num_classes - 1}; re-extract the official archive"
        )
    return Split(images, labels)


def load_cifar(
    name: CifarName, root: str, *, download: bool = False, val_size: int = 0, seed: int = 0
) -> InMemoryData:
    """CIFAR-10 or CIFAR-100 as uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Splits:

    * ``val_size = 0`` (the papers' convention): ``val`` *is* the official test set (10,000 images)
      and ``test`` is that same Split object. A trainer that keeps the best-on-val checkpoint then
      selects on test, exactly as the published CIFAR tables do; say so when reporting.
    * ``val_size > 0``: ``val_size`` images are held out of the 50,000 training images, stratified by
      class and drawn with ``seed`` (:func:`stratified_holdout`); ``train`` is the rest and ``test`` is
      the official test set, never used for selection.

    ``mean``/``std`` are the standard per-channel statistics of the training set ([0, 1] scale).
    Missing files with ``download=False`` raise a one-line ``DataError`` saying where to put them.
    """
    if name not in STATS:
        raise UnknownNameError(f"unknown CIFAR dataset '{name}'; known: {', '.join(sorted(STATS))}")
    title = TITLES[name]
    root_path = Path(root).expanduser()
    if not download:
        missing = [p.name for p in expected_files(name, root_path) if not p.is_file()]
        if missing:
            folder = root_path / STOCK_READERS[name].base_folder
            raise DataError(
                f"{title} not found: {folder}/ lacks {', '.join(missing)}; extract the official python "
                f"archive so that {folder}/ exists, or set data.download=true"
            )
    reader = STOCK_READERS[name] if download else LOCAL_READERS[name]
    num_classes = NUM_CLASSES[name]
    train = _read_split(reader, root_path, train=True, download=download, title=title, num_classes=num_classes)
    test = _read_split(reader, root_path, train=False, download=False, title=title, num_classes=num_classes)
    if val_size > 0:
        keep, held = stratified_holdout(train.labels, val_size, seed)
        val = Split(train.images[held], train.labels[held])
        train = Split(train.images[keep], train.labels[keep])
    else:
        val = test
    mean, std = STATS[name]
    return InMemoryData(train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std)

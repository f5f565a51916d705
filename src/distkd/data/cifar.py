"""CIFAR-10 and CIFAR-100 from the standard python-pickle files, as uint8 tensors in memory.

Expected files (as extracted from the official ``*-python.tar.gz`` archives)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

The files are read with a restricted unpickler (:mod:`distkd.data.safe_pickle`) that rebuilds only what
they contain (dicts, lists, strings, numbers, NumPy arrays): a crafted file cannot run code, it is refused
in one line. With ``download=True`` torchvision fetches the official archive and checks its md5 first. The
user's own copies (``download=False``) are checked for presence and format instead of per-file checksums
(which would reject valid re-pickled copies and files generated for tests): uint8 images (N, 3, 32, 32),
one label per image, labels in 0..K-1. Broken files raise ``DataError``.

The standard training augmentation (random crop 32 with padding 4 + horizontal flip) is applied
on the device, per batch, by the in-memory loader; this module only reads the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from distkd.data.base import InMemoryData, Split
from distkd.data.safe_pickle import load_arrays_pickle
from distkd.errors import DataError, UnknownNameError

CifarName = Literal["cifar10", "cifar100"]

# Per-channel statistics of the training sets on the [0, 1] scale (the values the community uses).
STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


STOCK_READERS: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}


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


def _download(name: CifarName, root: Path, title: str) -> None:
    """Fetch and extract the official archive into ``root`` (md5-checked by torchvision)."""
    from torchvision.datasets.utils import download_and_extract_archive

    reader = STOCK_READERS[name]
    try:
        download_and_extract_archive(reader.url, str(root), filename=reader.filename, md5=reader.tgz_md5)
    except (OSError, RuntimeError) as err:  # network failure, or an archive that fails its md5
        raise DataError(f"could not get {title} into {root}: {err}; download and extract the archive by hand") \
            from None


def _read_split(name: CifarName, root: Path, *, train: bool, title: str) -> Split:
    """One official split as a Split of uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    reader, num_classes = STOCK_READERS[name], NUM_CLASSES[name]
    folder = root / reader.base_folder
    images, labels = [], []
    for filename, _ in reader.train_list if train else reader.test_list:
        entry = load_arrays_pickle(folder / filename, title)
        try:
            data, targets = np.asarray(entry["data"]), entry[LABEL_KEYS[name]]
            images.append(torch.from_numpy(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.as_tensor(targets, dtype=torch.int64))
        except (TypeError, KeyError, ValueError, IndexError, RuntimeError) as err:
            raise DataError(f"{title} file {folder / filename} is malformed ({type(err).__name__}: {err}); "
                            "re-extract the official archive") from None
        if data.dtype != np.uint8 or len(labels[-1]) != len(images[-1]):
            raise DataError(
                f"{title} in {folder / filename} is malformed: {len(images[-1])} images of dtype {data.dtype} "
                f"and {len(labels[-1])} labels; re-extract the official archive"
            )
    label = torch.cat(labels)
    if len(label) and not (label.min() >= 0 and label.max() < num_classes):
        raise DataError(
            f"{title} in {folder} has labels outside 0..{num_classes - 1}; re-extract the official archive"
        )
    return Split(torch.cat(images), label)


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
    missing = [p.name for p in expected_files(name, root_path) if not p.is_file()]
    if missing and download:
        _download(name, root_path, title)
    elif missing:
        folder = root_path / STOCK_READERS[name].base_folder
        raise DataError(
            f"{title} not found: {folder}/ lacks {', '.join(missing)}; extract the official python "
            f"archive so that {folder}/ exists, or set data.download=true"
        )
    num_classes = NUM_CLASSES[name]
    train = _read_split(name, root_path, train=True, title=title)
    test = _read_split(name, root_path, train=False, title=title)
    if val_size > 0:
        keep, held = stratified_holdout(train.labels, val_size, seed)
        val = Split(train.images[held], train.labels[held])
        train = Split(train.images[keep], train.labels[keep])
    else:
        val = test
    mean, std = STATS[name]
    return InMemoryData(train=train, val=val, test=test, num_classes=num_classes, mean=mean, std=std)

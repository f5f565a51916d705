"""An image folder decoded once into memory: uint8 tensors at the configured size, for the on-device loader.

With ``data.in_memory=true`` an image folder becomes :class:`~distkd.data.base.InMemoryData`, like CIFAR: every
image is decoded once (by ``num_workers`` processes) into a uint8 ``(N, 3, S, S)`` tensor, training images as their
shorter side resized to ``S`` and center-cropped, val/test images through the evaluation preprocessing (shorter
side to ``S / 0.875``, center crop ``S``). Training then augments on the device (random crop with padding and
flip: ``data.crop_padding``, ``data.flip``), and the in-memory teacher cache and fast path apply. The memory it
needs is stated and checked against the memory available before anything is decoded.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distkd.data.base import InMemoryData, Split
from distkd.data.imagefolder import FileData, ImageSubset
from distkd.errors import DataError

MEMORY_FRACTION = 0.5  # of the memory available now: the most the decoded images may take


class _Decoded(Dataset[tuple[Tensor, int]]):
    """Items of ``subset`` as uint8 ``(3, S, S)`` tensors through ``transform`` (a PIL -> PIL pipeline)."""

    def __init__(self, subset: ImageSubset, transform) -> None:  # noqa: ANN001 - a torchvision Compose
        self.subset, self.transform = subset, transform

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.transforms.functional import pil_to_tensor

        image, label = self.subset.load(i)
        return pil_to_tensor(self.transform(image)), label


def available_memory() -> int:
    """Bytes of memory available now (physical pages not in use), or -1 where the system does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return -1


def to_memory(data: FileData, num_workers: int) -> InMemoryData:
    """Decode the splits of ``data`` into uint8 tensors (see the module docstring); the memory is checked first."""
    from torchvision import transforms as T

    size, pre = data.preprocess.size[0], data.preprocess
    splits = {"train": data.train, "val": data.val} | ({} if data.test_is_val else {"test": data.test})
    count = sum(len(s) for s in splits.values())
    need, free = count * 3 * size * size, available_memory()
    where = f"{count} images at {size}x{size}: {need / 2**20:,.0f} MiB"
    if free >= 0 and need > MEMORY_FRACTION * free:
        raise DataError(f"data.in_memory: {where}, more than half the {free / 2**30:.1f} GiB available; set "
                        "data.in_memory=false to stream the images from their files, or a smaller data.image_size")
    print(f"data.in_memory: decoding {where} (of {free / 2**30:.1f} GiB available)", file=sys.stderr, flush=True)
    filter_ = T.InterpolationMode(pre.interpolation)
    train_tf = T.Compose([T.Resize(size, interpolation=filter_), T.CenterCrop(size)])
    eval_tf = T.Compose([T.Resize(pre.resize, interpolation=filter_), T.CenterCrop(size)])
    decoded = {name: _decode(subset, train_tf if name == "train" else eval_tf, num_workers)
               for name, subset in splits.items()}
    return InMemoryData(train=decoded["train"], val=decoded["val"], test=decoded.get("test", decoded["val"]),
                        num_classes=data.num_classes, mean=data.mean, std=data.std, classes=data.classes,
                        pipeline=pre)


def _decode(subset: ImageSubset, transform, num_workers: int) -> Split:  # noqa: ANN001 - a torchvision Compose
    loader = DataLoader(_Decoded(subset, transform), batch_size=256, num_workers=num_workers)
    images, labels = zip(*loader, strict=True)
    return Split(torch.cat(images).contiguous(), torch.cat(labels).to(torch.int64))

"""COCO-format detection data: an image folder and an ``instances`` json, read as lists of images and boxes.

Layout (COCO 2017's): ``ROOT/<split>/`` holds the images and ``ROOT/annotations/instances_<split>.json`` the
boxes, e.g. ``train2017``/``val2017``. Categories map to contiguous classes 0..K-1 in the order of their ids
(a detector with a background logit shifts them by its ``label_offset``). Crowd boxes are left out of
training (COCO evaluation reads them from the json). Boxes are clipped to their image; a box left with no
area is dropped and counted (``dropped_boxes``), so torchvision never meets a degenerate box. Images without
boxes are kept (all background). Every entry of the json is checked on reading (required keys, integer and unique
ids, finite boxes): a malformed one is a one-line DataError naming it; an annotation without ``area`` or ``iscrowd``
gets its box's area and 0, as COCO evaluation needs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distkd.data.batch import Batch
from distkd.errors import ConfigError, DataError, first_line

Target = dict[str, Tensor]


REQUIRED = {"images": ("id", "file_name"), "annotations": ("image_id", "category_id", "bbox"),
            "categories": ("id", "name")}


def _read_json(path: Path) -> dict[str, Any]:
    """The instances file at ``path``, checked entry by entry (see :func:`_checked`)."""
    if not path.is_file():
        raise DataError(f"COCO annotations {path} not found; expected ROOT/annotations/instances_<split>.json")
    try:
        gt = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"COCO annotations {path} are not valid json: {first_line(exc)}") from None
    missing = [key for key in REQUIRED if not isinstance(gt, dict) or not isinstance(gt.get(key), list)]
    if missing:
        raise DataError(f"COCO annotations {path} lack the list(s) {', '.join(missing)}; is it an instances file?")
    return _checked(gt, path)


def _checked(gt: dict[str, Any], path: Path) -> dict[str, Any]:
    """``gt`` with every entry checked (an object with its required keys; integer ids, each image and category id
    listed once; a bbox of 4 finite numbers) and annotations completed as COCO evaluation reads them: ``iscrowd`` 0
    and ``area`` the box's width x height where absent. Anything else is a one-line DataError naming the entry."""
    for kind, keys in REQUIRED.items():
        for position, entry in enumerate(gt[kind]):
            absent = [key for key in keys if key not in entry] if isinstance(entry, dict) else list(keys)
            if absent:
                raise DataError(f"COCO annotations {path}: {kind}[{position}] "
                                f"{'lacks ' + ', '.join(absent) if isinstance(entry, dict) else 'is not an object'}")
    for kind in ("images", "categories"):
        ids = [_integer(entry["id"], f"{kind}[{i}].id", path) for i, entry in enumerate(gt[kind])]
        if len(set(ids)) != len(ids):
            twice = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"COCO annotations {path}: {kind} id {twice} is listed more than once; ids must be unique")
    for i, ann in enumerate(gt["annotations"]):
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)):
            raise DataError(f"COCO annotations {path}: annotations[{i}] (id {ann.get('id')}) has bbox {bbox!r}; "
                            "expected [x, y, width, height], 4 finite numbers")
        _integer(ann["image_id"], f"annotations[{i}].image_id", path)
        _integer(ann["category_id"], f"annotations[{i}].category_id", path)
    annotations = [{"iscrowd": 0, "area": float(ann["bbox"][2] * ann["bbox"][3])} | ann for ann in gt["annotations"]]
    return gt | {"annotations": annotations}


def _integer(value: Any, where: str, path: Path) -> int:
    """``value``, which must be an integer id; else a one-line DataError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"COCO annotations {path}: {where} is {value!r}; COCO ids are integers")
    return value


class CocoDetection(Dataset):
    """One split: ``dataset[i]`` is ``(image uint8 (3, H, W), {"boxes": float32 (M, 4) x1y1x2y2 in pixels,
    "labels": int64 (M,) in 0..K-1}, i)``. ``gt`` is the json (for evaluation), ``image_ids[i]`` image i's id,
    ``category_ids[k]`` class k's COCO category id."""

    def __init__(self, images: str | Path, annotations: str | Path) -> None:
        self.images, path = Path(images), Path(annotations)
        if not self.images.is_dir():
            raise DataError(f"COCO image folder {self.images} not found")
        self.gt = _read_json(path)
        self.category_ids = sorted(c["id"] for c in self.gt["categories"])
        if not self.category_ids:
            raise DataError(f"COCO annotations {path} list no categories")
        self.class_names = [str(c["name"]) for c in sorted(self.gt["categories"], key=lambda c: c["id"])]
        class_of = {cid: k for k, cid in enumerate(self.category_ids)}
        infos = sorted(self.gt["images"], key=lambda im: im["id"])
        self.image_ids = [im["id"] for im in infos]
        self.files = [str(im["file_name"]) for im in infos]
        sizes = {im["id"]: (_size(im, "width", path), _size(im, "height", path)) for im in infos}
        boxes: dict[int, list[list[float]]] = {i: [] for i in self.image_ids}
        labels: dict[int, list[int]] = {i: [] for i in self.image_ids}
        self.dropped_boxes = 0
        for ann in self.gt["annotations"]:
            image_id, category = ann["image_id"], ann["category_id"]
            if image_id not in boxes or category not in class_of:
                raise DataError(f"COCO annotations {path}: annotation {ann.get('id')} names an unknown "
                                f"{'image' if image_id not in boxes else 'category'}")
            if ann["iscrowd"]:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = sizes[image_id]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x2 <= x1 or y2 <= y1:
                self.dropped_boxes += 1
                continue
            boxes[image_id].append([x1, y1, x2, y2])
            labels[image_id].append(class_of[category])
        self.targets = [{"boxes": torch.tensor(boxes[i], dtype=torch.float32).reshape(-1, 4),
                         "labels": torch.tensor(labels[i], dtype=torch.int64)} for i in self.image_ids]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Target, int]:
        path = self.images / self.files[i]
        try:
            with Image.open(path) as file:
                pixels = np.asarray(file.convert("RGB"))
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {first_line(exc)}") from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), self.targets[i], i


def _size(image: dict[str, Any], key: str, path: Path) -> float:
    """An image's ``width`` or ``height`` from the json (boxes are clipped to it); unbounded when absent."""
    value = image.get(key, math.inf)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise DataError(f"COCO annotations {path}: image {image['id']} has {key} {value!r}; expected a positive "
                        "number (or leave it out)")
    return float(value)


def coco_split(root: str | Path, split: str) -> CocoDetection:
    """Split ``split`` (e.g. ``val2017``) of the COCO-format dataset under ``root``."""
    root = Path(root).expanduser()
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}.json")


def hflip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror an image (C, H, W) and its boxes (M, 4) x1y1x2y2 left to right."""
    width = image.shape[-1]
    boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor(
        [width, 0.0, width, 0.0])
    return image.flip(-1), {**target, "boxes": boxes}


def _as_list(items: list) -> list:
    return items


class DetectionLoader:
    """Batches of a detection dataset: ``Batch(inputs=[float (3, H_i, W_i) in [0, 1]], target=[{"boxes",
    "labels"}], index=int64 (B,))`` on ``device``; images keep their own sizes (the detector resizes and pads).

    Order: ``DistributedSampler``'s permutation seeded by ``seed + epoch``. Augmentation (``flip``): image i of
    epoch e is mirrored when a generator seeded by ``(seed, epoch, i)`` says so, whatever the workers, so a
    resumed epoch (``set_epoch(epoch, start)``) replays the same batches.
    """

    def __init__(self, dataset: CocoDetection, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 flip: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.seed, self.flip, self.num_workers = seed, flip, num_workers
        self.device = torch.device(device)
        self.epoch, self.start = 0, 0
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                          drop_last=drop_last)
        if len(self) == 0:
            raise DataError(f"{len(dataset)} images do not fill one batch of {batch_size}; lower data.batch_size")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    @property
    def dataset_size(self) -> int:
        return len(self.dataset)

    def mirrored(self, index: int) -> bool:
        """Whether image ``index`` is mirrored in the current epoch (never without ``flip``)."""
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**62)
        return self.flip and bool(torch.rand((), generator=gen) < 0.5)

    def __iter__(self) -> Iterator[Batch]:
        order = list(self.sampler)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)][:len(self)]
        batches = batches[self.start:]
        self.start = 0
        # its own generator: a DataLoader otherwise draws its base seed from the global RNG, which would shift the
        # training's random stream (e.g. Faster R-CNN's RoI sampling) when an epoch is resumed mid-way
        own = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=_as_list, num_workers=self.num_workers,
                            generator=own)
        for items in loader:
            images, targets, index = [], [], []
            for image, target, i in items:
                if self.mirrored(i):
                    image, target = hflip(image, target)
                images.append(image.to(self.device, non_blocking=True).float().div_(255.0))
                targets.append({k: v.to(self.device) for k, v in target.items()})
                index.append(i)
            yield Batch(images, targets, torch.tensor(index, device=self.device))

"""Silhouette scenes with boxes, written as a COCO-format dataset (so the real COCO reader reads them).

The scenes are :mod:`distkd.data.scenes`' (1-4 silhouettes on a textured canvas, later ones occluding earlier
ones), drawn by the same layout. Each silhouette is one object: its box is the bounding box of its *visible*
pixels, its category its silhouette class (ids 1..10). An object less than ``MIN_VISIBLE`` visible (occluded)
is left out of the annotations. Images are grey PNGs (read as RGB).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from distkd.data.scenes import MAX_OBJECTS, SOURCE_SIZE, THRESHOLD, Layout, scene_layout, tent_weights
from distkd.data.silhouettes import CLASSES, load_arrays

MIN_VISIBLE = 0.3
SPLITS = ("train", "val", "test")


def render_instances(layout: Layout, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint ``layout`` with silhouettes ``images`` uint8 (M, 28, 28).

    Returns pixels uint8 (N, size, size), the slot that painted each pixel int64 (N, size, size) (-1:
    background) and each slot's drawn area in pixels before occlusion, int64 (N, 4).
    """
    canvas = layout.background.clone()
    n, size = canvas.shape[0], canvas.shape[-1]
    owner = torch.full((n, size, size), -1, dtype=torch.int64)
    area = torch.zeros((n, MAX_OBJECTS), dtype=torch.int64)
    axis = torch.linspace(-1.0 + 1.0 / size, 1.0 - 1.0 / size, size)
    for slot in range(MAX_OBJECTS):
        src = images[layout.sources[:, slot]].float() / 255.0
        inv = (size / (layout.scale[:, slot] * SOURCE_SIZE)).unsqueeze(1)
        sign = torch.where(layout.flip[:, slot], -1.0, 1.0).unsqueeze(1)
        wx = tent_weights((axis - layout.center[:, slot, :1]) * inv * sign, SOURCE_SIZE)
        wy = tent_weights((axis - layout.center[:, slot, 1:]) * inv, SOURCE_SIZE)
        placed = wy @ src @ wx.transpose(1, 2)
        mask = (placed > THRESHOLD / 255.0) & layout.active[:, slot, None, None]
        canvas = torch.where(mask, layout.tone[:, slot, None, None] * (0.7 + 0.3 * placed), canvas)
        owner = torch.where(mask, slot, owner)
        area[:, slot] = mask.sum((1, 2))
    return (canvas * 255.0).round().clamp(0, 255).to(torch.uint8), owner, area


def scene_annotations(owner: torch.Tensor, area: torch.Tensor, classes: torch.Tensor,
                      min_visible: float = MIN_VISIBLE) -> list[list[tuple[list[float], int]]]:
    """Per scene, the ``(bbox [x, y, w, h], class 0..9)`` of every object at least ``min_visible`` visible.

    ``owner`` int64 (N, H, W) the slot painting each pixel (-1: none), ``area`` (N, 4) each slot's full area,
    ``classes`` (N, 4) each slot's class.
    """
    found = []
    for i in range(owner.shape[0]):
        objects = []
        for slot in range(MAX_OBJECTS):
            visible = owner[i] == slot
            count = int(visible.sum())
            if count == 0 or count < min_visible * int(area[i, slot]):
                continue
            ys, xs = torch.nonzero(visible, as_tuple=True)
            x1, y1 = int(xs.min()), int(ys.min())
            objects.append(([float(x1), float(y1), float(int(xs.max()) + 1 - x1), float(int(ys.max()) + 1 - y1)],
                            int(classes[i, slot])))
        found.append(objects)
    return found


def write_split(root: Path, split: str, count: int, seed: int, size: int) -> None:
    """``count`` scenes of ``split`` as ``root/split/*.png`` and ``root/annotations/instances_<split>.json``."""
    from PIL import Image

    layout = scene_layout(split, count, seed, size)
    images, labels = load_arrays()
    pixels, owner, area = render_instances(layout, torch.from_numpy(images))
    classes = torch.from_numpy(labels)[layout.sources]
    folder = root / split
    folder.mkdir(parents=True)
    gt: dict = {"images": [], "annotations": [],
                "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]}
    for i, objects in enumerate(scene_annotations(owner, area, classes)):
        name = f"{i:06d}.png"
        Image.fromarray(np.ascontiguousarray(pixels[i].numpy()), mode="L").save(folder / name)
        gt["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for box, label in objects:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1, "category_id": label + 1,
                                      "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(gt))


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distkd" / "detection_scenes"


def make_detection_scenes(folder: str | Path | None = None, train: int = 2000, val: int = 300, test: int = 500,
                          seed: int = 0, size: int = 96) -> Path:
    """The folder of these scenes (written once, atomically, under ``folder``, default the user cache): a COCO
    layout with splits ``train``, ``val``, ``test``."""
    base = Path(folder).expanduser() if folder is not None else default_root()
    folder = base / f"seed{seed}_size{size}_{train}-{val}-{test}"
    if folder.is_dir():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".writing-", dir=base))
    try:
        for split, count in zip(SPLITS, (train, val, test), strict=True):
            if count:
                write_split(temp, split, count, seed, size)
        try:
            temp.rename(folder)
        except OSError:  # another process finished first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder

"""Teacher-output cache for dense detectors (RetinaNet, FCOS): the teacher head's per-level classification output
``cls_logits`` for every training image, as it is and mirrored, float32 in one memory-mapped file.

The only training augmentation of detection is the horizontal flip, so two rows per image (one without
``data.flip``) hold every view, and the training loader's own seeded flip picks the row: a cached run sees exactly
the batches of the live one, and the teacher's outputs for them exactly: stored as float32 and computed in batches
of the training batch's size (the last one padded, so the CPU kernels are the training step's), a cached run repeats
the live run bit for bit (float16, half the size, perturbed the logits by 0.1% of their spread, enough for runs to
drift apart; other batch sizes, by float32 rounding). This is exact when every training image transforms to one size
without padding (one ``min_size`` and images of one size, as the embedded scenes); otherwise an image's outputs
would depend on the batch it is padded with, and the build stops with a one-line error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distkd.data.batch import Batch
from distkd.data.coco import DetectionLoader
from distkd.distill.teacher_cache import ReplayLoader, publish

TAP = "cls_logits"  # what the cache stores: the classification head's conv output, one tensor per FPN level
DATA = "cls_logits.f32"


class DetectionTeacherCache:
    """Rows ``orientation * count + image`` of float32 per-level outputs, flattened and concatenated."""

    def __init__(self, record: dict[str, Any], rows: np.memmap, levels: list[list[int]]) -> None:
        self.record, self.rows, self.levels = record, rows, levels
        self.count = record["images"]

    @classmethod
    def open_or_build(cls, directory: Path, record: dict[str, Any],
                      teacher_levels: Callable[[list[Tensor]], list[Tensor]], loader: DetectionLoader,
                      log: Callable[[str], None] = print) -> DetectionTeacherCache:
        """Open the cache in ``directory`` if it was made for ``record``, else compute it from ``loader`` (every
        training image in order, unflipped, in batches of the training batch's size). ``teacher_levels``
        maps a list of B images (3, H, W) in [0, 1] to the teacher's per-level outputs (B, C_l, H_l, W_l)."""
        meta, data = directory / "meta.json", directory / DATA
        stored = _stored(meta, data)
        if stored.get("record") == record:
            return cls._open(data, stored)
        if meta.is_file():
            log(f"detection teacher cache in {directory} was made from something else or is damaged; rebuilding it")
        directory.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        (directory / "cls_logits.f16").unlink(missing_ok=True)  # the float16 data of distkd before this one
        orientations, count = record["orientations"], record["images"]
        tmp = directory / f"{DATA}.tmp"
        out: np.memmap | None = None
        levels: list[list[int]] = []
        with torch.inference_mode():
            for batch in loader:
                images = list(batch.inputs)
                full = images + images[:1] * (loader.batch_size - len(images))  # the training batch's size always
                for mirrored in range(orientations):
                    outputs = [o[: len(images)] for o in teacher_levels([x.flip(-1) if mirrored else x for x in full])]
                    shapes = [list(o.shape[1:]) for o in outputs]
                    if out is None:
                        levels = shapes
                        width = sum(math.prod(s) for s in shapes)
                        out = np.memmap(tmp, dtype=np.float32, mode="w+", shape=(orientations * count, width))
                    flat = torch.cat([o.flatten(1) for o in outputs], 1).float().cpu().numpy()
                    out[(mirrored * count + batch.index.cpu()).numpy()] = flat
        out.flush()
        del out
        publish(tmp, data)
        stored = {"record": record, "levels": levels}
        meta.write_text(json.dumps(stored))  # written last: a cache without meta.json is never used
        log(f"detection teacher cache: {orientations} orientation(s) x {count} images written to {data}")
        return cls._open(data, stored)

    @classmethod
    def _open(cls, data: Path, stored: dict[str, Any]) -> DetectionTeacherCache:
        record, levels = stored["record"], stored["levels"]
        width = sum(math.prod(s) for s in levels)
        rows = np.memmap(data, dtype=np.float32, mode="r", shape=(record["orientations"] * record["images"], width))
        return cls(record, rows, levels)

    def teacher(self, index: Tensor, mirrored: Tensor, device: torch.device) -> dict[str, list[Tensor]]:
        """The cached outputs of images ``index`` int64 (B,), mirrored where ``mirrored`` bool (B,):
        ``{"cls_logits": [float32 (B, C_l, H_l, W_l) per level]}`` on ``device``."""
        rows = (mirrored.long() * self.count + index.cpu()).numpy()
        flat = torch.from_numpy(self.rows[rows]).to(device, torch.float32)
        outputs, start = [], 0
        for c, h, w in self.levels:
            outputs.append(flat[:, start : start + c * h * w].reshape(-1, c, h, w))
            start += c * h * w
        return {TAP: outputs}


def _stored(meta: Path, data: Path) -> dict[str, Any]:
    """The stored meta of an intact cache, else ``{}`` (no meta, unreadable, or a data file of the wrong size)."""
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))
        record, levels = stored["record"], stored["levels"]
        expected = record["orientations"] * record["images"] * sum(math.prod(s) for s in levels) * 4
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}
    return stored if data.is_file() and data.stat().st_size == expected else {}


class CachedDetectionLoader(ReplayLoader):
    """The training DetectionLoader's batches, each with ``Batch.teacher`` = the cached ``{"cls_logits": [...]}``
    of its images in the orientation the loader drew for them."""

    def __init__(self, loader: DetectionLoader, cache: DetectionTeacherCache) -> None:
        self.loader, self.cache = loader, cache

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            mirrored = torch.tensor([self.loader.mirrored(i) for i in batch.index.tolist()])
            yield replace(batch, teacher=self.cache.teacher(batch.index, mirrored, self.loader.device))

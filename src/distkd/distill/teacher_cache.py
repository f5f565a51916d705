"""Teacher-output cache: a fixed teacher's logits for K seeded augmented views of every training sample.

The logits are computed once, stored as float16 in a memory-mapped file ``logits.f16`` (K, N, C) with a
``meta.json`` recording what they were made from (teacher name and checkpoint hash, dataset content hash,
augmentation, normalisation, K, seed). During training :class:`CachedViewLoader` replays exactly those
views — each epoch every sample is shown in one of its K views, picked by a seeded draw — so the teacher
never runs again. A cache whose record differs from the run's is rebuilt, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distkd.data.augment import CropFlip, CropFlipParams
from distkd.data.batch import Batch
from distkd.data.loaders import TensorLoader, derive_seed

VIEW_SALT = 0x7EAC  # separates the views' seeds from the loader's (seed, epoch) seeds


def dataset_digest(images: Tensor, labels: Tensor) -> str:
    """blake2b of the raw uint8 images and labels: identifies the training data's content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(images.cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def view_params(augment: CropFlip, views: int, count: int, height: int, width: int, seed: int) -> CropFlipParams:
    """The crop/flip parameters of every view of every sample, as (views * count,) tensors, view-major."""
    parts = [augment.sample(count, height, width, torch.Generator().manual_seed(derive_seed(seed, VIEW_SALT, k)))
             for k in range(views)]
    return CropFlipParams(*(torch.cat([getattr(p, f) for p in parts]) for f in ("dy", "dx", "flip")))


class TeacherCache:
    """Float16 teacher logits in ``directory``: ``logits`` is (views * samples, classes), view-major."""

    def __init__(self, directory: Path, record: dict[str, Any], logits: np.memmap) -> None:
        self.directory, self.record, self.logits = directory, record, logits

    @classmethod
    def open_or_build(
        cls,
        directory: Path,
        record: dict[str, Any],
        teacher_fn: Callable[[Tensor], Tensor],
        loader: TensorLoader,
        batch_size: int,
        log: Callable[[str], None] = print,
    ) -> TeacherCache:
        """Open the cache in ``directory`` if its record equals ``record``; otherwise compute and store it.

        ``teacher_fn`` maps a normalised batch (B, C, H, W) to logits (B, K); ``loader`` holds the training
        split and its augmentation and normalisation.
        """
        meta, data = directory / "meta.json", directory / "logits.f16"
        if meta.is_file():
            stored, damage = _read_record(meta, data)
            if damage:
                log(f"teacher cache in {directory} is damaged ({damage}); rebuilding it")
            elif {k: v for k, v in stored.items() if k != "shape"} == record:
                return cls._open(directory, stored)
            else:
                log(f"teacher cache in {directory} was made from something else; rebuilding it")
        directory.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        views, count = record["views"], len(loader.labels)
        params = view_params(loader.augment, views, count, *loader.images.shape[-2:], record["seed"])
        tmp = directory / "logits.f16.tmp"
        out: np.memmap | None = None
        with torch.inference_mode():
            for start in range(0, views * count, batch_size):
                flat = torch.arange(start, min(start + batch_size, views * count))
                x = loader.augment.apply(loader.images[(flat % count).to(loader.images.device)], params[flat])
                logits = teacher_fn(loader.normalise(x)).float().cpu().numpy().astype(np.float16)
                if out is None:
                    out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(views * count, logits.shape[1]))
                out[flat.numpy()] = logits
        out.flush()
        del out
        publish(tmp, data)
        stored = record | {"shape": [views, count, int(logits.shape[1])]}
        meta.write_text(json.dumps(stored))  # written last: a cache without meta.json is never used
        log(f"teacher cache: {views} views x {count} samples written to {data}")
        return cls._open(directory, stored)

    @classmethod
    def _open(cls, directory: Path, record: dict[str, Any]) -> TeacherCache:
        views, count, classes = record["shape"]
        logits = np.memmap(directory / "logits.f16", dtype=np.float16, mode="r", shape=(views * count, classes))
        return cls(directory, record, logits)


def _read_record(meta: Path, data: Path) -> tuple[dict[str, Any], str]:
    """The stored record and ``""``, or ``{}`` and what is wrong with the cache (unreadable record, missing or
    truncated logits file)."""
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))
        views, count, classes = (int(v) for v in stored["shape"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return {}, f"unreadable meta.json: {type(exc).__name__}"
    expected = views * count * classes * 2  # float16
    size = data.stat().st_size if data.is_file() else None
    if size != expected:
        return {}, f"logits.f16 holds {size} bytes, not {expected}" if size is not None else "logits.f16 is missing"
    return stored, ""


def publish(tmp: Path, path: Path) -> None:
    """Make the fully written file ``tmp`` durable (fsync) and give it its name ``path`` in one rename."""
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)


class ReplayLoader:
    """A cache's training loader around ``self.loader``: the wrapped loader's epochs, order, length and sizes."""

    loader: Any

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.set_epoch(epoch, start)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    @property
    def dataset_size(self) -> int:
        return self.loader.dataset_size


class CachedViewLoader(ReplayLoader):
    """Wraps the training TensorLoader: yields batches of one cached view per sample, ``Batch.teacher`` holding
    the teacher's float32 logits (B, K) for them.

    The sample order and sharding are the wrapped loader's; the view of each sample is drawn from a
    generator seeded by ``(seed, epoch, rank)``, so resumed runs replay the same batches.
    """

    def __init__(self, loader: TensorLoader, cache: TeacherCache) -> None:
        self.loader, self.cache = loader, cache
        self.views, self.count, _ = cache.record["shape"]
        self.params = view_params(loader.augment, self.views, self.count, *loader.images.shape[-2:],
                                  cache.record["seed"]).to(loader.device)

    def __iter__(self) -> Iterator[Batch]:
        loader = self.loader
        indices, _ = loader.plan()
        gen = torch.Generator().manual_seed(derive_seed(loader.seed, VIEW_SALT, loader.epoch, loader.rank))
        flat = torch.randint(self.views, indices.shape, generator=gen) * self.count + indices
        for start in range(loader.start * loader.batch_size, len(loader) * loader.batch_size, loader.batch_size):
            batch = flat[start : min(start + loader.batch_size, loader.num_samples)]
            index = (batch % self.count).to(loader.device)
            x = loader.augment.apply(loader.images[index], self.params[batch.to(loader.device)])
            teacher = torch.from_numpy(self.cache.logits[batch.numpy()]).to(loader.device, torch.float32)
            yield Batch(loader.normalise(x), loader.labels[index].long(), index, teacher)

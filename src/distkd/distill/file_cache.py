"""Teacher-output cache for file datasets (image folders): the teacher's logits on K seeded views of every image,
computed once, so that distilling a student costs what training it alone costs (FKD, Shen & Xing, ECCV 2022).

View ``k`` of image ``i`` is :class:`~distkd.data.views.SeededViews`' replay of the training pipeline under RNGs
seeded from ``(seed, i, k)`` (RandomResizedCrop box, flip, RandAugment ops and magnitudes, random erasing): the
student sees, pixel for pixel, the view the teacher saw, in any process and with any number of workers. Mixup and
cutmix (preset b3) mix pairs within a batch, so their views depend on the batch and are not cached (refused).

Layout of ``directory``: ``record.json`` (what the logits were made from: teacher name and weights hash, data
listing hash, pipeline, normalisation, K, seed, shard size) and ``shard_NNNNN.f16`` files, shard ``s`` holding
float16 logits (K, n_s, C) of samples ``[s S, s S + n_s)``. Shards are written whole (temporary file, fsync,
rename) by the process that owns them (shard ``s`` by rank ``s % world_size``), so a killed build resumes with the
shards still missing, and several processes build in parallel. A record that differs from the run's makes the
cache stale: its shards are deleted and rebuilt, never mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from distkd.data.batch import Batch
from distkd.data.loaders import derive_seed
from distkd.data.views import SeededViews
from distkd.distill.teacher_cache import ReplayLoader
from distkd.errors import ConfigError, DataError

if TYPE_CHECKING:  # imported lazily: image folders need timm
    from distkd.data.imagefolder import FileLoader

SHARD_SAMPLES = 4096  # samples per shard: 8 MB per view of 1,000 float16 logits
EPOCH_VIEW_SALT = 0x7EAD  # the per-epoch view draw, apart from every other derived seed


class FileTeacherCache:
    """Float16 logits of ``views`` views x ``count`` samples x ``classes`` classes, sharded in ``directory``."""

    def __init__(self, directory: Path, record: dict[str, Any]) -> None:
        self.directory, self.record = directory, record
        self.views, self.count, self.classes = record["views"], record["count"], record["classes"]
        self.shard_samples = record["shard_samples"]
        self._open: dict[int, np.memmap] = {}

    # ------------------------------------------------------------------ layout

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_samples)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole cache."""
        return self.views * self.count * self.classes * 2

    def shard_range(self, shard: int) -> range:
        """The sample indices shard ``shard`` holds."""
        return range(shard * self.shard_samples, min((shard + 1) * self.shard_samples, self.count))

    def shard_path(self, shard: int) -> Path:
        return self.directory / f"shard_{shard:05d}.f16"

    def _shard_bytes(self, shard: int) -> int:
        return self.views * len(self.shard_range(shard)) * self.classes * 2

    def missing(self) -> list[int]:
        """Shards not (completely) on disk."""
        return [s for s in range(self.shards)
                if not (path := self.shard_path(s)).is_file() or path.stat().st_size != self._shard_bytes(s)]

    # ------------------------------------------------------------------ building

    @classmethod
    def prepare(cls, directory: Path, record: dict[str, Any], log: Callable[[str], None] = print) -> FileTeacherCache:
        """The cache ``record`` describes in ``directory``: kept when its ``record.json`` matches, emptied (stale
        shards deleted, the new record written) otherwise. Call on one process (rank 0), before :meth:`build`."""
        meta = directory / "record.json"
        stored = _read_json(meta)
        if stored != record:
            if stored is not None:
                log(f"teacher cache in {directory} was made from something else; rebuilding it")
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("shard_*.f16*"):
                stale.unlink()
            tmp = meta.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, sort_keys=True))
            os.replace(tmp, meta)
        cache = cls(directory, record)
        cache.check_space(log)
        return cache

    def check_space(self, log: Callable[[str], None] = print) -> None:
        """Say how much the cache takes; refuse when the shards still missing do not fit on the disk."""
        missing = self.missing()
        needed = sum(self._shard_bytes(s) for s in missing)
        free = shutil.disk_usage(self.directory).free
        log(f"teacher cache: {self.views} views x {self.count} images x {self.classes} logits = "
            f"{_size(self.nbytes)} (float16) in {self.directory}; {len(missing)} of {self.shards} shard(s) to build")
        if needed > free:
            raise ConfigError(f"the teacher cache needs {_size(needed)} more in {self.directory} but {_size(free)} "
                              "are free; free space, set teacher_cache.dir to a larger disk, or lower "
                              "teacher_cache.views")

    def build(self, teacher_fn: Callable[[Tensor], Tensor], views: SeededViews, batch_size: int, num_workers: int,
              rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print) -> list[int]:
        """Compute and write the missing shards this rank owns (``s % world_size == rank``); return them.

        ``teacher_fn`` maps a batch of views (B, 3, S, S), as the pipeline made them, to logits (B, classes).
        """
        mine = [s for s in self.missing() if s % world_size == rank]
        for shard in mine:
            samples = self.shard_range(shard)
            flat = [k * self.count + i for k in range(self.views) for i in samples]
            loader = DataLoader(Subset(views, flat), batch_size=batch_size, num_workers=num_workers)
            out = np.empty((len(flat), self.classes), dtype=np.float16)
            done = 0
            with torch.inference_mode():
                for x, _, _ in loader:
                    logits = teacher_fn(x)
                    if logits.shape[1] != self.classes:
                        raise DataError(f"the teacher gives {logits.shape[1]} logits per image but the dataset has "
                                        f"{self.classes} classes; use a teacher trained on these classes")
                    out[done : done + len(x)] = logits.float().cpu().numpy()
                    done += len(x)
            _write_atomic(self.shard_path(shard), out)
            log(f"teacher cache: shard {shard + 1}/{self.shards} written ({len(samples)} images x {self.views} views)")
        return mine

    # ------------------------------------------------------------------ reading

    def rows(self, flat: Tensor) -> Tensor:
        """Float32 logits (B, classes) of views ``flat`` (B,) (``flat = view * count + sample``)."""
        view, sample = flat // self.count, flat % self.count
        shard = sample // self.shard_samples
        out = torch.empty(len(flat), self.classes)
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().squeeze(1)
            data = self._shard(s)
            rows = data[view[at].numpy(), (sample[at] - s * self.shard_samples).numpy()]
            out[at] = torch.from_numpy(rows.astype(np.float32))
        return out

    def _shard(self, shard: int) -> np.memmap:
        if shard not in self._open:
            if shard in self.missing():
                raise DataError(f"teacher cache shard {self.shard_path(shard)} is missing or incomplete; build the "
                                "cache again (distkd cache build CONFIG)")
            shape = (self.views, len(self.shard_range(shard)), self.classes)
            self._open[shard] = np.memmap(self.shard_path(shard), dtype=np.float16, mode="r", shape=shape)
        return self._open[shard]


class CachedFileLoader(ReplayLoader):
    """A :class:`~distkd.data.imagefolder.FileLoader`'s batches with one cached view per sample: ``Batch.teacher``
    holds the teacher's float32 logits (B, classes) of exactly the view in ``Batch.inputs``.

    The sample order and sharding over ranks are the wrapped loader's; each epoch the view of every sample is
    drawn uniformly from the K cached ones (with a generator seeded by ``(seed, epoch, rank)``), so epochs beyond K
    reuse views in a new order and combination, and a resumed epoch replays the same views.
    """

    def __init__(self, loader: FileLoader, cache: FileTeacherCache, views: SeededViews) -> None:
        self.loader, self.cache, self.views = loader, cache, views

    def __iter__(self) -> Iterator[Batch]:
        loader = self.loader
        order = torch.tensor(list(loader.sampler), dtype=torch.long)
        gen = torch.Generator().manual_seed(derive_seed(loader.seed, EPOCH_VIEW_SALT, loader.epoch, loader.rank))
        flat = (torch.randint(self.cache.views, order.shape, generator=gen) * self.cache.count + order).tolist()
        batches = DataLoader(self.views, batch_size=loader.batch_size, sampler=flat[loader.start * loader.batch_size:],
                             num_workers=loader.num_workers, pin_memory=loader.device.type == "cuda",
                             drop_last=loader.drop_last)
        memory_format = torch.channels_last if loader.channels_last else torch.contiguous_format
        device = loader.device
        for x, y, f in batches:
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            teacher = self.cache.rows(f).to(device, non_blocking=True)
            yield Batch(x, y.to(device, non_blocking=True), (f % self.cache.count).to(device), teacher)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".f16.tmp")
    with open(tmp, "wb") as handle:
        handle.write(array.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"

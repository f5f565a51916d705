"""An in-memory loader: one uint8 split on the training device, batches augmented and normalised whole.

Everything random is drawn on the CPU from generators seeded by ``(seed, epoch)`` (sample order, shared by
all ranks) and ``(seed, epoch, rank)`` (augmentation), so an epoch's batches are a pure function of those
numbers: a run resumed at epoch k sees the same batches as one that never stopped. With ``world_size > 1``
each rank takes a disjoint, strided shard of the same permutation, padded by repetition (or trimmed when
``drop_last``) to divide evenly, as ``torch.utils.data.DistributedSampler`` does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from distkd.data.augment import CropFlip, CropFlipParams
from distkd.data.base import Split
from distkd.data.batch import Batch
from distkd.errors import ConfigError, DataError

IGNORE_INDEX = 255  # label of padded pixels in dense (segmentation) labels


def derive_seed(*parts: int) -> int:
    """A 63-bit generator seed that depends on every part (unlike ``seed + epoch``, which collides)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TensorLoader:
    """Batches of one in-memory split held on `device`; augments and normalises whole batches.

    Yields a :class:`~distkd.data.batch.Batch` per step: ``inputs`` float (B, C, H, W) normalised with ``mean``/``std``
    (given on the [0, 1] scale), ``target`` int64 (B,) class labels or (B, H, W) dense labels, ``index`` int64
    (B,) the samples' positions in the split. Dense labels get the same crop/flip as their images, padded with
    ``IGNORE_INDEX`` (255).
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        augment: CropFlip | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        images, labels = split.images, split.labels
        _check_split(images, labels)
        channels = images.shape[1]
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"mean/std need one value per channel ({channels}), got {len(mean)} and {len(std)} values"
            )
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be > 0, got {tuple(std)}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating point type (e.g. torch.float32), got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")

        self.batch_size = batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.epoch = 0
        self.start = 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype
        self.mean, self.std = tuple(mean), tuple(std)
        self.images = images.to(device).contiguous()
        self.labels = labels.to(device)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)  # x_uint8 * scale + shift == (x / 255 - mean) / std
        self._shift = -mean_t / std_t

        total = len(labels)
        per_rank = total // world_size if drop_last else math.ceil(total / world_size)
        self._num_samples = per_rank
        if len(self) == 0:
            raise DataError(
                f"rank {rank} of {world_size} gets {per_rank} of {total} samples, not one full batch of "
                f"{batch_size}; lower the batch size (data.batch_size in a config)"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration yields, from its batch ``start``
        on (a run resumed mid-epoch sees the very batches the uninterrupted run saw from there)."""
        self.epoch, self.start = epoch, start

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return self._num_samples

    @property
    def dataset_size(self) -> int:
        """Samples in the whole split (``Batch.index`` is below this)."""
        return len(self.labels)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self._num_samples // self.batch_size
        return math.ceil(self._num_samples / self.batch_size)

    def plan(self) -> tuple[Tensor, CropFlipParams | None]:
        """This rank's sample indices int64 (num_samples,) for the current epoch, in order, and their
        crop/flip parameters (None without augmentation); both on the CPU."""
        total = len(self.labels)
        if self.shuffle:
            order_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(total, generator=order_gen)
        else:
            order = torch.arange(total)
        padded_total = self._num_samples * self.world_size
        order = order.repeat(math.ceil(padded_total / total))[:padded_total]
        indices = order[self.rank :: self.world_size]
        if self.augment is None:
            return indices, None
        aug_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        height, width = self.images.shape[-2:]
        return indices, self.augment.sample(len(indices), height, width, aug_gen)

    def __iter__(self) -> Iterator[Batch]:
        indices, params = self.plan()
        indices = indices.to(self.device)
        augment = self.augment
        if params is not None:
            params = params.to(self.device)
        dense = self.labels.dim() == 3
        for start in range(self.start * self.batch_size, len(self) * self.batch_size, self.batch_size):
            batch = slice(start, min(start + self.batch_size, self._num_samples))
            index = indices[batch]
            x = self.images[index]
            y = self.labels[index]
            if augment is not None and params is not None:
                x = augment.apply(x, params[batch])
                if dense:
                    y = augment.apply_dense(y, params[batch], IGNORE_INDEX)
            yield Batch(self.normalise(x), y.long(), index)

    def normalise(self, x: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> ``dtype`` (B, C, H, W) in the requested memory format, normalised."""
        return x.to(self.dtype, memory_format=self.memory_format).mul_(self._scale).add_(self._shift)


def _check_split(images: Tensor, labels: Tensor) -> None:
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise DataError(
            f"split images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}; "
            "store the raw uint8 pixels, the loader normalises"
        )
    n, _, height, width = images.shape
    if n == 0:
        raise DataError("the split is empty; check the dataset path and split name")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class ids, got {labels.dtype}")
    if tuple(labels.shape) not in ((n,), (n, height, width)):
        raise DataError(
            f"labels must be (N,) or (N, H, W) = ({n},) or ({n}, {height}, {width}) to fit images "
            f"{tuple(images.shape)}, got {tuple(labels.shape)}"
        )

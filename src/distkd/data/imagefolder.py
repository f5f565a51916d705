"""ImageNet and any dataset in ImageFolder layout, read from files and augmented on CPU workers.

Layout::

    <root>/train/<class>/<image>      (any extension torchvision's ImageFolder reads: .jpg, .png, ...)
    <root>/val/<class>/<image>        (the same class folders)
    <root>/test/<class>/<image>       (optional: a test split never used to select)

Class ids follow the sorted class-folder names of ``train/``. Images are decoded as RGB and go through
the preset's pipelines (:mod:`distkd.data.presets`): random ones for ``train``, the resize + center
crop of :class:`~distkd.data.preprocess.Preprocess` for ``val``/``test``. :class:`FileLoader` batches them
with the same protocol as the in-memory ``TensorLoader``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets import ImageFolder

from distkd.data.batch import Batch
from distkd.data.cifar import stratified_holdout
from distkd.data.loaders import derive_seed
from distkd.data.preprocess import Preprocess
from distkd.data.presets import EVAL_CROP_PCT, MixupSpec, Preset, Transform, get_preset
from distkd.errors import ConfigError, DataError, DistkdError, first_line

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"


def _one_line_errors(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate ``loader``; a distkd error raised in a worker process comes back with its own one-line message
    (the DataLoader wraps it in a multi-line report of the worker's traceback)."""
    try:
        yield from loader
    except DistkdError as err:
        lines = str(err).strip().splitlines()
        original = next((line.split(": ", 1)[1] for line in reversed(lines) if line.startswith("distkd.errors.")),
                        lines[-1] if lines else type(err).__name__)
        raise type(err)(original) from None


class ImageSubset(Dataset[tuple[Tensor, int]]):
    """Items ``indices`` (all if None) of a scanned ImageFolder, each passed through ``transform``.

    ``dataset[i]`` is ``(image float (3, H, W), label int)``; ``targets`` lists the labels in order.
    """

    def __init__(self, folder: ImageFolder, indices: Sequence[int] | None, transform: Transform) -> None:
        self.folder = folder
        self.indices = list(range(len(folder))) if indices is None else [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.load(i)
        return self.transform(image), label

    def load(self, i: int) -> tuple[Image.Image, int]:
        """Item ``i`` decoded (RGB), before the transform, and its label."""
        path, label = self.folder.samples[self.indices[i]]
        try:
            return self.folder.loader(path), label
        except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated or broken files
            raise DataError(f"cannot read image {path}: {first_line(err)}; fix or remove it, or set "
                            "data.skip_unreadable=true to leave unreadable files out (they are counted)") from None

    @property
    def targets(self) -> list[int]:
        return [self.folder.targets[i] for i in self.indices]

    def listing_digest(self) -> str:
        """blake2b of the items' paths (relative to the folder), labels and file sizes: identifies the listing."""
        h = hashlib.blake2b(digest_size=16)
        root = Path(self.folder.root)
        for i in self.indices:
            path, label = self.folder.samples[i]
            h.update(f"{Path(path).relative_to(root).as_posix()}\0{label}\0{os.path.getsize(path)}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class FileData:
    """A file dataset split three ways, with what the loaders and the trainer need to know.

    ``train``/``val``/``test`` yield ``(image float (3, S, S), label int)`` with ``S = image_size``.
    ``test`` is always set: ``<root>/test`` when that folder exists; otherwise ``<root>/val`` when a
    validation split was held out of ``train/``, else the very same object as ``val`` (``<root>/val``, the
    ImageNet convention: see ``test_is_val``). ``mean``/``std`` ([0, 1] scale) are the ones the pipelines
    normalise with; ``preprocess`` is the val/test pipeline as data; ``preset.mixup`` says whether training
    batches should be mixed (give it to :class:`FileLoader`).
    """

    train: ImageSubset
    val: ImageSubset
    test: ImageSubset
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preset: Preset
    preprocess: Preprocess

    @property
    def test_is_val(self) -> bool:
        """True when the test split is the validation split itself (selection and report on the same images)."""
        return self.test is self.val


def _scan(folder: Path, skip_unreadable: bool = False) -> ImageFolder:
    try:
        scanned = ImageFolder(str(folder))
    except FileNotFoundError as err:
        message = " ".join(str(err).split())
        raise DataError(
            f"{folder}: {message}; every class needs a folder with at least one image ({LAYOUT})"
        ) from err
    if skip_unreadable:
        _drop_unreadable(scanned, folder)
    return scanned


def _drop_unreadable(folder: ImageFolder, where: Path) -> None:
    """Leave out the files PIL cannot open, saying how many (never silently)."""
    from PIL import Image

    bad = []
    for path, _ in folder.samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError):
            bad.append(path)
    if bad:
        skipped = set(bad)
        folder.samples = folder.imgs = [s for s in folder.samples if s[0] not in skipped]
        folder.targets = [label for _, label in folder.samples]
        print(f"{where}: left out {len(bad)} unreadable image file(s) of {len(bad) + len(folder.samples)} "
              f"(data.skip_unreadable=true), e.g. {bad[0]}", flush=True)


def load_imagefolder(
    root: str, *, preset: str = "b1", image_size: int | None = None, val_size: int = 0, seed: int = 0,
    skip_unreadable: bool = False,
) -> FileData:
    """Scan ``<root>/train``, ``<root>/val`` (and ``<root>/test`` when present) and pair them with the
    pipelines of ``preset``.

    * ``val_size = 0``: ``val`` is ``<root>/val``; ``test`` is ``<root>/test``, or without it that same
      ``val`` dataset (best-on-val checkpoints are then selected on the reported set, as ImageNet papers do).
    * ``val_size > 0``: ``val_size`` images of ``train/`` (stratified by class, drawn with ``seed``)
      form ``val`` with the eval pipeline; ``train`` is the rest; ``test`` is ``<root>/test``, or without it
      ``<root>/val``.

    Normalisation uses the ImageNet mean/std. Unknown preset -> UnknownNameError; missing ``train/``
    or ``val/``, class folders without images, or other classes in ``val/`` or ``test/`` than in ``train/`` ->
    DataError. An unreadable
    image is a DataError naming it when it is loaded; ``skip_unreadable`` checks every file first and leaves
    the unreadable ones out, with a count.
    """
    spec = get_preset(preset)
    if image_size is not None and image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    base = Path(root).expanduser()
    for part in ("train", "val"):
        if not (base / part).is_dir():
            raise DataError(f"{base / part} is not a folder; expected the ImageFolder layout {LAYOUT}")
    train_folder, val_folder = _scan(base / "train", skip_unreadable), _scan(base / "val", skip_unreadable)
    test_folder = _scan(base / "test", skip_unreadable) if (base / "test").is_dir() else None
    for part, folder in (("val", val_folder), ("test", test_folder)):
        if folder is not None and folder.classes != train_folder.classes:
            only_train = sorted(set(train_folder.classes) - set(folder.classes))
            only_other = sorted(set(folder.classes) - set(train_folder.classes))
            raise DataError(
                f"{base}: train/ and {part}/ must have the same class folders; only in train/: {only_train[:5]}, "
                f"only in {part}/: {only_other[:5]}"
            )
    if image_size is None:
        image_size = auto_image_size(train_folder)
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    train_tf = spec.train_transform(image_size, mean, std)
    preprocess = Preprocess(channels=3, size=(image_size, image_size), resize=math.floor(image_size / EVAL_CROP_PCT),
                            interpolation=spec.interpolation, mean=mean, std=std)
    eval_tf = preprocess.transform()
    official_val = ImageSubset(val_folder, None, eval_tf)
    if val_size > 0:
        keep, held = stratified_holdout(torch.tensor(train_folder.targets), val_size, seed)
        train = ImageSubset(train_folder, keep.tolist(), train_tf)
        val, test = ImageSubset(train_folder, held.tolist(), eval_tf), official_val
    else:
        train = ImageSubset(train_folder, None, train_tf)
        val = test = official_val
    if test_folder is not None:
        test = ImageSubset(test_folder, None, eval_tf)
    return FileData(
        train=train,
        val=val,
        test=test,
        num_classes=len(train_folder.classes),
        classes=tuple(train_folder.classes),
        mean=mean,
        std=std,
        preset=spec,
        preprocess=preprocess,
    )


MAX_AUTO_SIZE = 224
AUTO_SAMPLE = 200


def auto_image_size(folder: ImageFolder) -> int:
    """The input size for images like ``folder``'s: their median shorter side (over up to ``AUTO_SAMPLE`` files
    spread over the listing, headers only) x 0.875, so that evaluation's resize to size / 0.875 does not upscale,
    rounded down to a multiple of 8, between 8 and ``MAX_AUTO_SIZE``. Says what it chose."""
    samples = folder.samples[:: max(1, len(folder.samples) // AUTO_SAMPLE)]
    sides = []
    for path, _ in samples:
        with Image.open(path) as image:
            sides.append(min(image.size))
    median = sorted(sides)[len(sides) // 2]
    size = max(8, min(MAX_AUTO_SIZE, math.floor(median * EVAL_CROP_PCT) // 8 * 8))
    print(f"data.image_size: {size} (the training images' median shorter side {median} x {EVAL_CROP_PCT}, rounded "
          f"down to a multiple of 8, at most {MAX_AUTO_SIZE}); set data.image_size to choose", flush=True)
    return size


class MixCollate:
    """Collates ``(image, label)`` items, then mixes the batch: ``(x (B, C, H, W), y float (B, K))``.

    Runs inside the loader's worker processes, so timm's ``Mixup`` draws from their seeded RNGs.
    """

    def __init__(self, spec: MixupSpec, num_classes: int) -> None:
        self.mixup = spec.build(num_classes)

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        x, y = default_collate(items)
        return self.mixup(x, y)


class FileLoader:
    """Batches of a file dataset, decoded and augmented by worker processes, moved to ``device``.

    Yields a :class:`~distkd.data.batch.Batch` per step: ``inputs`` float (B, C, H, W) as the pipeline
    produced it (normalised); ``target`` int64 (B,) labels, or with ``mixup`` soft targets float (B, num_classes)
    whose rows sum to 1 (``torch.nn.functional.cross_entropy`` accepts such probabilities as its target);
    ``index`` int64 (B,) the samples' positions in the dataset.

    Sampling is ``torch.utils.data.DistributedSampler``'s: the order is a permutation seeded by
    ``seed + epoch`` (shared by all ranks), each rank takes a strided shard, padded by repetition to
    divide evenly (trimmed instead with ``drop_last``). Each epoch's workers get seeds drawn from a
    generator seeded by ``(seed, epoch, rank)``, so with ``num_workers >= 1`` the augmentations and the
    mixing of an epoch are reproducible for a given ``num_workers``; with ``num_workers = 0`` they draw
    from the main process's global RNGs instead (only the order is then seeded). ``set_epoch(epoch, start)``
    resumes an epoch at batch ``start`` with the same samples; their augmentation is drawn anew.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
        mixup: MixupSpec | None = None,
        num_classes: int | None = None,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.collate: Callable[[list[tuple[Tensor, int]]], tuple[Tensor, Tensor]] = default_collate
        if mixup is not None:
            if num_classes is None:
                raise ConfigError("mixup/cutmix needs num_classes to build soft targets; pass num_classes=")
            if batch_size % 2 or not drop_last:
                raise ConfigError(
                    f"mixup/cutmix pairs each batch with its reverse and needs even batches: use an even "
                    f"batch_size (got {batch_size}) and drop_last=True (got {drop_last})"
                )
            self.collate = MixCollate(mixup, num_classes)
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.device = device
        self.channels_last = channels_last
        self.epoch = 0
        self.start = 0
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        if len(self) == 0:
            raise DataError(
                f"rank {rank} of {world_size} gets {self.num_samples} of {len(dataset)} samples, not one full "
                f"batch of {batch_size}; lower the batch size (data.batch_size in a config)"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration yields, from its batch ``start`` on."""
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # datasets that seed their own augmentation per epoch
            self.dataset.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.sampler)

    @property
    def dataset_size(self) -> int:
        """Samples in the whole dataset (``Batch.index`` is below this)."""
        return len(self.dataset)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank))
        order = list(self.sampler)[self.start * self.batch_size :]
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=self.device.type == "cuda",
            drop_last=self.drop_last,
            generator=generator,
        )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for i, (x, y) in enumerate(_one_line_errors(loader)):
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=memory_format)
            index = torch.tensor(order[i * self.batch_size : i * self.batch_size + len(y)])
            yield Batch(x, y.to(self.device, non_blocking=True), index.to(self.device))

"""Image classification: datasets and loaders, student/teacher models, CE, top-1/top-5."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import default_collate

from distkd.config import DataConfig, LossConfig, RunConfig
from distkd.data.augment import CropFlip
from distkd.data.base import InMemoryData
from distkd.data.loaders import TensorLoader
from distkd.data.views import SeededViews
from distkd.distill import Distiller, SingleInputStep, logits_of
from distkd.distill.file_cache import SHARD_SAMPLES, CachedFileLoader, FileTeacherCache
from distkd.distill.renormalize import Renormalize
from distkd.distill.teacher_cache import CachedViewLoader, TeacherCache, dataset_digest
from distkd.engine import distributed
from distkd.engine.trainer import Loader, TrainSetup
from distkd.errors import ConfigError, DataError
from distkd.models.adapters import input_stats
from distkd.models.weights import weights_sha256
from distkd.registry import Registry
from distkd.tasks.common import (
    DATASET_OPTIONS,
    build_model,
    build_teacher_and_terms,
    check_data_options,
    check_input,
    data_workers,
    eval_shard,
    process_batches,
    teacher_cache_dir,
)

DATASETS: Registry[object] = Registry("classification dataset")


@DATASETS.register("silhouettes")
def _silhouettes(cfg: DataConfig, seed: int) -> InMemoryData:
    from distkd.data.silhouettes import load_silhouettes

    return load_silhouettes()


@DATASETS.register("silhouette_pairs")
def _silhouette_pairs(cfg: DataConfig, seed: int) -> InMemoryData:
    from distkd.data.silhouette_pairs import load_silhouette_pairs

    unknown = set(cfg.kwargs) - {"train", "val", "test", "seed", "size"}
    if unknown:
        raise ConfigError(f"data.kwargs {', '.join(sorted(unknown))} not read by dataset 'silhouette_pairs' (it "
                          "reads train, val, test (images per class), seed, size); remove them")
    if cfg.flip:
        raise ConfigError("data.flip mirrors left and right, which changes a silhouette pair's class; "
                          "set data.flip=false for dataset 'silhouette_pairs'")
    return load_silhouette_pairs(**cfg.kwargs)


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig, seed: int) -> InMemoryData:
    from distkd.data.cifar import load_cifar

    return load_cifar(cfg.name, cfg.root, download=cfg.download, val_size=cfg.val_size, seed=seed)


DATASETS.register("cifar100")(_cifar10)


@DATASETS.register("imagefolder")
def _imagefolder(cfg: DataConfig, seed: int):  # noqa: ANN202 - FileData
    from distkd.data.imagefolder import load_imagefolder

    defaults = DataConfig()
    if not cfg.in_memory and (cfg.crop_padding, cfg.flip) != (defaults.crop_padding, defaults.flip):
        raise ConfigError("data.crop_padding and data.flip augment in-memory images; image folders read from files "
                          "augment as data.preset says: remove them, or set data.in_memory=true")
    if cfg.in_memory and cfg.preset.lower() != "b1":
        raise ConfigError(f"data.in_memory augments with a random crop and flip on the device, not preset "
                          f"{cfg.preset}'s pipeline; use data.preset=b1, or data.in_memory=false")
    files = load_imagefolder(cfg.root, preset=cfg.preset, image_size=cfg.image_size, val_size=cfg.val_size,
                             seed=seed, skip_unreadable=cfg.skip_unreadable)
    if not cfg.in_memory:
        return files
    from distkd.data.imagefolder_memory import to_memory

    return to_memory(files, data_workers(cfg))


IN_MEMORY = {"crop_padding", "flip"}
USES = {"silhouettes": IN_MEMORY, "silhouette_pairs": IN_MEMORY | {"kwargs"},
        "cifar10": IN_MEMORY | {"root", "download", "val_size"},
        "cifar100": IN_MEMORY | {"root", "download", "val_size"},
        "imagefolder": {"root", "val_size", "preset", "image_size", "num_workers", "skip_unreadable", "in_memory",
                        *IN_MEMORY}}


def load_dataset(cfg: DataConfig, seed: int):  # noqa: ANN201 - InMemoryData or FileData
    """The dataset ``cfg.name`` names, with its train/val/test splits; options it would ignore are an error."""
    reader = DATASETS.get(cfg.name)
    check_data_options(cfg, USES.get(cfg.name.lower(), DATASET_OPTIONS))
    return reader(cfg, seed)


def build_loaders(cfg: RunConfig, data, device: torch.device) -> tuple[Loader, Loader, Loader | None]:  # noqa: ANN001
    """Train/val/test loaders: on-device tensors for in-memory data, worker processes for image files.

    Under DDP the training split is sharded by the loader (a shared seeded order, padded or trimmed to
    divide evenly); val/test are cut into unpadded strided shards ``split[rank::world_size]`` instead, so
    the metrics summed over ranks count every sample exactly once.
    """
    channels_last = cfg.train.channels_last
    rank, world = distributed.rank(), distributed.world_size()
    train_batch, eval_batch = process_batches(cfg.data)

    def sharding(train: bool) -> dict[str, int]:
        return {"rank": rank, "world_size": world, "seed": cfg.seed} if train else {"seed": cfg.seed}

    if isinstance(data, InMemoryData):
        def make(split, train: bool) -> TensorLoader:  # noqa: ANN001
            return TensorLoader(
                split, batch_size=train_batch if train else eval_batch,
                mean=data.mean, std=data.std, device=device, shuffle=train, drop_last=train,
                augment=CropFlip(cfg.data.crop_padding, cfg.data.flip) if train else None,
                channels_last=channels_last, **sharding(train),
            )
    else:
        from distkd.data.imagefolder import FileLoader

        def make(split, train: bool) -> FileLoader:  # noqa: ANN001
            return FileLoader(
                split, batch_size=train_batch if train else eval_batch, shuffle=train,
                drop_last=train, num_workers=data_workers(cfg.data), num_classes=data.num_classes,
                mixup=data.preset.mixup if train else None, device=device, channels_last=channels_last,
                **sharding(train),
            )
    test = make(eval_shard(data.test), False) if data.test is not None else None
    return make(data.train, True), make(eval_shard(data.val), False), test


def build(cfg: RunConfig, device: torch.device) -> TrainSetup:
    """Everything the trainer needs for a classification run described by ``cfg``."""
    data = load_dataset(cfg.data, cfg.seed)
    train, val, test = build_loaders(cfg, data, device)
    student = build_model(cfg.model, data.num_classes, "student")
    teacher, terms = build_teacher_and_terms(cfg, data.num_classes)
    step = SingleInputStep(cross_entropy(cfg.loss), teacher_input=_teacher_input(data, teacher))
    distiller = Distiller(student, teacher, terms, step)
    check_input(student, val, "model")
    if cfg.teacher_cache.views > 0:
        train = _cached(cfg, distiller, train, device)
    return TrainSetup(distiller, train, val, test, evaluate, metric="top1", meta=metadata(data),
                      test_is_val=data.test_is_val)


def cross_entropy(cfg: LossConfig) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """The task loss: ``{"ce": ce_weight * CE(logits (B, K), target (B,) or soft (B, K), label_smoothing)}``, or
    nothing when ``ce_weight`` is 0."""
    smoothing, weight = cfg.label_smoothing, cfg.ce_weight

    def task_loss(output: Tensor, target: Tensor) -> dict[str, Tensor]:
        if weight == 0:
            return {}
        return {"ce": weight * F.cross_entropy(logits_of(output).float(), target, label_smoothing=smoothing)}

    return task_loss


def metadata(data) -> dict:  # noqa: ANN001 - InMemoryData or FileData
    """What a checkpoint of a model trained on ``data`` stores for deployment: class names (label order) and the
    evaluation preprocessing (:class:`~distkd.data.preprocess.Preprocess` as a dict)."""
    classes = data.classes or tuple(str(i) for i in range(data.num_classes))
    return {"task": "classification", "classes": list(classes), "preprocess": data.preprocess.to_dict()}


def _cached(cfg: RunConfig, distiller: Distiller, train: Loader, device: torch.device) -> Loader:
    """Replace the training loader by one replaying cached teacher logits (built here when missing)."""
    if distiller.teacher is None:
        raise ConfigError("teacher_cache.views > 0 needs a teacher; set teacher_cache.views=0 to train without")
    if any(t.teacher != "logits" for t in cfg.loss.distill):
        raise ConfigError("teacher_cache stores logits only; every loss.distill term needs teacher: logits")
    teacher_fn = _teacher_fn(cfg, distiller, device)
    directory = teacher_cache_dir(cfg)
    record = {
        "teacher": cfg.teacher.name, "teacher_kwargs": cfg.teacher.kwargs,
        "teacher_sha256": weights_sha256(cfg.teacher.checkpoint), "dataset": cfg.data.name, "amp": cfg.train.amp,
        "views": cfg.teacher_cache.views, "seed": cfg.teacher_cache.seed,
    }
    if isinstance(train, TensorLoader):
        return _cached_in_memory(cfg, train, record, teacher_fn, directory)
    return _cached_files(cfg, train, record, teacher_fn, directory)


def _teacher_fn(cfg: RunConfig, distiller: Distiller, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The frozen teacher as the cache runs it: (B, C, H, W) normalised student inputs -> logits (B, K)."""
    teacher = distiller.teacher_for_eval().to(device)
    if cfg.train.channels_last:
        teacher.to(memory_format=torch.channels_last)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)

    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    @torch.no_grad()
    def teacher_fn(x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return logits_of(teacher(x.to(device).contiguous(memory_format=memory_format)))

    return teacher_fn


def _cached_in_memory(cfg: RunConfig, train: TensorLoader, record: dict, teacher_fn: Callable[[Tensor], Tensor],
                      directory: Path) -> CachedViewLoader:
    if train.augment is None:
        raise ConfigError("teacher_cache replays augmented views; this training split has no augmentation")
    record = record | {
        "data_blake2b": dataset_digest(train.images, train.labels),
        "augment": {"padding": train.augment.padding, "flip": train.augment.flip},
        "normalise": {"mean": list(train.mean), "std": list(train.std)},
    }
    # under DDP rank 0 builds the cache (on a file system all ranks see); the others then open it
    cache = distributed.main_first(
        lambda: TeacherCache.open_or_build(directory, record, teacher_fn, train, cfg.data.eval_batch_size))
    return CachedViewLoader(train, cache)


def _cached_files(cfg: RunConfig, train: Loader, record: dict, teacher_fn: Callable[[Tensor], Tensor],
                  directory: Path) -> CachedFileLoader:
    """Image folders: every process builds its shards of the cache (resumable), then all replay it."""
    from distkd.data.imagefolder import FileLoader

    if not isinstance(train, FileLoader):
        raise ConfigError(f"teacher_cache does not support the '{cfg.data.name}' dataset's loader")
    if train.collate is not default_collate:
        raise ConfigError(f"teacher_cache cannot store mixup/cutmix views (preset {cfg.data.preset}): they depend on "
                          "the batch; use preset b1 or b2, or teacher_cache.views=0")
    subset = train.dataset
    record = record | {
        "data_listing_blake2b": subset.listing_digest(), "count": len(subset), "classes": len(subset.folder.classes),
        "pipeline": {"preset": cfg.data.preset, "image_size": cfg.data.image_size, "transform": repr(subset.transform)},
        "shard_samples": SHARD_SAMPLES,
    }
    views = SeededViews(subset, cfg.teacher_cache.views, cfg.teacher_cache.seed)
    cache = distributed.main_first(lambda: FileTeacherCache.prepare(directory, record) if distributed.is_main()
                                   else FileTeacherCache(directory, record))
    cache.build(teacher_fn, views, cfg.data.eval_batch_size, data_workers(cfg.data), distributed.rank(),
                distributed.world_size())
    distributed.barrier()  # every rank's shards are on disk
    if missing := cache.missing():
        raise DataError(f"teacher cache in {directory}: {len(missing)} shard(s) missing after the build (first: "
                        f"{cache.shard_path(missing[0]).name}); is teacher_cache.dir on a file system every process "
                        "sees?")
    return CachedFileLoader(train, cache, views)



def _teacher_input(data, teacher: nn.Module | None) -> Renormalize | None:  # noqa: ANN001
    """Re-normalise the student's input for a teacher that expects other mean/std (as timm's distillation)."""
    if teacher is None:
        return None
    stats = input_stats(teacher)
    if stats is None or (tuple(stats[0]), tuple(stats[1])) == (tuple(data.mean), tuple(data.std)):
        return None
    return Renormalize(data.mean, data.std, *stats)



@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader) -> dict[str, float]:
    """Top-1, top-5 (in %, over all processes) and mean CE of ``model`` on ``loader`` (hard labels)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        y = batch.target
        logits = logits_of(model(batch.inputs)).float()
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = topk == y[:, None]
        totals += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(),
                                F.cross_entropy(logits, y, reduction="sum").item(), len(y)], dtype=torch.float64)
    model.train(was_training)
    top1, top5, loss, count = distributed.sum_tensor(totals).tolist()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count}


@torch.no_grad()
def confusion_matrix(model: nn.Module, loader: Loader, num_classes: int) -> Tensor:
    """int64 (K, K) counts over all processes: row = true class, column = predicted (top-1) class."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in loader:
        predicted = logits_of(model(batch.inputs)).argmax(dim=1)
        counts += torch.bincount((batch.target * num_classes + predicted).cpu(), minlength=num_classes ** 2)
    model.train(was_training)
    return distributed.sum_tensor(counts).view(num_classes, num_classes)

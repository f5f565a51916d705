"""Semantic segmentation: scenes / Cityscapes / VOC, dense students and teachers, CE + aux CE, mIoU.

Models return ``{"out": (N, K, h, w), "aux": (N, K, h, w)}`` at the head's resolution (H/8 for the dilated
nets). Distillation terms compare those logits before upsampling, every pixel an instance, as the DIST
authors do (``student: logits`` is ``out``, ``student: aux`` the auxiliary head). The task losses upsample:
``ce = CE(out)`` and ``aux_ce = loss.aux_weight * CE(aux)`` (both times ``loss.ce_weight``, logged apart),
label 255 ignored. ``loss.mask_ignore`` also keeps ignore-label pixels out of the distillation terms (the
authors did not). Logits are upsampled bilinearly with ``align_corners=True``, in the loss and in evaluation,
as the authors' code (CIRKD's ``SegCrossEntropyLoss`` and ``eval.py``). Evaluation is single-scale by default
(the authors' reported protocol); ``evaluate(..., scales, flip)`` averages the upsampled logits over rescaled
(and mirrored) copies of each image, as CIRKD's ``eval.py --scales ... --flip-eval``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from distkd.config import DataConfig, RunConfig
from distkd.data.augment import CropFlip
from distkd.data.base import InMemoryData
from distkd.data.loaders import IGNORE_INDEX, TensorLoader
from distkd.distill import Distiller, SingleInputStep
from distkd.engine import distributed
from distkd.engine.trainer import Loader, TrainSetup
from distkd.errors import ConfigError
from distkd.metrics.segmentation import ConfusionMatrix
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
)

DATASETS: Registry[object] = Registry("segmentation dataset")
ALIGN_CORNERS = True  # logits -> label resolution, as the authors' loss and evaluation


@dataclass(frozen=True)
class FileSegData:
    """Image-file datasets: ``test`` is None (Cityscapes' and VOC's test labels are not public)."""

    train: Dataset
    val: Dataset
    test: None
    num_classes: int


@DATASETS.register("scenes")
def _scenes(cfg: DataConfig, seed: int) -> InMemoryData:
    from distkd.data.scenes import load_scenes

    return load_scenes(**cfg.kwargs)


@DATASETS.register("cityscapes")
def _cityscapes(cfg: DataConfig, seed: int) -> FileSegData:
    return _files(cfg, seed)


DATASETS.register("voc")(_cityscapes)


def _files(cfg: DataConfig, seed: int) -> FileSegData:
    from distkd.data import segmentation as seg

    reader = seg.cityscapes if cfg.name == "cityscapes" else seg.voc
    default_crop = seg.CITYSCAPES_CROP if cfg.name == "cityscapes" else seg.VOC_CROP
    unknown = set(cfg.kwargs) - {"crop_size", "normalise"}
    if unknown:
        raise ConfigError(f"data.kwargs {', '.join(sorted(unknown))} not read by dataset '{cfg.name}' (it reads "
                          "crop_size, normalise); remove them")
    crop = tuple(cfg.kwargs.get("crop_size", default_crop))
    name = cfg.kwargs.get("normalise", "imagenet")
    if name not in seg.NORMALISATIONS:
        raise ConfigError(f"data.kwargs.normalise must be one of {', '.join(seg.NORMALISATIONS)}, got {name!r}")
    norm = seg.NORMALISATIONS[name]
    train = reader(cfg.root, "train", seg.TrainTransform(crop, norm=norm), seed=seed)
    return FileSegData(train, reader(cfg.root, "val", seg.EvalTransform(norm), seed=seed), None, train.num_classes)


USES = {"scenes": {"kwargs", "crop_padding", "flip"}, "cityscapes": {"root", "kwargs", "num_workers"},
        "voc": {"root", "kwargs", "num_workers"}}


def load_dataset(cfg: DataConfig, seed: int) -> InMemoryData | FileSegData:
    """The dataset ``cfg.name`` names; ``cfg.kwargs`` go to its reader (e.g. scene counts, crop size); options it
    would ignore are an error."""
    reader = DATASETS.get(cfg.name)
    check_data_options(cfg, USES.get(cfg.name.lower(), DATASET_OPTIONS))
    return reader(cfg, seed)


def build_loaders(cfg: RunConfig, data: InMemoryData | FileSegData,
                  device: torch.device) -> tuple[Loader, Loader, Loader | None]:
    """Train/val/test loaders; file datasets evaluate one full image per batch.

    Under DDP the training loader shards itself; val/test take unpadded shards (:func:`eval_shard`).
    """
    common = {"seed": cfg.seed, "device": device, "channels_last": cfg.train.channels_last}
    sharded = {"rank": distributed.rank(), "world_size": distributed.world_size()}
    train_batch, eval_batch = process_batches(cfg.data)
    if isinstance(data, InMemoryData):
        def make(split, train: bool) -> TensorLoader:  # noqa: ANN001
            return TensorLoader(
                split, batch_size=train_batch if train else eval_batch, mean=data.mean,
                std=data.std, shuffle=train, drop_last=train,
                augment=CropFlip(cfg.data.crop_padding, cfg.data.flip) if train else None,
                **common, **(sharded if train else {}),
            )

        test = make(eval_shard(data.test), False) if data.test is not None else None
        return make(data.train, True), make(eval_shard(data.val), False), test
    from distkd.data.imagefolder import FileLoader

    train = FileLoader(data.train, batch_size=train_batch, shuffle=True, drop_last=True,
                       num_workers=data_workers(cfg.data), **common, **sharded)
    val = FileLoader(eval_shard(data.val), batch_size=1, shuffle=False, drop_last=False,
                     num_workers=data_workers(cfg.data), **common)
    return train, val, None


def build(cfg: RunConfig, device: torch.device) -> TrainSetup:
    """Everything the trainer needs for a segmentation run described by ``cfg``."""
    data = load_dataset(cfg.data, cfg.seed)
    train, val, test = build_loaders(cfg, data, device)
    student = build_model(cfg.model, data.num_classes, "model")
    teacher, terms = build_teacher_and_terms(cfg, data.num_classes)
    weight, aux_weight = cfg.loss.ce_weight, cfg.loss.ce_weight * cfg.loss.aux_weight

    def task_loss(output: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        losses = {"ce": weight * _upsampled_ce(output["out"], target)} if weight > 0 else {}
        if "aux" in output and aux_weight > 0:
            losses["aux_ce"] = aux_weight * _upsampled_ce(output["aux"], target)
        return losses

    step = SingleInputStep(task_loss, context_fn=ignore_mask if cfg.loss.mask_ignore else None)
    distiller = Distiller(student, teacher, terms, step)
    check_input(student, val, "model")
    return TrainSetup(distiller, train, val, test, evaluate, metric="miou")


def check_scales(scales: Sequence[float]) -> None:
    """Evaluation scales must be a non-empty list of positive numbers."""
    if not scales or any(not s > 0 for s in scales):
        raise ConfigError(f"evaluation scales must be positive numbers (e.g. 0.5 0.75 1.0 1.25 1.5 1.75), got "
                          f"{list(scales)}")


def predict(model: nn.Module, x: Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,),
            flip: bool = False) -> Tensor:
    """Logits float (N, K, H, W) at ``size`` = (H, W) for inputs x (N, C, h, w): for each scale, ``x`` resized
    bilinearly (``align_corners=True``), the model's ``out`` upsampled to ``size``; with ``flip`` averaged with
    the prediction of the mirrored input, mirrored back; then averaged over the scales."""
    check_scales(scales)
    weight = 1.0 / (len(scales) * (2 if flip else 1))

    def views() -> Iterator[Tensor]:
        for scale in scales:
            xs = x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
            for mirrored in (False, True) if flip else (False,):
                out = model(xs.flip(-1) if mirrored else xs)["out"].float()
                up = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=ALIGN_CORNERS)
                yield weight * (up.flip(-1) if mirrored else up)

    parts = views()
    total = next(parts)
    for part in parts:  # summed one view at a time: full-size logits are large
        total += part
    return total


def _upsampled_ce(logits: Tensor, target: Tensor) -> Tensor:
    """CE of logits (N, K, h, w) bilinearly upsampled to the labels (N, H, W), label 255 ignored."""
    up = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=ALIGN_CORNERS)
    return F.cross_entropy(up, target, ignore_index=IGNORE_INDEX)


def ignore_mask(output: dict[str, Tensor], target: Tensor) -> dict[str, Tensor]:
    """``{"mask": (N, h, w) bool}``: False where the nearest label at the logits' resolution is 255."""
    size = output["out"].shape[-2:]
    nearest_labels = F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0]
    return {"mask": nearest_labels != IGNORE_INDEX}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, scales: Sequence[float] = (1.0,),
             flip: bool = False) -> dict[str, float]:
    """mIoU and pixel accuracy (in %, over all processes) of ``model`` on full-size labels.

    ``scales``/``flip``: the prediction is the mean over the scales (and, with ``flip``, over each scaled
    image and its mirror, mirrored back) of the logits upsampled to the labels (:func:`predict`).
    """
    check_scales(scales)  # before any forward
    was_training = model.training
    model.eval()
    matrix: ConfusionMatrix | None = None
    for batch in loader:
        y = batch.target
        up = predict(model, batch.inputs, y.shape[-2:], scales, flip)
        if matrix is None:
            matrix = ConfusionMatrix(up.shape[1])
        matrix.update(up.argmax(1), y)
    model.train(was_training)
    matrix.all_reduce()
    return {"miou": 100 * matrix.miou(), "pixel_acc": 100 * matrix.pixel_accuracy()}

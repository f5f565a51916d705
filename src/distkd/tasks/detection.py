"""Object detection: COCO-format data (or the embedded silhouette scenes), torchvision detectors, COCO mAP.

The step runs the student's own ``GeneralizedRCNNTransform`` once (resize, normalise, pad) and feeds the
teacher that same batch (re-normalised when their mean/std differ): the teacher never runs its own transform,
RPN, NMS or post-processing in training. The student's task losses are torchvision's (each weighted by
``loss.ce_weight``, default 1, and logged by its torchvision name).

What the distillation terms compare, as the DIST authors (hunto/MasKD's mmrazor configs):

- RetinaNet / FCOS (dense heads): tap ``cls_logits``, the classification head's last conv, called once per
  FPN level, each call ``(N, A*K, H_l, W_l)``: every position of a level is one instance and its A*K
  anchor-class channels its "classes" (DIST with ``activation: sigmoid``), one loss per level, summed.
  Teacher and student must share anchors, FPN strides and K (checked at build, one-line error).
- Faster R-CNN: ``logits`` are the box predictor's class logits ``(R, K + 1)`` of the student's sampled RoIs;
  the teacher's box head runs on *those same RoIs*, pooled from the teacher's own FPN features (its RPN and
  sampling are not used), so both score the same boxes.
- ``fpn``: the FPN's output levels (an ordered dict), e.g. for the ``mimic`` loss.

``loss.mask_padding`` keeps the positions that only see the batch's padding out of the per-level terms (the
authors did not mask them).

Under torchrun each process trains on its share of every batch; the step calls the detector's parts, which
DDP's forward would not see, so the trainer averages the student's gradients itself (``TrainSetup.ddp`` False).
RetinaNet/FCOS terms on ``cls_logits`` can replay a teacher-output cache (``teacher_cache.views``: 2 orientations
with ``data.flip``, :mod:`distkd.distill.detection_cache`); Faster R-CNN's cannot (its teacher logits depend on the
student's RoIs).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.roi_heads import fastrcnn_loss

from distkd.config import DataConfig, RunConfig
from distkd.data.batch import Batch
from distkd.data.coco import CocoDetection, DetectionLoader, coco_split
from distkd.distill import Distiller
from distkd.distill.detection_cache import TAP as CACHE_TAP
from distkd.distill.detection_cache import CachedDetectionLoader, DetectionTeacherCache
from distkd.distill.distiller import LOGITS
from distkd.engine import distributed
from distkd.engine.trainer import Loader, TrainSetup
from distkd.errors import ConfigError
from distkd.metrics.detection import coco_map
from distkd.models.detection import label_offset
from distkd.models.weights import weights_sha256
from distkd.registry import Registry
from distkd.tasks.common import (
    build_model,
    build_teacher_and_terms,
    check_data_options,
    data_workers,
    process_batches,
    teacher_cache_dir,
)

DATASETS: Registry[object] = Registry("detection dataset")


@dataclass(frozen=True)
class DetectionData:
    """COCO-format splits (``test`` None when there is none) and the number of object classes K."""

    train: CocoDetection
    val: CocoDetection
    test: CocoDetection | None
    num_classes: int

    @property
    def classes(self) -> list[str]:
        """The class names in label order (the training split's categories)."""
        return self.train.class_names


COCO_SPLITS = {"train": "train2017", "val": "val2017", "test": None}


@DATASETS.register("coco")
def _coco(cfg: DataConfig, seed: int) -> DetectionData:
    unknown = set(cfg.kwargs) - set(COCO_SPLITS)
    if unknown:
        raise ConfigError(f"data.kwargs {', '.join(sorted(unknown))} not read by dataset 'coco' (it reads the split "
                          f"folder names {', '.join(COCO_SPLITS)}); remove them")
    names = COCO_SPLITS | cfg.kwargs
    splits = [coco_split(cfg.root, names[s]) if names[s] else None for s in ("train", "val", "test")]
    return _checked(*splits)


@DATASETS.register("scenes")
def _scenes(cfg: DataConfig, seed: int) -> DetectionData:
    from distkd.data.detection_scenes import make_detection_scenes

    try:
        root = make_detection_scenes(**cfg.kwargs)
    except TypeError as err:
        raise ConfigError(f"data.kwargs of dataset 'scenes' (train, val, test, seed, size, folder): {err}") from None
    has_test = cfg.kwargs.get("test", 1) > 0
    return _checked(coco_split(root, "train"), coco_split(root, "val"), coco_split(root, "test") if has_test else None)


def _checked(train: CocoDetection, val: CocoDetection, test: CocoDetection | None) -> DetectionData:
    for name, split in (("val", val), ("test", test)):
        if split is not None and split.category_ids != train.category_ids:
            raise ConfigError(f"the {name} split's categories differ from train's; use one category list")
    dropped = {name: split.dropped_boxes for name, split in (("train", train), ("val", val), ("test", test))
               if split is not None and split.dropped_boxes}
    if dropped and distributed.is_main():
        counts = ", ".join(f"{n} in {name}" for name, n in dropped.items())
        print(f"note: dropped boxes with no area inside their image: {counts}", file=sys.stderr, flush=True)
    return DetectionData(train, val, test, train.num_classes)


USES = {"coco": {"root", "kwargs", "num_workers", "flip"}, "scenes": {"kwargs", "num_workers", "flip"}}


def load_dataset(cfg: DataConfig, seed: int) -> DetectionData:
    """The COCO-format dataset ``cfg.name`` names (``coco``: ``data.root``; ``scenes``: generated)."""
    reader = DATASETS.get(cfg.name)
    check_data_options(cfg, USES[cfg.name.lower()])
    return reader(cfg, seed)


def build_loaders(cfg: RunConfig, data: DetectionData, device: torch.device) -> tuple[Loader, Loader, Loader | None]:
    """Train (shuffled, flipped if ``data.flip``) and val/test loaders of image lists."""
    train_batch, eval_batch = process_batches(cfg.data)
    common = {"seed": cfg.seed, "device": device, "num_workers": data_workers(cfg.data),
              "rank": distributed.rank(), "world_size": distributed.world_size()}

    def make(split: CocoDetection, train: bool) -> DetectionLoader:
        return DetectionLoader(split, batch_size=train_batch if train else eval_batch, shuffle=train,
                               drop_last=train, flip=cfg.data.flip and train, **common)

    return make(data.train, True), make(data.val, False), make(data.test, False) if data.test is not None else None


# ------------------------------------------------------------------------------------------------ the step


def is_dense(model: nn.Module) -> bool:
    """RetinaNet / FCOS (one classification conv per FPN level) rather than a two-stage Faster R-CNN."""
    return not isinstance(model, FasterRCNN)


class DetectionStep(nn.Module):
    """How a detector student and teacher are called (see the module docstring); ``loss_weight`` scales every
    task loss of the student. ``mask_padding``: the terms' context holds ``mask`` bool (N, H_pad, W_pad), False
    on the padding the transform added to batch the images (the Distiller resamples it to each FPN level)."""

    def __init__(self, loss_weight: float = 1.0, mask_padding: bool = False) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.mask_padding = mask_padding

    def student(self, model: nn.Module, batch: Batch) -> tuple[dict[str, Any], dict[str, Tensor]]:
        offset = label_offset(model)
        targets = [{"boxes": t["boxes"], "labels": t["labels"] + offset} for t in batch.target]
        images, targets = model.transform(batch.inputs, targets)
        features = model.backbone(images.tensors)
        output: dict[str, Any] = {"images": images}
        if is_dense(model):
            levels = list(features.values())
            head = model.head(levels)
            anchors = model.anchor_generator(images, levels)
            extra = ([x.shape[2] * x.shape[3] for x in levels],) if isinstance(model, FCOS) else ()
            losses = model.compute_loss(targets, head, anchors, *extra)
        else:
            proposals, losses = model.rpn(images, features, targets)
            heads = model.roi_heads
            proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets)
            class_logits, box_regression = heads.box_predictor(
                heads.box_head(heads.box_roi_pool(features, proposals, images.image_sizes)))
            classifier, box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {**losses, "loss_classifier": classifier, "loss_box_reg": box_reg}
            output |= {"out": class_logits, "proposals": proposals}
        return output, {k: self.loss_weight * v for k, v in losses.items()}

    def teacher(self, model: nn.Module, batch: Batch, student_output: dict[str, Any]) -> dict[str, Any]:
        images = student_output["images"]
        features = model.backbone(self._renormalised(images.tensors, model))
        if is_dense(model):
            return {"head": model.head(list(features.values()))}
        heads = model.roi_heads
        pooled = heads.box_roi_pool(features, student_output["proposals"], images.image_sizes)
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
        return {"out": class_logits}

    def context(self, batch: Batch, student_output: dict[str, Any]) -> dict[str, Any]:
        if not self.mask_padding:
            return {}
        images = student_output["images"]
        n, _, height, width = images.tensors.shape
        mask = torch.zeros((n, height, width), dtype=torch.bool, device=images.tensors.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = True
        return {"mask": mask}

    def bind(self, student: nn.Module) -> DetectionStep:
        """Remember the student's normalisation (the teacher's input is re-normalised from it)."""
        self.student_norm = (list(student.transform.image_mean), list(student.transform.image_std))
        return self

    def _renormalised(self, x: Tensor, teacher: nn.Module) -> Tensor:
        """The student-normalised batch x (N, 3, H, W) as the teacher's normalisation would give it."""
        mean_s, std_s = self.student_norm
        mean_t, std_t = list(teacher.transform.image_mean), list(teacher.transform.image_std)
        if (mean_s, std_s) == (mean_t, std_t):
            return x

        def column(v: list[float]) -> Tensor:
            return x.new_tensor(v)[:, None, None]

        return (x * column(std_s) + column(mean_s) - column(mean_t)) / column(std_t)


# ------------------------------------------------------------------------------------------------ checks


def _strides(model: nn.Module, size: int = 128) -> list[int]:
    """The FPN levels' strides, measured on a blank ``size`` px image."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
        shapes = [f.shape[-1] for f in model.backbone(x).values()]
    model.train(was_training)
    return [round(size / s) for s in shapes]


def describe(model: nn.Module) -> dict[str, Any]:
    """What a teacher and a student must share to be compared: family, classes, anchors, FPN strides."""
    anchors = model.anchor_generator if is_dense(model) else model.rpn.anchor_generator
    classes = (model.head.classification_head.num_classes if is_dense(model)
               else model.roi_heads.box_predictor.cls_score.out_features)
    return {"family": type(model).__name__, "classes": classes, "anchor sizes": [list(s) for s in anchors.sizes],
            "anchor ratios": [list(r) for r in anchors.aspect_ratios], "FPN strides": _strides(model)}


def check_pair(student: nn.Module, teacher: nn.Module) -> None:
    """Teacher and student must be of one family (dense or two-stage) with the same classes, anchors and FPN
    strides (a two-stage pair: the same classes), else a one-line error naming both configurations."""
    s, t = describe(student), describe(teacher)
    keys = ["family", "classes"] if not is_dense(student) and not is_dense(teacher) else list(s)
    if is_dense(student) != is_dense(teacher) or any(s[k] != t[k] for k in keys):
        def text(d: dict[str, Any]) -> str:
            return ", ".join(f"{k} {d[k]}" for k in keys)

        raise ConfigError(f"teacher and student detectors differ: student {text(s)}; teacher {text(t)}; "
                          "per-level distillation needs the same family, classes, anchors and FPN levels")


def check_terms(cfg: RunConfig, student: nn.Module) -> None:
    """RetinaNet/FCOS logits are per FPN level: a term on ``logits`` there is refused, naming the tap to use."""
    if not is_dense(student):
        return
    for t in cfg.loss.distill:
        if LOGITS in (t.student, t.teacher):
            raise ConfigError(f"{type(student).__name__} has one classification output per FPN level, not 'logits'; "
                              "use student: cls_logits, teacher: cls_logits (one loss per level)")


def build(cfg: RunConfig, device: torch.device) -> TrainSetup:
    """Everything the trainer needs for a detection run described by ``cfg``."""
    if cfg.train.compile:
        raise ConfigError("train.compile is not supported for detection (the step calls the detector's parts); "
                          "set train.compile=false")
    data = load_dataset(cfg.data, cfg.seed)
    train, val, test = build_loaders(cfg, data, device)
    student = build_model(cfg.model, data.num_classes, "model")
    check_terms(cfg, student)
    if cfg.loss.mask_padding and not is_dense(student):
        raise ConfigError("loss.mask_padding masks positions of per-level outputs (RetinaNet, FCOS); Faster R-CNN's "
                          "terms compare RoIs, which lie inside the images; remove it")
    teacher, terms = build_teacher_and_terms(cfg, data.num_classes)
    if teacher is not None:
        check_pair(student, teacher)
    step = DetectionStep(cfg.loss.ce_weight, cfg.loss.mask_padding).bind(student)
    distiller = Distiller(student, teacher, terms, step)
    if cfg.teacher_cache.views:
        train = _cached(cfg, distiller, data, device, train)
    return TrainSetup(distiller, train, val, test, evaluate, metric="map", meta=metadata(data), ddp=False)


def metadata(data: DetectionData) -> dict[str, Any]:
    """What a checkpoint of a detector trained on ``data`` stores for deployment (export, predict): the class names
    in label order and their COCO category ids."""
    return {"task": "detection", "classes": list(data.classes), "category_ids": list(data.train.category_ids)}


def _cached(cfg: RunConfig, distiller: Distiller, data: DetectionData, device: torch.device,
            train: DetectionLoader) -> CachedDetectionLoader:
    """The training loader replaying the teacher's cached per-level outputs (built here when missing)."""
    views = cfg.teacher_cache.views
    if distiller.teacher is None:
        raise ConfigError("teacher_cache.views > 0 needs a teacher; set teacher_cache.views=0 to train without")
    if not is_dense(distiller.student):
        raise ConfigError("Faster R-CNN's teacher logits depend on the student's sampled RoIs, so they cannot be "
                          "cached; set teacher_cache.views=0")
    if any(t.student != CACHE_TAP or t.teacher != CACHE_TAP for t in cfg.loss.distill):
        raise ConfigError(f"the detection teacher cache stores {CACHE_TAP} only; every loss.distill term needs "
                          f"student: {CACHE_TAP}, teacher: {CACHE_TAP} (or set teacher_cache.views=0)")
    if views != (2 if cfg.data.flip else 1):
        raise ConfigError(f"teacher_cache.views for detection counts the cached orientations: 2 with data.flip (as "
                          f"is and mirrored, every view there is), 1 without; got {views}")
    if distributed.world_size() > 1:
        raise ConfigError("the detection teacher cache is built in one process; run without torchrun or set "
                          "teacher_cache.views=0")
    distiller.to(device)  # the teacher runs here, before the trainer moves the rest
    transform, batch_size = distiller.student.transform, process_batches(cfg.data)[0]
    record = {"teacher": cfg.teacher.name, "teacher_kwargs": cfg.teacher.kwargs,
              "teacher_sha256": weights_sha256(cfg.teacher.checkpoint), "data": cfg.data.name,
              "data_kwargs": cfg.data.kwargs, "data_root": cfg.data.root, "images": len(data.train),
              "orientations": views, "batch_size": batch_size,
              "min_size": list(transform.min_size), "max_size": transform.max_size,
              "image_mean": list(transform.image_mean), "image_std": list(transform.image_std)}

    def teacher_levels(images: list[Tensor]) -> list[Tensor]:
        transformed, _ = transform([x.to(device) for x in images])
        height, width = transformed.tensors.shape[-2:]
        if any(size != (height, width) for size in transformed.image_sizes):
            raise ConfigError("the detection teacher cache needs every training image to transform to one size "
                              f"without padding (got {sorted(set(transformed.image_sizes))} in a {height}x{width} "
                              "batch): use images of one size and one model.kwargs.min_size, or teacher_cache.views=0")
        with distiller.teacher_taps.recording() as outputs:
            distiller.run_teacher(Batch(images, None), {"images": transformed})
            levels = list(outputs[CACHE_TAP])
        distiller.teacher_taps.clear()
        return levels

    directory = teacher_cache_dir(cfg)
    order = DetectionLoader(data.train, batch_size=batch_size, shuffle=False, drop_last=False, seed=cfg.seed,
                            device=device)
    cache = DetectionTeacherCache.open_or_build(directory, record, teacher_levels, order)
    return CachedDetectionLoader(train, cache)


@torch.no_grad()
def predict(model: nn.Module, loader: DetectionLoader) -> tuple[list[dict[str, Any]], list[int]]:
    """This process's COCO-style detections of ``loader``'s images and the image ids it evaluated."""
    dataset = loader.dataset
    offset = label_offset(model)
    detections, image_ids = [], []
    for batch in loader:
        for out, i in zip(model(batch.inputs), batch.index.tolist(), strict=True):
            image_id = dataset.image_ids[i]
            image_ids.append(image_id)
            boxes = out["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True):
                detections.append({"image_id": image_id, "category_id": dataset.category_ids[label - offset],
                                   "bbox": box, "score": score})
    return detections, image_ids


@torch.no_grad()
def evaluate(model: nn.Module, loader: DetectionLoader) -> dict[str, float]:
    """COCO box mAP in % (``map``, ``map50``, ``map75``, by size) of ``model`` on ``loader``'s split; detections
    are gathered from every process and each image is evaluated once."""
    was_training = model.training
    model.eval()
    try:
        found = distributed.gather_objects(predict(model, loader))
    finally:
        model.train(was_training)
    seen: set[int] = set()
    detections = []
    for rank_detections, rank_ids in found:  # a padded shard repeats images: keep each image's first copy
        new = set(rank_ids) - seen
        detections += [d for d in rank_detections if d["image_id"] in new]
        seen |= new
    return coco_map(loader.dataset.gt, detections, sorted(seen))

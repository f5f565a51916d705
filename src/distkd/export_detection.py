"""Export and prediction for detection students: the detector alone, with its own resize, normalisation and
post-processing (score threshold, NMS, detections per image) inside.

A detector's input is one RGB image, float ``(3, H, W)`` in [0, 1], of any size; its output is the detections in
that image's pixels: ``boxes`` float (D, 4) as x1, y1, x2, y2, ``scores`` float (D,) and ``labels`` int64 (D,), a
label being the class index plus the model's ``label_offset`` (1 for Faster R-CNN, whose class 0 is background).
Formats: ``state_dict`` and ``safetensors``. Not ONNX: ``torch.export`` (the dynamo exporter) cannot follow NMS's
data-dependent shapes, and the TorchScript-based exporter (opset 17, height and width dynamic) bakes size-dependent
constants into the graph here: for an image of another size than the traced one, its boxes were up to 41 px off
(torch 2.14.1, torchvision 0.29.1). Not TorchScript: tracing cannot follow the list inputs and post-processing.
Every written file is read back, its tensors compared one by one with the student's and its detections on
``CHECK_SIZES`` seeded images compared with the PyTorch student's, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from distkd.errors import CheckpointError, ConfigError, DataError, ExportError, first_line

CHECK_SIZES = ((96, 96), (80, 120))  # (H, W) of the seeded check images: one square, one not
Detections = dict[str, Tensor]  # "boxes" (D, 4), "scores" (D,), "labels" (D,)


@dataclass
class Detector:
    """A trained detection student in eval mode, on the CPU, and what deploying it needs."""

    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    classes: list[str]
    category_ids: list[int]
    checkpoint: Path
    weights: str  # "best", "last", "best_ema" or "last_ema"
    epoch: int
    step: int

    @property
    def label_offset(self) -> int:
        from distkd.models.detection import label_offset

        return label_offset(self.model)

    def describe(self) -> dict[str, Any]:
        """The sidecar's description of the model (JSON-ready)."""
        transform = self.model.transform
        return {"task": "detection", "model": {"name": self.name, "kwargs": self.kwargs},
                "num_classes": len(self.classes), "classes": self.classes, "category_ids": self.category_ids,
                "label_offset": self.label_offset,
                "input": "one RGB image, float (3, H, W) in [0, 1], any size",
                "output": "boxes (D, 4) x1 y1 x2 y2 in the input's pixels, scores (D,), labels (D,) = class index "
                          "+ label_offset",
                "transform": {"min_size": list(transform.min_size), "max_size": transform.max_size,
                              "mean": list(transform.image_mean), "std": list(transform.image_std)},
                "source": {"checkpoint": str(self.checkpoint), "weights": self.weights, "epoch": self.epoch,
                           "step": self.step}}


def detector_from_state(path: Path, state: dict[str, Any], meta: dict[str, Any], weights: dict[str, Tensor],
                        label: str) -> Detector:
    """The detection student of checkpoint ``path`` (``state`` as loaded) with ``weights``, in eval mode."""
    from distkd.models import create_model
    from distkd.models.weights import load_weights

    config = state["config"]
    kwargs = {k: v for k, v in config["model"]["kwargs"].items() if k != "pretrained_backbone"}
    classes = [str(c) for c in meta["classes"]]
    model = create_model(config["model"]["name"], num_classes=len(classes), **kwargs)
    load_weights(model, weights, origin=f"checkpoint '{path}'")
    return Detector(model.eval(), config["model"]["name"], kwargs, classes, [int(c) for c in meta["category_ids"]],
                    path, label, int(state["epoch"]), int(state.get("step", 0)))


def check_images() -> list[Tensor]:
    """The seeded images every export is checked on: float (3, H, W) in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=gen) for h, w in CHECK_SIZES]


@torch.no_grad()
def detect(model: nn.Module, images: list[Tensor]) -> list[Detections]:
    """``model``'s detections of each image (3, H, W), float32 boxes and scores."""
    return [{"boxes": d["boxes"].float(), "scores": d["scores"].float(), "labels": d["labels"].long()}
            for d in model(images)]


def check_format(fmt: str) -> None:
    """A one-line ExportError unless detectors export as ``fmt``."""
    if fmt not in WRITERS:
        raise ExportError(f"detectors export as {' or '.join(WRITERS)}, not {fmt}: torch's exporters cannot yet "
                          "follow their post-processing (NMS) for every image size; use --format safetensors")


def export_detector(student: Detector, fmt: str, path: Path) -> dict[str, Any]:
    """Write ``student`` as ``fmt`` (see :func:`check_format`) to ``path``, read it back and compare its detections;
    return the check record."""
    images = check_images()
    expected = detect(student.model, images)
    written = WRITERS[fmt](student, path, images)
    difference = _difference(expected, written)
    if difference != 0:
        path.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} export of {student.checkpoint} gives detections up to {difference:.3g} away "
                          "from the PyTorch student's (allowed: none); nothing was written")
    return {"inputs": f"{len(images)} seeded uniform [0, 1] images of (H, W) {', '.join(map(str, CHECK_SIZES))}",
            "against": "the PyTorch student in eval mode",
            "detections_compared": sum(len(d["scores"]) for d in expected),
            "max_abs_difference": difference, "tolerance": 0.0, "rule": "exact, and every tensor of the state dict"}


def _difference(expected: list[Detections], got: list[Detections]) -> float:
    """The largest |difference| of boxes and scores (inf when the detections or their labels differ)."""
    worst = 0.0
    for e, g in zip(expected, got, strict=True):
        if e["boxes"].shape != g["boxes"].shape or not torch.equal(e["labels"], g["labels"]):
            return float("inf")
        for key in ("boxes", "scores"):
            if e[key].numel():
                worst = max(worst, float((e[key] - g[key]).abs().max()))
    return worst


def _fresh(student: Detector) -> nn.Module:
    from distkd.models import create_model

    return create_model(student.name, num_classes=len(student.classes), **student.kwargs).eval()


def _same_tensors(reference: dict[str, Tensor], loaded: dict[str, Tensor], path: Path) -> None:
    if set(reference) != set(loaded) or any(not torch.equal(v, loaded[k]) for k, v in reference.items()):
        path.unlink(missing_ok=True)
        raise ExportError(f"{path} does not hold the student's tensors as they are; nothing was written")


def _write_state_dict(student: Detector, path: Path, images: list[Tensor]) -> list[Detections]:
    from distkd.models.weights import load_weights

    state = student.model.state_dict()
    torch.save(state, path)
    fresh = _fresh(student)
    load_weights(fresh, path)
    _same_tensors(state, fresh.state_dict(), path)
    return detect(fresh, images)


def _write_safetensors(student: Detector, path: Path, images: list[Tensor]) -> list[Detections]:
    from safetensors.torch import load_file, save_file

    state = {k: v.detach().contiguous().clone() for k, v in student.model.state_dict().items()}
    save_file(state, str(path), metadata={"distkd": json.dumps(student.describe())})
    loaded = load_file(str(path))
    _same_tensors(state, loaded, path)
    fresh = _fresh(student)
    fresh.load_state_dict(loaded)
    return detect(fresh, images)


WRITERS: dict[str, Callable[[Detector, Path, list[Tensor]], list[Detections]]] = {
    "state_dict": _write_state_dict, "safetensors": _write_safetensors}


# ---------------------------------------------------------------------------------------------- prediction


@dataclass
class DetectionPredictor:
    """``detect(image)``: float (3, H, W) in [0, 1] -> its detections; labels are class index + ``label_offset``."""

    detect: Callable[[Tensor], Detections]
    classes: list[str]
    category_ids: list[int]
    label_offset: int
    source: str


def predictor_of_student(student: Detector) -> DetectionPredictor:
    model = student.model
    return DetectionPredictor(lambda image: detect(model, [image])[0], student.classes, student.category_ids,
                              student.label_offset, str(student.checkpoint))


def predictor_of_export(path: Path, info: dict[str, Any]) -> DetectionPredictor:
    """The exported detector ``path`` (a state dict) with its sidecar ``info``."""
    try:
        fmt, classes, offset = info["format"], [str(c) for c in info["classes"]], int(info["label_offset"])
        category_ids, model_info = [int(c) for c in info["category_ids"]], info["model"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}.json is not a distkd detection export sidecar (it lacks format, classes, "
                              "category_ids, label_offset or model); re-export with distkd export") from None
    if fmt not in WRITERS:
        raise CheckpointError(f"{path}.json names format {fmt!r}, which distkd predict does not read for detectors; "
                              "re-export with distkd export")
    from distkd.export import model_of_state_file  # export.py imports this module

    model = model_of_state_file(path, fmt, model_info, len(classes))
    return DetectionPredictor(lambda image: detect(model, [image])[0], classes, category_ids, offset, str(path))


def load_rgb(path: Path) -> Tensor:
    """The image file ``path`` as float (3, H, W) in [0, 1]."""
    import numpy as np

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image {path}: {first_line(err)}; give image files (.jpg, .png, ...)") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def predict_detections(predictor: DetectionPredictor, files: list[Path], min_score: float) -> list[dict[str, Any]]:
    """For each image file: ``{"image", "detections": [{"class", "index", "category_id", "score", "box"}]}``, the
    detections scoring at least ``min_score``, best first; ``box`` is x1, y1, x2, y2 in the image's pixels."""
    if not 0.0 <= min_score <= 1.0:
        raise ConfigError(f"--min-score must be within [0, 1], got {min_score}")
    results = []
    for path in files:
        found = predictor.detect(load_rgb(path))
        order = found["scores"].argsort(descending=True).tolist()
        detections = []
        for i in order:
            score = float(found["scores"][i])
            if score < min_score:
                break
            index = int(found["labels"][i]) - predictor.label_offset
            detections.append({"class": predictor.classes[index], "index": index,
                               "category_id": predictor.category_ids[index], "score": score,
                               "box": [round(float(v), 2) for v in found["boxes"][i]]})
        results.append({"image": str(path), "detections": detections})
    return results


def format_detections(results: list[dict[str, Any]]) -> str:
    """One line per detection (image, class, score, box), or per image without one."""
    width = max(len(r["image"]) for r in results)
    lines = [f"{'image':<{width}}  class score [x1, y1, x2, y2]"]
    for r in results:
        if not r["detections"]:
            lines.append(f"{r['image']:<{width}}  (none)")
        for d in r["detections"]:
            lines.append(f"{r['image']:<{width}}  {d['class']} {d['score']:.3f} {d['box']}")
    return "\n".join(lines)

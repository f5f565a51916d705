"""``distkd predict``: the top-k classes of image files, or a detector's boxes, from a run, a checkpoint or an
exported file (detectors: :mod:`distkd.export_detection`).

An exported file (``distkd export``) is recognised by its sidecar ``<file>.json``, which names its format, model,
class names and preprocessing; anything else is read as a run folder or a distkd checkpoint (best-on-val
weights). Images are preprocessed as the checkpoint records (:class:`~distkd.data.preprocess.Preprocess`), the
same pipeline ``distkd eval`` runs on image folders, so the two agree on the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from distkd.data.preprocess import Preprocess
from distkd.errors import CheckpointError, ConfigError, DataError, first_line
from distkd.export_detection import (
    DetectionPredictor,
    Detector,
    format_detections,
    predict_detections,
    predictor_of_export,
    predictor_of_student,
)

BATCH = 64
DEFAULT_TOP_K = 5
DEFAULT_MIN_SCORE = 0.5


@dataclass
class Predictor:
    """``logits(x)``: float ``(N, C, H, W)`` preprocessed images -> float ``(N, len(classes))`` logits."""

    logits: Callable[[Tensor], Tensor]
    classes: list[str]
    preprocess: Preprocess
    source: str


def load_predictor(source: str | Path) -> Predictor | DetectionPredictor:
    """The model of an exported file (with its sidecar), a run folder or a distkd checkpoint."""
    path = Path(source)
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{sidecar} is not valid JSON ({first_line(err)}); re-export with distkd "
                                  "export") from None
        return predictor_of_export(path, info) if _is_detection(info) else _exported(path, info)
    from distkd.export import load_student

    student = load_student(path)
    if isinstance(student, Detector):
        return predictor_of_student(student)
    model = student.model

    @torch.no_grad()
    def logits(x: Tensor) -> Tensor:
        from distkd.distill import logits_of

        return logits_of(model(x)).float()

    return Predictor(logits, student.classes, student.preprocess, str(student.checkpoint))


def _is_detection(info: Any) -> bool:
    return isinstance(info, dict) and info.get("task") == "detection"


def _exported(path: Path, info: dict[str, Any]) -> Predictor:
    """An exported file, run by its own runtime (torch, TorchScript, onnxruntime)."""
    try:
        fmt, classes, preprocess = info["format"], [str(c) for c in info["classes"]], info["preprocess"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}.json is not a distkd export sidecar (it lacks format/classes/preprocess); "
                              "re-export with distkd export") from None
    if fmt == "onnx":
        from distkd.export import require_onnx

        require_onnx()
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def logits(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float()
    elif fmt == "torchscript":
        import warnings

        with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; the file is one
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
        logits = torch.no_grad()(lambda x: scripted(x).float())
    elif fmt in ("state_dict", "safetensors"):
        from distkd.distill import logits_of
        from distkd.export import model_of_state_file

        model = model_of_state_file(path, fmt, info["model"], len(classes))
        logits = torch.no_grad()(lambda x: logits_of(model(x)).float())
    else:
        raise CheckpointError(f"{path}.json names format {fmt!r}, which distkd predict does not read; re-export with "
                              "distkd export")
    return Predictor(logits, classes, Preprocess.from_dict(preprocess), str(path))


def image_files(paths: list[str | Path]) -> list[Path]:
    """Files as given, and the image files under each folder (recursively, sorted)."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            inside = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not inside:
                raise DataError(f"{item} holds no image files ({', '.join(IMG_EXTENSIONS)})")
            found += inside
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item} does not exist; give image files or folders of them")
    return found


def predict(source: str | Path, images: list[str | Path], top_k: int | None = None,
            min_score: float | None = None) -> list[dict[str, Any]]:
    """For each image file (folders are searched): a classifier's ``{"image", "predictions": [{"class", "index",
    "probability"}]}`` with the ``top_k`` (default 5) most probable classes, most probable first; a detector's
    ``{"image", "detections": [...]}`` scoring at least ``min_score`` (default 0.5; see
    :func:`~distkd.export_detection.predict_detections`)."""
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    predictor = load_predictor(source)
    files = image_files(images)
    if isinstance(predictor, DetectionPredictor):
        if top_k is not None:
            raise ConfigError("--top-k counts a classifier's classes; a detector's boxes are chosen by --min-score")
        return predict_detections(predictor, files, DEFAULT_MIN_SCORE if min_score is None else min_score)
    if min_score is not None:
        raise ConfigError("--min-score chooses a detector's boxes; a classifier's classes are counted by --top-k")
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    k = min(top_k, len(predictor.classes))
    results = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        probs = predictor.logits(predictor.preprocess.batch(chunk)).softmax(dim=1)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            results.append({"image": str(path), "predictions": [
                {"class": predictor.classes[i], "index": i, "probability": p} for p, i in zip(values, indices,
                                                                                              strict=True)]})
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per image: its path, then ``class probability`` for each of the top classes (a detector's: one line
    per box)."""
    if results and "detections" in results[0]:
        return format_detections(results)
    width = max(len(r["image"]) for r in results)
    header = f"{'image':<{width}}  top classes (probability)"
    lines = [f"{r['image']:<{width}}  " + "  ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
             for r in results]
    return "\n".join([header, *lines])

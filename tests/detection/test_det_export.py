"""Exporting a detection student (state_dict, safetensors) and predicting boxes from a run or an exported file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distkd.api import train
from distkd.cli import main
from distkd.config import RunConfig, load_config, resolve_config_path
from distkd.engine.checkpoint import load_state
from distkd.export import export, load_student
from distkd.export_detection import Detector, check_images, detect
from distkd.models import create_model
from distkd.predict import predict

# scores of every box kept (threshold 0) and 5 boxes per image, so the exports are compared on real detections
KEEP_FIVE = {"retinanet": "model.kwargs={widths: [8, 16, 32], fpn_channels: 16, min_size: 64, max_size: 64, "
                          "score_thresh: 0.0, detections_per_img: 5}",
             "fasterrcnn": "model.kwargs={widths: [8, 16, 32], fpn_channels: 16, min_size: 64, max_size: 64, "
                           "box_score_thresh: 0.0, box_detections_per_img: 5}"}
CONFIGS = {"retinanet": "demo/det_student.yaml", "fasterrcnn": "demo/det_frcnn_student.yaml"}


@pytest.fixture(scope="module", params=["retinanet", "fasterrcnn"])
def detector_run(request: pytest.FixtureRequest, scenes_root: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    family = request.param
    scenes = f"data.kwargs={{train: 16, val: 8, test: 8, size: 64, folder: {scenes_root}}}"
    cfg = load_config(resolve_config_path(CONFIGS[family]), [
        scenes, KEEP_FIVE[family], f"out_dir={tmp_path_factory.mktemp('runs')}", "train.epochs=1",
        "data.batch_size=4", "train.progress=none"])
    before = torch.get_num_threads()
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
    return cfg, scenes_root / "seed0_size64_16-8-8"


def _names(cfg: RunConfig) -> tuple[list[str], list[int]]:
    gt = json.loads((Path(cfg.data.kwargs["folder"]) / "seed0_size64_16-8-8" / "annotations" /
                     "instances_train.json").read_text())
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    return [c["name"] for c in categories], [c["id"] for c in categories]


def test_a_detection_checkpoint_records_its_class_names_and_category_ids(detector_run) -> None:  # noqa: ANN001
    cfg, _ = detector_run
    classes, ids = _names(cfg)
    meta = load_state(cfg.run_dir / "checkpoints" / "best.pt")["meta"]
    assert meta == {"task": "detection", "classes": classes, "category_ids": ids}
    student = load_student(cfg.run_dir)
    assert isinstance(student, Detector) and not student.model.training
    assert student.label_offset == (1 if "frcnn" in CONFIGS[_family(cfg)] else 0)


def _family(cfg: RunConfig) -> str:
    return "fasterrcnn" if "fasterrcnn" in cfg.model.name else "retinanet"


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_a_detector_exports_alone_and_detects_as_the_checkpoint(detector_run, tmp_path: Path, fmt: str) -> None:  # noqa: ANN001
    cfg, _ = detector_run
    suffix = {"state_dict": ".pt", "safetensors": ".safetensors"}[fmt]
    info = export(cfg.run_dir, fmt, tmp_path / f"detector{suffix}")
    path = Path(info["path"])
    bare = create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    state = torch.load(path, weights_only=True) if fmt == "state_dict" else load_file(str(path))
    assert set(state) == set(bare.state_dict())  # the student alone: no teacher, no term state
    bare.load_state_dict(state)
    reference = create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    reference.load_state_dict(load_state(cfg.run_dir / "checkpoints" / "best.pt")["model"])
    images = check_images()
    got, expected = detect(bare.eval(), images), detect(reference.eval(), images)
    assert [len(d["scores"]) for d in expected] == [5, 5]
    for g, e in zip(got, expected, strict=True):
        assert all(torch.equal(g[k], e[k]) for k in ("boxes", "scores", "labels"))
    sidecar = json.loads(Path(info["sidecar"]).read_text())
    classes, ids = _names(cfg)
    assert sidecar["task"] == "detection" and sidecar["format"] == fmt
    assert sidecar["classes"] == classes and sidecar["category_ids"] == ids
    assert sidecar["label_offset"] == (1 if _family(cfg) == "fasterrcnn" else 0)
    assert sidecar["transform"]["min_size"] == [64] and sidecar["transform"]["max_size"] == 64
    assert sidecar["check"]["detections_compared"] == 10 and sidecar["check"]["max_abs_difference"] == 0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_formats_detectors_cannot_take_are_one_line_errors_writing_nothing(detector_run, tmp_path: Path,  # noqa: ANN001
                                                                           fmt: str, capsys) -> None:  # noqa: ANN001
    cfg, _ = detector_run
    out = tmp_path / "nothing" / "detector.bin"
    assert main(["export", str(cfg.run_dir), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"detectors export as state_dict or safetensors, not {fmt}" in err
    assert not out.parent.exists()


def test_predict_lists_the_boxes_above_min_score_alike_from_the_run_and_its_exports(detector_run,  # noqa: ANN001
                                                                                     tmp_path: Path, capsys) -> None:  # noqa: ANN001
    cfg, scenes = detector_run
    images = scenes / "val"
    from_run = predict(cfg.run_dir, [images], min_score=0.0)
    assert len(from_run) == 8 and all(len(r["detections"]) == 5 for r in from_run)
    classes, ids = _names(cfg)
    for result in from_run:
        scores = [d["score"] for d in result["detections"]]
        assert scores == sorted(scores, reverse=True)
        for d in result["detections"]:
            assert d["class"] == classes[d["index"]] and d["category_id"] == ids[d["index"]]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 64  # in the image's pixels
    for fmt, suffix in (("state_dict", ".pt"), ("safetensors", ".safetensors")):
        exported = export(cfg.run_dir, fmt, tmp_path / f"detector{suffix}")["path"]
        assert predict(exported, [images], min_score=0.0) == from_run
    threshold = sorted(d["score"] for r in from_run for d in r["detections"])[20]
    kept = predict(cfg.run_dir, [images], min_score=threshold)
    assert sum(len(r["detections"]) for r in kept) == sum(
        d["score"] >= threshold for r in from_run for d in r["detections"])
    assert main(["predict", str(cfg.run_dir), str(images / "000000.png"), "--min-score", "0"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "class", "score", "[x1,", "y1,", "x2,", "y2]"] and len(table) == 6


@pytest.mark.parametrize(("argv", "message"), [
    (["--top-k", "3"], "--top-k counts a classifier's classes; a detector's boxes are chosen by --min-score"),
    (["--min-score", "1.5"], "--min-score must be within [0, 1], got 1.5"),
])
def test_bad_detection_predict_options_are_one_line_errors(detector_run, argv: list[str], message: str,  # noqa: ANN001
                                                           capsys) -> None:  # noqa: ANN001
    cfg, scenes = detector_run
    assert main(["predict", str(cfg.run_dir), str(scenes / "val"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err


def test_an_older_detection_checkpoint_gets_its_names_from_its_dataset(detector_run, tmp_path: Path,  # noqa: ANN001
                                                                       capsys) -> None:  # noqa: ANN001
    cfg, _ = detector_run
    state = load_state(cfg.run_dir / "checkpoints" / "best.pt")
    meta = state.pop("meta")
    torch.save(state, tmp_path / "old.pt")
    student = load_student(tmp_path / "old.pt")
    assert "predates the record of class names" in capsys.readouterr().err
    assert isinstance(student, Detector) and (student.classes, student.category_ids) == (
        meta["classes"], meta["category_ids"])



def test_a_malformed_detection_sidecar_is_a_one_line_error(detector_run, tmp_path: Path) -> None:  # noqa: ANN001
    from distkd.errors import CheckpointError

    cfg, scenes = detector_run
    path = Path(export(cfg.run_dir, "safetensors", tmp_path / "d.safetensors")["path"])
    Path(f"{path}.json").write_text(json.dumps({"task": "detection", "format": "safetensors"}))
    with pytest.raises(CheckpointError, match="is not a distkd detection export sidecar"):
        predict(path, [scenes / "val"])

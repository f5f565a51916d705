"""Runs on your own image folder: what checkpoints record, the optional test/ split, eval on another folder,
per-class figures, and predictions that agree with ``distkd eval`` on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from distkd.api import evaluate_checkpoint
from distkd.cli import main
from distkd.data.imagefolder import load_imagefolder
from distkd.engine.checkpoint import load_state
from distkd.export import export
from distkd.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["ant", "bee", "cat"]


def test_checkpoints_record_the_folder_classes_and_the_eval_preprocessing(folder_run) -> None:
    _, run_dir, _ = folder_run
    meta = load_state(run_dir / "checkpoints" / "best.pt")["meta"]
    assert meta["classes"] == CLASSES
    assert meta["preprocess"] == {"channels": 3, "size": [32, 32], "resize": 36, "interpolation": "bilinear",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_the_recorded_preprocessing_is_timms_eval_pipeline(folder_run) -> None:
    """The eval pipeline as data gives the very tensors of timm's resize 32/0.875 + center crop 32."""
    folder, _, _ = folder_run
    data = load_imagefolder(str(folder), image_size=32)
    timm_eval = create_transform(32, is_training=False, crop_pct=0.875, interpolation="bilinear",
                                 mean=data.mean, std=data.std)
    for path in sorted((folder / "val").rglob("*.png"))[:3]:
        image = Image.open(path).convert("RGB")
        assert torch.equal(data.preprocess.transform()(image), timm_eval(image))
        assert torch.equal(data.preprocess.load(path), timm_eval(image))


def test_without_a_test_folder_the_report_says_test_is_val(folder_run) -> None:
    _, run_dir, summary = folder_run
    assert summary["test_is_val"] is True and summary["best_test"] == summary["best_val"]
    report = (run_dir / "report.md").read_text()
    assert "no separate test split: the test figures are the val figures" in report
    assert "never used to select" not in report


def test_a_test_folder_is_read_and_never_used_to_select(tmp_path, make_config, run_train, image_folder,
                                                         folder_train) -> None:
    folder = image_folder(tmp_path / "images", per_split={"train": 8, "val": 3, "test": 5}, seed=1)
    cfg = make_config("demo/teacher.yaml", tmp_path / "runs", "model.name=small_cnn3_w4", f"data.root={folder}",
                      *folder_train)
    summary = run_train(cfg)
    assert summary["test_is_val"] is False
    best = cfg.run_dir / "checkpoints" / "best.pt"
    assert summary["best_test"] == evaluate_checkpoint(best, "test")["top1"]
    assert len(load_imagefolder(str(folder), image_size=32).test) == 15  # the 5 x 3 images of test/
    assert "test is never used to select" in (cfg.run_dir / "report.md").read_text()


def _confusion(results: list[dict], root: Path) -> list[list[int]]:
    """The confusion matrix of predictions, the true class being the image's class folder."""
    matrix = [[0] * 3 for _ in range(3)]
    for r in results:
        truth = CLASSES.index(Path(r["image"]).relative_to(root).parts[0])
        matrix[truth][r["predictions"][0]["index"]] += 1
    return matrix


def test_predictions_agree_with_eval_per_class_on_the_same_images(folder_run, tmp_path, capsys) -> None:
    folder, run_dir, _ = folder_run
    best = run_dir / "checkpoints" / "best.pt"
    assert main(["eval", str(best), "--per-class"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "val" and metrics["confusion"]["classes"] == CLASSES
    matrix = metrics["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == 9
    assert sum(matrix[i][i] for i in range(3)) / 9 * 100 == pytest.approx(metrics["top1"])
    for c, name in enumerate(CLASSES):
        assert metrics["per_class_top1"][name] == pytest.approx(100 * matrix[c][c] / 3)
    onnx = export(run_dir, "onnx", tmp_path / "student.onnx")["path"]
    for source in (run_dir, onnx):
        assert _confusion(predict(source, [folder / "val"], top_k=1), folder / "val") == matrix


def test_eval_on_another_folder_with_data(folder_run, tmp_path, capsys, image_folder) -> None:
    _, run_dir, _ = folder_run
    other = image_folder(tmp_path / "other", per_split={"train": 1, "val": 4}, seed=5)
    best = str(run_dir / "checkpoints" / "best.pt")
    assert main(["eval", best, "--data", str(other)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["data"] == str(other) and metrics["split"] == "val"
    results = predict(best, [other / "val"], top_k=1)
    matrix = _confusion(results, other / "val")
    assert len(results) == 12 and metrics["top1"] == pytest.approx(100 * sum(matrix[i][i] for i in range(3)) / 12)
    wrong = image_folder(tmp_path / "wrong", classes=("ant", "bee", "dog"), per_split={"train": 1, "val": 1})
    assert main(["eval", best, "--data", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the dataset has other classes (ant, bee, dog) than the model was trained for")
    assert err.count("\n") == 1


def test_image_size_and_workers_default_to_the_images_and_the_cores(folder_run, capsys) -> None:
    import os

    from distkd.config import DataConfig
    from distkd.tasks.common import data_workers

    folder, _, _ = folder_run  # 46x40 images: the shorter side is 40, x 0.875 = 35, a multiple of 8 below: 32
    data = load_imagefolder(str(folder))
    assert data.preprocess.size == (32, 32) and data.preprocess.resize == 36  # 36 <= 40: never upscaled
    assert capsys.readouterr().out.startswith("data.image_size: 32 (the training images' median shorter side 40")
    assert data_workers(DataConfig()) == min(4, len(os.sched_getaffinity(0)))
    assert data_workers(DataConfig(num_workers=3)) == 3

"""Segmentation through the shared engine: scenes, dense terms on out/aux, ignore mask, mIoU."""

from __future__ import annotations

import json

import pytest
import torch

from distkd.api import evaluate_checkpoint, train
from distkd.config import load_config
from distkd.data.batch import Batch
from distkd.errors import ConfigError, UnknownNameError
from distkd.metrics.segmentation import ConfusionMatrix
from distkd.tasks import segmentation

TINY_SCENES = "data.kwargs={train: 64, val: 32, test: 32}"


def _config(tmp_path, *extra: str):
    return load_config("src/distkd/configs/demo/seg_student.yaml", [
        f"out_dir={tmp_path}", TINY_SCENES, "train.epochs=1", "train.progress=none", "train.amp=none",
        "data.batch_size=16", *extra,
    ])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    cfg = _config(out, "name=teacher")
    train(cfg)
    return cfg.run_dir / "checkpoints" / "best.pt"


def test_a_segmentation_run_reports_miou_and_writes_its_run_directory(teacher_ckpt):
    run_dir = teacher_ckpt.parent.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "miou" and 0 <= summary["best_test"] <= 100
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"val/miou", "val/pixel_acc", "train/ce"} <= set(records[-1])


def test_distillation_terms_on_out_and_aux_are_named_and_logged(tmp_path, teacher_ckpt):
    student_kwargs = _config(tmp_path).model.kwargs  # the teacher fixture was trained as the demo student
    cfg = _config(tmp_path, "name=dist", "teacher.name=seg_deeplabv3_tiny", f"teacher.kwargs={student_kwargs}",
                  f"teacher.checkpoint={teacher_ckpt}", "loss.mask_ignore=true",
                  "loss.distill=[{loss: dist}, {loss: dist, weight: 0.4, student: aux, teacher: aux}]")
    train(cfg)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "teacher_val/miou" in records[0]
    last = records[-1]
    assert {"train/dist", "train/dist_aux", "train/dist/inter", "train/dist_aux/intra"} <= set(last)
    # the logged term is the weighted one: 0.4 x the aux DIST, whose parts are unweighted
    assert last["train/dist_aux"] <= 0.4 * 2 + 1e-6


def test_ignore_mask_is_false_exactly_where_the_nearest_label_is_255():
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, :8, :8] = 255
    mask = segmentation.ignore_mask({"out": torch.zeros(1, 3, 4, 4)}, target)["mask"]
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, :2, :2] = False
    assert torch.equal(mask, expected)


def test_evaluate_matches_a_confusion_matrix_on_upsampled_predictions():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 4, 4)
    labels = torch.randint(0, 4, (3, 16, 16))
    labels[0, 0] = 255

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return {"out": logits[: len(x)]}

    metrics = segmentation.evaluate(Fixed(), [Batch(torch.zeros(3, 1, 16, 16), labels)])
    up = torch.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=True).argmax(1)
    matrix = ConfusionMatrix(4)
    matrix.update(up, labels)
    assert metrics["miou"] == pytest.approx(100 * matrix.miou())
    assert metrics["pixel_acc"] == pytest.approx(100 * matrix.pixel_accuracy())


def test_distkd_eval_reads_a_segmentation_checkpoint(teacher_ckpt):
    metrics = evaluate_checkpoint(teacher_ckpt, "test")
    summary = json.loads((teacher_ckpt.parent.parent / "summary.json").read_text())
    assert metrics["miou"] == pytest.approx(summary["best_test"])


def test_unknown_segmentation_dataset_and_missing_root_are_one_line_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="cityscapes"):
        train(_config(tmp_path, "data.name=citiscapes"))
    with pytest.raises(ConfigError, match="data.root is required"):
        train(_config(tmp_path, "data.name=voc"))

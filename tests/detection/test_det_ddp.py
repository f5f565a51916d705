"""Detection under torchrun (two processes, gloo on CPU): the trainer averages the student's gradients itself
(the step calls the detector's parts, which DDP's forward would not see), so both ranks hold one model: the
metrics logged from the gathered detections of both ranks are those of the saved checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distkd.api import evaluate_checkpoint, train
from distkd.config import load_config, resolve_config_path

SCENES = "data.kwargs={{train: 64, val: 24, test: 24, size: 64, folder: {}}}"
SMALL = ["model.kwargs.min_size=64", "model.kwargs.max_size=64", "data.batch_size=8", "train.progress=none"]


@pytest.mark.slow
def test_two_process_detection_distillation_keeps_one_model(scenes_root: Path, tmp_path: Path) -> None:
    scenes = SCENES.format(scenes_root)
    teacher_cfg = load_config(resolve_config_path("demo/det_frcnn_teacher.yaml"),
                              [scenes, *SMALL, f"out_dir={tmp_path}", "train.epochs=1"])
    train(teacher_cfg)
    teacher = teacher_cfg.run_dir / "checkpoints" / "best.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distkd",
           "train", "demo/det_frcnn_dist.yaml", scenes, *SMALL, f"out_dir={tmp_path}", "train.epochs=2",
           f"teacher.checkpoint={teacher}", "name=ddp"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # rank 0 alone writes: the teacher's val mAP, then 2 epochs
    assert records[0]["teacher_val/map"] >= 0
    lines = records[1:]
    assert lines[-1]["train/dist"] > 0 and "train/loss_classifier" in lines[-1]
    # each rank trained on half of every batch: 64 images / (8 per step) = 8 steps per epoch, not 16
    assert lines[-1]["step"] == 16
    summary = json.loads((run_dir / "summary.json").read_text())
    last = run_dir / "checkpoints" / "last.pt"
    # Each rank evaluated its half of val/test and the detections were gathered before COCO evaluation; equal to
    # one process evaluating the saved weights only if both ranks held those weights (gradients averaged,
    # BatchNorm statistics shared).
    assert evaluate_checkpoint(last, "val")["map"] == pytest.approx(lines[-1]["val/map"], abs=1e-9)
    assert evaluate_checkpoint(last, "test")["map"] == pytest.approx(summary["last_test"], abs=1e-9)
    state = torch.load(last, weights_only=True)
    assert lines[-1]["val/map"] == summary["last_val"] and "model" in state

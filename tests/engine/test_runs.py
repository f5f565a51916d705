"""Whole runs on the embedded silhouettes: what a run directory holds, student runs, resume and teacher guards."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distkd.api import evaluate_checkpoint
from distkd.config import RunConfig, from_dict
from distkd.errors import CheckpointError, ConfigError

Run = tuple[Path, dict]  # the session's teacher run: (run_dir, summary)
MakeConfig = Callable[..., RunConfig]
RunTrain = Callable[..., dict]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_teacher_run_directory_holds_every_record(teacher_run: Run) -> None:
    run_dir, summary = teacher_run
    cfg = from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert cfg.model.name == "small_cnn3_w4" and cfg.train.epochs == 2 and cfg.run_dir == run_dir
    env = json.loads((run_dir / "env.json").read_text())
    assert torch.__version__.startswith(env["packages"]["torch"])
    assert "git_commit" in env and env["device"] == "cpu"
    lines = records(run_dir)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train/loss", "train/ce", "val/top1", "val/top5", "val/loss", "lr", "images_per_s"} <= set(lines[0])
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    steps = [summary["steps"] // 2, summary["steps"]]  # TensorBoard's x axis: optimizer steps
    assert [e.step for e in events.Scalars("val/top1")] == [r["step"] for r in lines] == steps
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["val/top1"] for r in lines])
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert set(summary) >= {"best_epoch", "best_val", "best_test", "last_val", "last_test"}
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    report = (run_dir / "report.md").read_text()
    assert f"best on val: epoch {summary['best_epoch']} of 2" in report and "| best_test |" in report


def test_best_epoch_is_chosen_on_val_and_test_is_only_reported(teacher_run: Run) -> None:
    run_dir, summary = teacher_run
    vals = [r["val/top1"] for r in records(run_dir)]
    assert summary["best_epoch"] == vals.index(max(vals)) + 1
    assert summary["best_val"] == max(vals) and summary["last_val"] == vals[-1]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"] and last["epoch"] == 2
    assert "optimizer" not in best and "optimizer" in last
    assert evaluate_checkpoint(run_dir / "checkpoints" / "best.pt", "test")["top1"] == summary["best_test"]
    assert evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", "test")["top1"] == summary["last_test"]
    assert evaluate_checkpoint(run_dir / "checkpoints" / "best.pt", "val")["top1"] == summary["best_val"]


def test_student_run_logs_the_teacher_and_the_distillation_parts(
    teacher_run: Run, make_config: MakeConfig, run_train: RunTrain, tmp_path: Path
) -> None:
    teacher_ckpt = teacher_run[0] / "checkpoints" / "best.pt"
    cfg = make_config("demo/dist.yaml", tmp_path, "teacher.name=small_cnn3_w4", f"teacher.checkpoint={teacher_ckpt}",
                      "train.epochs=1")
    summary = run_train(cfg)
    first, epoch1 = records(cfg.run_dir)
    assert first["epoch"] == first["step"] == 0
    assert set(first) == {"epoch", "step", "teacher_val/top1", "teacher_val/top5", "teacher_val/loss"}
    # The teacher loaded strictly from its checkpoint scores exactly what `distkd eval` gives that checkpoint.
    assert first["teacher_val/top1"] == evaluate_checkpoint(teacher_ckpt, "val")["top1"]
    assert first["teacher_val/top1"] == teacher_run[1]["best_val"]
    assert summary["teacher_val"]["top1"] == first["teacher_val/top1"]
    assert {"train/loss", "train/ce", "train/dist", "train/dist/inter", "train/dist/intra"} <= set(epoch1)
    assert epoch1["train/loss"] == pytest.approx(epoch1["train/ce"] + epoch1["train/dist"], rel=1e-5)
    # demo/dist.yaml: 2 x DIST at tau 4 with beta = gamma = 1 and the tau**2 factor.
    parts = epoch1["train/dist/inter"] + epoch1["train/dist/intra"]
    assert epoch1["train/dist"] == pytest.approx(2 * 16 * parts, rel=1e-4)
    assert "teacher `small_cnn3_w4`" in (cfg.run_dir / "report.md").read_text()


def test_resume_with_a_changed_config_names_the_key(
    teacher_run: Run, make_config: MakeConfig, run_train: RunTrain
) -> None:
    run_dir = teacher_run[0]
    cfg = make_config("demo/teacher.yaml", run_dir.parent, "model.name=small_cnn3_w4", "train.epochs=2",
                      "optim.lr=0.05")
    with pytest.raises(ConfigError) as err:
        run_train(cfg, resume=True)
    assert "config differs in optim.lr" in str(err.value) and "\n" not in str(err.value)


def test_training_into_a_used_run_dir_needs_resume(
    teacher_run: Run, make_config: MakeConfig, run_train: RunTrain
) -> None:
    cfg = make_config("demo/teacher.yaml", teacher_run[0].parent, "model.name=small_cnn3_w4", "train.epochs=2")
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        run_train(cfg)


def test_resuming_needs_a_full_checkpoint(
    teacher_run: Run, make_config: MakeConfig, run_train: RunTrain, tmp_path: Path
) -> None:
    run_dir = tmp_path / teacher_run[0].name
    shutil.copytree(teacher_run[0], run_dir)
    shutil.copy(run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt")
    cfg = make_config("demo/teacher.yaml", tmp_path, "model.name=small_cnn3_w4", "train.epochs=2")
    with pytest.raises(CheckpointError, match="holds weights only and cannot resume"):
        run_train(cfg, resume=True)
    fresh = make_config("demo/teacher.yaml", tmp_path / "empty", "train.epochs=2")
    with pytest.raises(ConfigError, match="nothing to resume in .*; run the same command without --resume"):
        run_train(fresh, resume=True)


def test_a_teacher_needs_a_checkpoint(make_config: MakeConfig, run_train: RunTrain, tmp_path: Path) -> None:
    cfg = make_config("demo/dist.yaml", tmp_path, "teacher.name=small_cnn3_w4")
    with pytest.raises(ConfigError, match="teacher.checkpoint is required"):
        run_train(cfg)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("small_cnn3_w8", r"shape mismatch\(es\) \(features\.0\.weight: checkpoint \[4, 1, 3, 3\] vs model \[8, "),
     ("small_resnet8_w8", r"missing key\(s\) \(conv1\.0\.weight, .*unexpected key\(s\) \(features\.0\.weight")],
)
def test_a_teacher_checkpoint_for_another_architecture_lists_the_keys(
    teacher_run: Run, make_config: MakeConfig, run_train: RunTrain, tmp_path: Path, name: str, expected: str
) -> None:
    ckpt = teacher_run[0] / "checkpoints" / "best.pt"
    cfg = make_config("demo/dist.yaml", tmp_path, f"teacher.name={name}", f"teacher.checkpoint={ckpt}")
    with pytest.raises(CheckpointError, match=expected) as err:
        run_train(cfg)
    assert "\n" not in str(err.value)


def test_a_finished_run_draws_its_curves(teacher_run) -> None:
    from PIL import Image

    run_dir = teacher_run[0]
    with Image.open(run_dir / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1000, 400)

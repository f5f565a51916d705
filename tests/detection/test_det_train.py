"""Detection end to end on silhouette scenes: the real COCO reader, loader, trainer, evaluator and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distkd.api import evaluate_checkpoint, evaluate_config, train
from distkd.cli import main
from distkd.config import RunConfig, load_config, resolve_config_path
from distkd.engine.checkpoint import load_state
from distkd.errors import ConfigError
from distkd.models import create_model

SMALL = ("model.kwargs.min_size=64",
         "model.kwargs.max_size=64", "optim.lr=0.005", "schedule.warmup_epochs=0.5", "train.progress=none")


def _config(name: str, scenes: Path, out: Path, *overrides: str) -> RunConfig:
    scenes_kwargs = f"data.kwargs={{train: 192, val: 48, test: 32, size: 64, folder: {scenes}}}"
    return load_config(resolve_config_path(name), [scenes_kwargs, f"out_dir={out}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def student_run(scenes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, dict]:
    cfg = _config("demo/det_student.yaml", scenes_root, tmp_path_factory.mktemp("runs"), "train.epochs=4")
    before = torch.get_num_threads()
    try:
        return cfg, train(cfg)
    finally:
        torch.set_num_threads(before)


def test_a_short_run_learns_to_detect_and_saves_the_student(student_run: tuple[RunConfig, dict]) -> None:
    cfg, summary = student_run
    torch.manual_seed(0)
    untrained = create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs).state_dict()
    before = evaluate_config(cfg, weights=untrained)
    assert summary["best_val"] > 0.5 and summary["best_val"] > 5 * before["map"]
    best = load_state(cfg.run_dir / "checkpoints" / "best.pt")
    bare = create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs)
    bare.load_state_dict(best["model"])  # the student alone, strictly
    assert evaluate_checkpoint(cfg.run_dir / "checkpoints" / "best.pt")["map"] == pytest.approx(summary["best_val"])
    assert {"last_test", "best_test"} <= set(summary)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train/classification", "train/bbox_regression", "val/map50"} <= set(records[-1])


def test_distkd_eval_prints_the_checkpoints_map(student_run: tuple[RunConfig, dict], capsys) -> None:  # noqa: ANN001
    cfg, summary = student_run
    assert main(["eval", str(cfg.run_dir / "checkpoints" / "best.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["map"] == pytest.approx(summary["best_val"]) and {"map50", "map75"} <= set(printed)


def test_dist_student_trains_against_the_teacher_checkpoint(student_run: tuple[RunConfig, dict], scenes_root: Path,
                                                            tmp_path: Path) -> None:
    cfg, _ = student_run
    teacher = str(cfg.run_dir / "checkpoints" / "best.pt")
    dist = _config("demo/det_dist.yaml", scenes_root, tmp_path, "train.epochs=1", f"teacher.checkpoint={teacher}",
                   "teacher.kwargs={widths: [8, 16, 32], fpn_channels: 16, min_size: 64, max_size: 64}")
    summary = train(dist)
    assert summary["teacher_val"]["map"] == pytest.approx(evaluate_checkpoint(teacher)["map"])
    record = json.loads((dist.run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert record["train/dist_cls_logits"] > 0 and "train/dist_cls_logits/intra" in record
    assert set(load_state(dist.run_dir / "checkpoints" / "best.pt")["model"]) == set(
        create_model(dist.model.name, num_classes=10, **dist.model.kwargs).state_dict())


def test_a_logits_term_on_retinanet_is_refused_naming_the_tap(scenes_root: Path, tmp_path: Path) -> None:
    cfg = _config("demo/det_dist.yaml", scenes_root, tmp_path, "loss.distill.0.student=logits",
                  "loss.distill.0.teacher=logits", "teacher.checkpoint=unused.pt")
    with pytest.raises(ConfigError, match="use student: cls_logits, teacher: cls_logits"):
        train(cfg)


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(scenes_root: Path, tmp_path: Path,
                                                            kill_and_resume) -> None:  # noqa: ANN001
    """Faster R-CNN samples RoIs at random: the resumed run must restore the RNG state and the loader's order."""
    overrides = ("train.max_steps=7", "train.checkpoint_every=4", "train.eval_every=100")
    a, b, batch = kill_and_resume(_config("demo/det_frcnn_student.yaml", scenes_root, tmp_path / "a", *overrides),
                                  _config("demo/det_frcnn_student.yaml", scenes_root, tmp_path / "b", *overrides))
    assert batch == 4
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("config", "override", "message"), [
    ("demo/det_student.yaml", "teacher_cache.views=2", "teacher_cache.views > 0 needs a teacher"),
    ("demo/det_student.yaml", "train.compile=true", "train.compile is not supported"),
    ("demo/det_frcnn_student.yaml", "loss.mask_padding=true", "Faster R-CNN's terms compare RoIs"),
])
def test_unsupported_detection_settings_are_one_line_errors(config: str, override: str, message: str,
                                                             scenes_root: Path, tmp_path: Path) -> None:
    cfg = _config(config, scenes_root, tmp_path, override)
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)

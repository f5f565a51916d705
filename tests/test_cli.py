"""The ``distkd`` command line: sub-commands, listings, eval output, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distkd.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: distkd")
    for command in ("train", "eval", "demo", "models", "configs"):
        assert f"    {command} " in out


def test_models_lists_registered_names_and_the_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {"small_cnn3_w4", "small_cnn6_w32", "cifar_resnet56"} <= set(lines)
    assert any(line.startswith("timm_<name>") for line in lines) and any(line.startswith("tv_<name>") for line in lines)


def test_configs_lists_the_bundled_demo_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines]
    assert {"demo/teacher.yaml", "demo/student.yaml", "demo/kd.yaml", "demo/dist.yaml"} <= set(listed)
    teacher = lines[listed.index("demo/teacher.yaml")]
    assert teacher.split(None, 1)[1] == ("The demo's teacher: a 6-conv CNN (288k parameters) on the embedded "
                                         "silhouettes.")
    assert all(len(line.split()) > 1 for line in lines)  # every bundled config says what it trains


def test_a_bad_override_is_one_error_line_with_exit_status_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "distkd", "train", "demo/teacher.yaml", "optim.lrr=0.1", f"out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: unknown key 'optim.lrr'")
    assert "did you mean 'lr'?" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "teacher").exists()


def test_errors_inside_a_command_print_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found: ") and err.count("\n") == 1
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.startswith("error: config file not found: ")


def test_eval_prints_json_metrics_of_a_checkpoint(
    teacher_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, summary = teacher_run
    assert main(["eval", str(run_dir / "checkpoints" / "last.pt"), "--split", "test"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"split", "top1", "top5", "loss"} and metrics["split"] == "test"
    assert metrics["top1"] == summary["last_test"]
    assert main(["eval", str(run_dir / "checkpoints" / "best.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == summary["best_val"]


def test_resume_with_another_config_is_refused_naming_the_key(
    teacher_run: tuple[Path, dict], fast_overrides: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = teacher_run[0]
    args = ["train", "demo/teacher.yaml", *fast_overrides, f"out_dir={run_dir.parent}", "model.name=small_cnn3_w4",
            "train.epochs=1", "--resume"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume ")
    assert "config differs in train.epochs (train.epochs may only grow" in err
    assert err.count("\n") == 1


def test_train_resumes_a_run_folder_with_its_saved_config_even_moved(
    teacher_run: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run_dir, summary = teacher_run
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(run_dir, moved)
    assert main(["train", str(moved)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {moved} is a run folder: add --resume to continue it with its saved config, or give a " \
                  "config file to start a new run\n"
    assert main(["train", str(moved), "train.progress=lines", "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run folder: {moved}\n") and f"resumed from {moved}/checkpoints/last.pt" in out
    assert out.count('"best_val"') == 1 and out.rstrip().endswith(f"report: {moved / 'report.md'}")
    assert json.loads((moved / "summary.json").read_text()) == summary  # the finished run, read where it lies now


def test_more_epochs_extend_a_finished_run_with_the_schedule_recomputed(
    make_config, run_train, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_config("demo/teacher.yaml", tmp_path, "train.epochs=1", "schedule.warmup_epochs=0", "name=short")
    run_train(cfg)
    capsys.readouterr()
    assert main(["train", str(cfg.run_dir), "train.epochs=3", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "extending the run from 1 to 3 epochs at step 54: the lr schedule is recomputed over 3 epochs" in out
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # cosine over 3 epochs from lr 0.1: at the end of epoch 2, 0.1 * (1 + cos(2 pi / 3)) / 2 = 0.025
    assert records[1]["lr"] == pytest.approx(0.025) and records[2]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert "epochs: 3" in (cfg.run_dir / "config.yaml").read_text()
    assert json.loads((cfg.run_dir / "summary.json").read_text())["epochs"] == 3


def test_demo_quick_runs_in_its_own_folder_and_bad_jobs_is_one_line(monkeypatch, capsys) -> None:
    # A quick demo's weak teacher must never serve the full demo: the default folders differ.
    import distkd.demo

    calls = []
    monkeypatch.setattr(distkd.demo, "run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    assert main(["demo", "--quick", "--jobs", "1"]) == 0 and main(["demo"]) == 0
    assert [str(out) for out, _ in calls] == ["runs/demo_quick", "runs/demo"]
    assert calls[0][1]["jobs"] == 1
    monkeypatch.undo()
    assert main(["demo", "--jobs", "0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--jobs must be at least 1" in error



def test_demo_detector_chooses_the_detection_models_and_needs_task_detection(monkeypatch, capsys) -> None:
    import distkd.demo

    calls = []
    monkeypatch.setattr(distkd.demo, "run_demo", lambda out, **kwargs: calls.append((out, kwargs)))
    assert main(["demo", "--task", "detection"]) == 0
    assert main(["demo", "--task", "detection", "--detector", "retinanet", "--quick"]) == 0
    assert [(str(out), kw["task"]) for out, kw in calls] == [
        ("runs/demo_det", "detection"), ("runs/demo_det_retinanet_quick", "detection-retinanet")]
    assert distkd.demo.CONFIGS["detection-retinanet"]["dist"] == "demo/det_dist.yaml"
    assert main(["demo", "--detector", "retinanet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "needs --task detection" in error

"""`distkd demo --task detection` runs teacher, student alone, KD and DIST and reports COCO mAP (both detectors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distkd import demo


@pytest.mark.parametrize(("task", "model", "params"), [("detection", "det_fasterrcnn_tiny", "87,950"),
                                                       ("detection-retinanet", "det_retinanet_tiny", "53,650")])
def test_detection_demo_reports_map(task: str, model: str, params: str, tmp_path: Path,
                                    monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(demo.QUICK, task, [
        f"data.kwargs={{train: 48, val: 16, test: 16, size: 64, folder: {tmp_path / 'scenes'}}}", "train.epochs=1",
        "model.kwargs.min_size=64", "model.kwargs.max_size=64"])
    results = demo.run_demo(tmp_path, seeds=1, quick=True, task=task)
    report = (tmp_path / "report.md").read_text()
    assert "COCO box mAP" in report and "test map (best-on-val)" in report
    assert f"| {model} | dist | {params} |" in report and f"| {model} | kd |" in report
    assert all(0 <= r.summary["best_test"] <= 100 for runs in results.values() for r in runs)
    assert (tmp_path / "val_curves.png").is_file()

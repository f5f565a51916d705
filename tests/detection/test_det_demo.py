"""`distkd demo --task detection` runs teacher, student alone, KD and DIST and reports COCO mAP."""

from __future__ import annotations

from pathlib import Path

from distkd import demo


def test_detection_demo_reports_map(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(demo.QUICK, "detection", [
        f"data.kwargs={{train: 48, val: 16, test: 16, size: 64, folder: {tmp_path / 'scenes'}}}", "train.epochs=1",
        "model.kwargs.min_size=64", "model.kwargs.max_size=64"])
    results = demo.run_demo(tmp_path, seeds=1, quick=True, task="detection")
    report = (tmp_path / "report.md").read_text()
    assert "COCO box mAP" in report and "test map (best-on-val)" in report
    assert "| det_retinanet_tiny | dist | 53,650 |" in report and "| det_retinanet_tiny | kd |" in report
    assert all(0 <= r.summary["best_test"] <= 100 for runs in results.values() for r in runs)
    assert (tmp_path / "val_curves.png").is_file()
